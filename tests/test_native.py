"""Soft loading of fastdiff._C: what was built is reported truthfully, and a missing or stale
extension warns once and falls back instead of failing."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff import _native
from fastdiff.backends import BackendUnavailableError, select_backend
from fastdiff.ops import cfg_combine

REPO = Path(fastdiff.__file__).resolve().parent.parent


@pytest.fixture
def fresh_native():
    """A load() that starts from scratch, and the real state restored afterwards."""
    _native._reset()
    yield
    _native._reset()


def _real_build_info() -> dict:
    return _native._read_build_info() or {}


def _nvcc_present() -> bool:
    """The same search as setup.py: CUDA_HOME/CUDA_PATH, /usr/local/cuda, nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return (Path(os.environ[var]) / "bin" / "nvcc").exists()
    return Path("/usr/local/cuda/bin/nvcc").exists() or shutil.which("nvcc") is not None


def test_status_has_the_documented_keys():
    status = _native.status()
    for key in ("built", "cuda_compiled", "cuda_archs", "reason", "build_info"):
        assert key in status, key
    assert isinstance(status["built"], bool)
    assert isinstance(status["cuda_compiled"], bool)
    assert isinstance(status["cuda_archs"], list)
    assert isinstance(status["reason"], str)
    assert isinstance(status["build_info"], dict)
    assert status["built"] == (status["reason"] == "")
    assert not status["cuda_compiled"] or status["built"]


def test_load_is_cached():
    assert _native.load() is _native.load()


def test_native_extension_was_built_when_a_compiler_exists():
    """Guards CI against a build that silently fell back to pure Python."""
    info = _real_build_info()
    if info.get("native_skip_requested"):
        pytest.skip("installed with FASTDIFF_SKIP_NATIVE=1")
    if shutil.which(os.environ.get("CXX", "c++").split()[0]) is None:
        pytest.skip("no C++ compiler here, so the pure-Python install is the expected outcome")
    status = _native.status()
    assert status["built"], f"fastdiff._C is not loaded: {status['reason']}"
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda_version"] == torch.version.cuda


