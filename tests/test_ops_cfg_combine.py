"""fastdiff.ops.cfg_combine on every backend against the reference, plus its bad inputs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound

from fastdiff import _native
from fastdiff.backends import BACKENDS, BackendUnavailableError, select_backend
from fastdiff.ops import cfg_combine
from fastdiff.reference.guidance import cfg_combine as reference_cfg_combine

OP_MODULE = sys.modules["fastdiff.ops.cfg_combine"]  # the package attribute is the function
SUPPORT = OP_MODULE.SUPPORT

ROWS = (2, 6, 14)
RESTS = ((3,), (4, 7, 9), (1, 1, 1))
SCALES = (4.0, 1.0, 0.0, -2.5)

needs_native = pytest.mark.skipif(
    not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _skip_unless_runs(backend: str, model_out: torch.Tensor) -> None:
    """Parametrized from the declared support: a backend that refuses skips with its reasons."""
    reasons = SUPPORT.why_not(backend, {"model_out": model_out})
    if reasons:
        pytest.skip(f"{backend} cannot run this input here: {'; '.join(reasons)}")


def _check_against_reference(out: torch.Tensor, model_out: torch.Tensor, scale: float, what: str) -> None:
    exact = reference_cfg_combine(model_out.double(), scale)
    eager = reference_cfg_combine(model_out, scale, upcast=False)  # plain PyTorch in the same dtype
    assert out.is_contiguous(), f"{what}: output is not contiguous"
    assert out.device == model_out.device
    assert_within_eager_bound(out, eager, exact, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rest", RESTS, ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_reference(backend, dtype, rest, rows):
    model_out = torch.randn(rows, *rest).to(dtype)
    if backend == "cuda" and torch.cuda.is_available():
        model_out = model_out.cuda()
    _skip_unless_runs(backend, model_out)
    for scale in SCALES:
        out = cfg_combine(model_out, scale, backend=backend)
        assert out.shape == (rows // 2, *rest) and out.dtype == dtype
        _check_against_reference(out, model_out, scale, f"{backend} {dtype} {tuple(model_out.shape)} scale={scale}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(backend, dtype):
    device = _device_for(backend) if torch.cuda.is_available() else "cpu"
    views = {
        "transposed": torch.randn(9, 7, 4, 14, device=device).to(dtype).permute(3, 2, 1, 0),
        "strided slice": torch.randn(6, 10, 5, device=device).to(dtype)[:, ::3],
        "expanded": torch.randn(1, 5, device=device).to(dtype).expand(4, 5),
    }
    for name, model_out in views.items():
        assert not model_out.is_contiguous()
        _skip_unless_runs(backend, model_out)
        out = cfg_combine(model_out, 3.0, backend=backend)
        _check_against_reference(out, model_out, 3.0, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_input_crosses_threads_and_vector_tails(backend):
    # 3*129*129 = 49923 elements per half: above the 32768 parallel grain, not a multiple of any
    # vector width, so both the threaded split and the scalar tails run.
    for dtype in (*DTYPES, torch.float64):
        model_out = torch.randn(2, 3, 129, 129).to(dtype)
        if backend == "cuda" and torch.cuda.is_available():
            model_out = model_out.cuda()
        _skip_unless_runs(backend, model_out)
        out = cfg_combine(model_out, 7.5, backend=backend)
        if dtype == torch.float64:
            torch.testing.assert_close(out, reference_cfg_combine(model_out, 7.5), rtol=0, atol=1e-12)
        else:
            _check_against_reference(out, model_out, 7.5, f"{backend} {dtype} large")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_stays_float64(backend):
    model_out = torch.randn(6, 5, dtype=torch.float64)
    _skip_unless_runs(backend, model_out)
    out = cfg_combine(model_out, 2.5, backend=backend)
    assert out.dtype == torch.float64
    u, c = model_out.chunk(2)
    torch.testing.assert_close(out, u + 2.5 * (c - u), rtol=0, atol=1e-12)


def test_empty_rest_returns_empty():
    model_out = torch.randn(4, 0, 3)
    for backend in ("reference", "cpu"):
        if SUPPORT.why_not(backend, {"model_out": model_out}):
            continue
        out = cfg_combine(model_out, 2.0, backend=backend)
        assert out.shape == (2, 0, 3)


@needs_native
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
def test_opcheck(dtype):
    op = torch.ops.fastdiff.cfg_combine
    samples = [
        (torch.randn(6, 3).to(dtype), 2.5),
        (torch.randn(2, 4, 7, 9).to(dtype), -1.0),
        (torch.randn(9, 7, 4, 14).to(dtype).permute(3, 2, 1, 0), 4.0),
    ]
    if dtype in (torch.float32, torch.float64):
        samples.append((torch.randn(4, 5, dtype=dtype, requires_grad=True), 3.0))
    for args in samples:
        torch.library.opcheck(op, args)


@needs_native
def test_native_gradient_matches_formula():
    model_out = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cfg_combine(t, 2.5, backend="cpu"), (model_out,))


@needs_native
def test_meta_shape():
    out = torch.ops.fastdiff.cfg_combine(torch.empty(6, 4, 7, device="meta", dtype=torch.bfloat16), 2.0)
    assert out.shape == (3, 4, 7) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@needs_native
def test_portable_cpu_loop_matches_reference_too():
    """The AVX2 build is picked on this machine; the portable one runs under ATEN_CPU_CAPABILITY=default."""
    code = textwrap.dedent(
        """
        import torch
        from fastdiff import _native
        from fastdiff.reference.guidance import cfg_combine as ref
        assert _native.load() is not None, _native.status()["reason"]
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = torch.randn(14, 3, 33, 5).to(dtype)
            out = torch.ops.fastdiff.cfg_combine(x, 4.0)
            assert torch.equal(out, ref(x, 4.0)), dtype
        print("ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---- bad input: each error names the argument ----------------------------------------------------


@pytest.mark.parametrize(
    ("model_out", "scale", "error", "match"),
    [
        ([[1.0, 2.0], [3.0, 4.0]], 1.0, TypeError, r"model_out must be a torch\.Tensor, got list"),
        (torch.ones(4, 3, dtype=torch.int64), 1.0, TypeError, r"model_out must be a floating tensor.*int64"),
        (torch.ones(4, 3, dtype=torch.complex64), 1.0, TypeError, r"model_out must be a floating tensor"),
        (torch.tensor(1.0), 1.0, ValueError, r"model_out must have an even number.*got shape \(\)"),
        (torch.ones(3, 4), 1.0, ValueError, r"model_out must have an even number.*\(3, 4\)"),
        (torch.ones(0, 4), 1.0, ValueError, r"model_out must have an even number \(>= 2\).*\(0, 4\)"),
        (torch.ones(4, 3), "2", TypeError, r"scale must be a real number.*str"),
        (torch.ones(4, 3), True, TypeError, r"scale must be a real number.*bool"),
        (torch.ones(4, 3), torch.tensor(2.0), TypeError, r"scale must be a real number.*Tensor"),
        (torch.ones(4, 3), math.nan, ValueError, r"scale must be finite, got nan"),
        (torch.ones(4, 3), -math.inf, ValueError, r"scale must be finite, got -inf"),
    ],
)
@pytest.mark.parametrize("backend", ("auto", "reference", "cpu"))
def test_bad_input_names_the_argument(model_out, scale, error, match, backend):
    with pytest.raises(error, match=match):
        cfg_combine(model_out, scale, backend=backend)


def test_unknown_backend_names_the_argument_and_the_choices():
    with pytest.raises(
        ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'cuda', 'triton'\), got 'fast'"
    ):
        cfg_combine(torch.ones(2, 3), 1.0, backend="fast")


@needs_native
@pytest.mark.parametrize(
    ("model_out", "scale", "match"),
    [
        (torch.ones(3, 2), 1.0, r"cfg_combine: model_out must have an even number of rows .* got 3"),
        (
            torch.ones(4, 2, dtype=torch.int32),
            1.0,
            r"cfg_combine: model_out dtype must be float32, float64, float16 or bfloat16, got Int",
        ),
        (torch.tensor(1.0), 1.0, r"cfg_combine: model_out must have at least 1 dimension"),
        (torch.ones(4, 2), math.inf, r"cfg_combine: scale must be finite, got inf"),
    ],
)
def test_native_checks_name_the_limit(model_out, scale, match):
    """The C++ op checks too, for callers of torch.ops.fastdiff.cfg_combine directly."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastdiff.cfg_combine(model_out, scale)


# ---- backend choice --------------------------------------------------------------------------------


def test_fastdiff_backend_env_overrides_the_argument(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return reference_cfg_combine(*args, **kwargs)

    monkeypatch.setattr(OP_MODULE, "_reference_cfg_combine", spy)
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    x = torch.randn(4, 3)
    assert select_backend("cfg_combine", "cuda", {"model_out": x}) == "reference"
    cfg_combine(x, 2.0, backend="cuda")  # would refuse on this machine without the override
    assert len(calls) == 1

    monkeypatch.setenv("FASTDIFF_BACKEND", "warp-speed")
    with pytest.raises(ValueError, match=r"FASTDIFF_BACKEND must be one of .*got 'warp-speed'"):
        cfg_combine(x, 2.0)


def test_auto_picks_the_fastest_backend_that_runs():
    x = torch.randn(4, 3)
    chosen = select_backend("cfg_combine", "auto", {"model_out": x})
    expected = next(b for b in ("cuda", "triton", "cpu", "reference") if not SUPPORT.why_not(b, {"model_out": x}))
    assert chosen == expected
    if _native.status()["built"]:
        assert chosen == "cpu"


def test_explicit_backend_refusal_lists_every_reason():
    x = torch.randn(4, 3)
    with pytest.raises(BackendUnavailableError, match=r"backend='triton'.*not implemented for this op yet") as info:
        cfg_combine(x, 2.0, backend="triton")
    assert isinstance(info.value, RuntimeError)

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the cuda backend's refusal is tested where there is none")
    with pytest.raises(BackendUnavailableError) as info:
        cfg_combine(x, 2.0, backend="cuda")
    reasons = info.value.reasons
    message = str(info.value)
    status = _native.status()
    if not status["built"]:
        assert reasons == [f"fastdiff._C not built ({status['reason']})"]
    elif status["cuda_compiled"]:
        assert "no CUDA device (torch.cuda.is_available() is False)" in reasons
        assert "model_out is on cpu, cuda backend needs CUDA tensors" in reasons
    else:
        assert any(r.startswith("CUDA not compiled into fastdiff._C") for r in reasons)
    for reason in reasons:
        assert reason in message


@needs_native
def test_cpu_backend_refuses_cuda_like_inputs_with_reasons():
    meta = torch.empty(4, 3, device="meta")
    reasons = SUPPORT.why_not("cpu", {"model_out": meta})
    assert reasons == ["model_out is on meta, cpu backend needs CPU tensors"]
    ints = torch.ones(4, 3, dtype=torch.int16)
    assert SUPPORT.why_not("cpu", {"model_out": ints}) == [
        "model_out dtype torch.int16 not supported (supported: float32, float16, bfloat16, float64)"
    ]


# ---- GPU tier: runs wherever a CUDA device is present ---------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
@pytest.mark.parametrize("shape", [(2, 3), (6, 4, 7, 9), (14, 1, 1, 1), (2, 3, 129, 129)], ids=str)
def test_cuda_launch_matches_reference(dtype, shape):
    model_out = torch.randn(*shape, device="cuda").to(dtype)
    _skip_unless_runs("cuda", model_out)
    out = cfg_combine(model_out, 4.0, backend="cuda")
    torch.cuda.synchronize()
    _check_against_reference(out, model_out, 4.0, f"cuda {dtype} {shape}")


@needs_cuda
def test_cuda_non_contiguous_and_current_stream():
    model_out = torch.randn(9, 7, 4, 14, device="cuda").permute(3, 2, 1, 0)
    _skip_unless_runs("cuda", model_out)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = cfg_combine(model_out, 3.0, backend="cuda")
    stream.synchronize()
    _check_against_reference(out, model_out, 3.0, "cuda transposed, side stream")


@needs_cuda
def test_cuda_opcheck():
    _skip_unless_runs("cuda", torch.empty(2, 1, device="cuda"))
    for dtype in (*DTYPES, torch.float64):
        torch.library.opcheck(torch.ops.fastdiff.cfg_combine, (torch.randn(6, 5, device="cuda").to(dtype), 2.0))