def test_cuda_part_compiled_when_torch_is_cuda_and_nvcc_is_present():
    """CI has no GPU but has nvcc and a CUDA torch: this is what proves the .cu files compiled."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build, so no CUDA part is expected")
    if not _nvcc_present():
        pytest.skip("no nvcc here, so no CUDA part is expected")
    info = _real_build_info()
    if "FASTDIFF_SKIP_CUDA" in info.get("cuda_skipped_reason", ""):
        pytest.skip("installed with FASTDIFF_SKIP_CUDA=1")
    status = _native.status()
    assert status["built"], f"fastdiff._C is not loaded: {status['reason']}"
    assert status["cuda_compiled"], f"CUDA part not compiled: {status['cuda_skipped_reason']}"
    assert status["cuda_archs"], "cuda_archs is empty although CUDA was compiled"


def test_ptxas_report_has_every_kernel_for_every_arch_and_no_spills():
    status = _native.status()
    if not status["cuda_compiled"]:
        pytest.skip(f"CUDA part not compiled: {status['cuda_skipped_reason'] or status['reason']}")
    report = REPO / (status["build_info"].get("ptxas_report") or "build/ptxas_report.txt")
    if not report.exists():
        pytest.skip(f"no ptxas report at {report} (not an editable install from this checkout?)")
    text = report.read_text()
    for arch in status["cuda_archs"]:
        sm = "sm_" + arch.removesuffix("+PTX").replace(".", "")
        assert f"for '{sm}'" in text, f"no kernel compiled for {sm} in {report}"
    spills = [
        line
        for line in text.splitlines()
        if "spill" in line and " 0 bytes spill stores, 0 bytes spill loads" not in line
    ]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_version_mismatch_warns_once_and_falls_back(monkeypatch, fresh_native):
    info = dict(_real_build_info(), native=True, torch_version="0.0.1+elsewhere")
    monkeypatch.setattr(_native, "_read_build_info", lambda: info)
    with pytest.warns(
        RuntimeWarning, match=r"built for torch 0\.0\.1\+elsewhere.*pip install -e \. --no-build-isolation"
    ):
        assert _native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        assert _native.load() is None
        status = _native.status()
    assert not status["built"] and not status["cuda_compiled"]
    assert "0.0.1+elsewhere" in status["reason"]

    # Ops keep working on the reference, and the native backend says why it refuses.
    x = torch.randn(4, 3)
    assert select_backend("cfg_combine", "auto", {"model_out": x}) == "reference"
    torch.testing.assert_close(cfg_combine(x, 2.0), x[:2] + 2.0 * (x[2:] - x[:2]))
    with pytest.raises(BackendUnavailableError, match="fastdiff._C not built.*0.0.1"):
        cfg_combine(x, 2.0, backend="cpu")


def test_cuda_version_mismatch_also_falls_back(monkeypatch, fresh_native):
    info = dict(_real_build_info(), native=True, torch_version=torch.__version__, torch_cuda_version="99.9")
    monkeypatch.setattr(_native, "_read_build_info", lambda: info)
    with pytest.warns(RuntimeWarning, match="torch CUDA 99.9"):
        assert _native.load() is None


def test_missing_build_record_warns_and_falls_back(monkeypatch, fresh_native):
    monkeypatch.setattr(_native, "_read_build_info", lambda: None)
    with pytest.warns(RuntimeWarning, match="not built"):
        assert _native.load() is None
    assert _native.status()["build_info"] == {}


def test_import_error_warns_and_falls_back(monkeypatch, fresh_native):
    info = dict(_real_build_info(), native=True, **_native._running_versions())
    monkeypatch.setattr(_native, "_read_build_info", lambda: info)

    def broken_import(name):
        raise ImportError(f"{name}: undefined symbol: _ZN3c104Half")

    monkeypatch.setattr(_native.importlib, "import_module", broken_import)
    with pytest.warns(RuntimeWarning, match="importing fastdiff._C failed.*undefined symbol"):
        assert _native.load() is None


def test_deliberate_pure_python_install_is_silent(monkeypatch, fresh_native):
    info = {
        "native": False,
        "native_skip_requested": True,
        "native_skipped_reason": "FASTDIFF_SKIP_NATIVE=1 was set at install time",
    }
    monkeypatch.setattr(_native, "_read_build_info", lambda: info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.load() is None
    assert "FASTDIFF_SKIP_NATIVE=1" in _native.status()["reason"]


def test_skipped_build_for_lack_of_a_compiler_warns(monkeypatch, fresh_native):
    info = {"native": False, "native_skipped_reason": "no C++ compiler found (CXX='c++' is not on PATH)"}
    monkeypatch.setattr(_native, "_read_build_info", lambda: info)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert _native.load() is None


def test_on_load_callbacks_run_once_loaded(fresh_native):
    seen = []
    _native.on_load(seen.append)
    module = _native.load()
    assert seen == ([module] if module is not None else [])
    _native._callbacks.remove(seen.append)


# ---- what fastdiff._C registers ----------------------------------------------------------------------
# Each op registers itself in its own files (csrc/cpu/<op>.cpp: schema, CPU kernel, Autograd kernel;
# csrc/meta/<op>.cpp; csrc/cuda/<op>.cu). These pin the result: the schemas, and the dispatch keys
# every op has a kernel for. A change here is a deliberate change of an op's interface.

# op -> (schema, dispatch keys it has a kernel for; "CUDA" only where the build has the CUDA part)
NATIVE_OPS = {
    "cfg_combine": (
        "fastdiff::cfg_combine(Tensor model_out, float scale) -> Tensor",
        ("CPU", "Meta", "Autograd", "CUDA"),
    ),
    "sampler_step": (
        "fastdiff::sampler_step(Tensor x, Tensor model_output, Tensor coefs, Tensor step, "
        "float cfg_scale, bool learned_range, float clip, Tensor? threshold, Tensor? noise, "
        "Tensor? philox_seed, bool return_x0, Tensor? history=None) -> (Tensor, Tensor)",
        ("CPU", "Meta", "CUDA"),
    ),
    "sampler_loop_step": (
        "fastdiff::sampler_loop_step(Tensor(a!) x_in, Tensor model_output, Tensor coefs, "
        "Tensor(b!) step, Tensor? cfg_scale, bool learned_range, float clip, Tensor? threshold, "
        "Tensor? noise, Tensor? philox_seed, Tensor(c!)? t_in, Tensor? timesteps, "
        "Tensor(d!)? history=None) -> ()",
        ("CPU", "Meta", "CUDA"),
    ),
    "group_norm_adagn": (
        "fastdiff::group_norm_adagn(Tensor x, int num_groups, Tensor? weight, Tensor? bias, "
        "Tensor? scale, Tensor? shift, Tensor? pre_shift, float eps, bool silu) -> Tensor",
        ("CPU", "Meta", "Autograd", "CUDA"),
    ),
    "layer_norm_modulate": (
        "fastdiff::layer_norm_modulate(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, "
        "Tensor? shift, float eps) -> Tensor",
        ("CPU", "Meta", "Autograd", "CUDA"),
    ),
    "conv3x3": (
        "fastdiff::conv3x3(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int path=0) -> Tensor",
        ("CPU", "Meta", "Autograd"),
    ),
    # No tensor argument: one catch-all kernel, which the dispatcher files under CompositeImplicitAutograd.
    "conv3x3_weight_cache": (
        "fastdiff::conv3x3_weight_cache(int forget=0, bool clear=False) -> int[]",
        ("CompositeImplicitAutograd",),
    ),
}
DISPATCH_KEYS = ("CPU", "Meta", "Autograd", "CUDA", "CompositeImplicitAutograd")


def _defined_in_sources() -> dict[str, str]:
    """op -> the source file whose m.def defines it, over every C++ and CUDA source."""
    import re

    csrc = REPO / "csrc"
    found: dict[str, str] = {}
    for source in sorted([*csrc.rglob("*.cpp"), *csrc.rglob("*.cu")]):
        for name in re.findall(r'm\.def\(\s*"([a-z_0-9]+)\(', source.read_text()):
            assert name not in found, f"{name} is defined twice: {found[name]} and {source.relative_to(REPO)}"
            found[name] = str(source.relative_to(REPO))
    return found


@pytest.mark.native
@pytest.mark.parametrize("op", sorted(NATIVE_OPS))
def test_native_op_schema_and_dispatch_keys(op):
    _native.load()
    schema, keys = NATIVE_OPS[op]
    assert str(getattr(torch.ops.fastdiff, op).default._schema) == schema
    expected = set(keys) if _native.status()["cuda_compiled"] else set(keys) - {"CUDA"}
    has = {key for key in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{op}", key)}
    assert has == expected, torch._C._dispatch_dump(f"fastdiff::{op}")


@pytest.mark.native
def test_every_native_op_registers_in_its_own_files():
    """Each op the sources define has its schema in its own csrc/cpu/<op>.cpp (the step ops share
    sampler_step.cpp, conv3x3's cache lives with conv3x3) and is registered for CPU and Meta there and
    in csrc/meta/, and for CUDA (where built) in its csrc/cuda/<op>.cu (an op that takes no tensor: one
    catch-all kernel). A new op needs no line above."""
    _native.load()
    defined = _defined_in_sources()
    assert set(NATIVE_OPS) <= set(defined)
    home = {"sampler_loop_step": "sampler_step", "conv3x3_weight_cache": "conv3x3"}
    for op, source in defined.items():
        assert source == f"csrc/cpu/{home.get(op, op)}.cpp", (op, source)
        dump = torch._C._dispatch_dump(f"fastdiff::{op}")
        kernels = {line.split(":")[0]: line for line in dump.splitlines() if "registered at" in line}
        if "CompositeImplicitAutograd[alias]" in kernels:
            assert f"csrc/cpu/{home.get(op, op)}.cpp" in kernels["CompositeImplicitAutograd[alias]"], dump
            continue
        assert f"csrc/cpu/{home.get(op, op)}.cpp" in kernels.get("CPU", ""), dump
        assert "csrc/meta/" in kernels.get("Meta", ""), dump
        if "CUDA" in kernels:
            assert f"csrc/cuda/{home.get(op, op)}.cu" in kernels["CUDA"], dump
