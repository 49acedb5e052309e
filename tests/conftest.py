"""Shared test helpers: the dtype-following tolerance rule, where the Triton tier (tests/triton/)
runs (the GPU, or Triton's CPU interpreter), the fake GPU, and the markers (pyproject.toml): ``gpu``
on every GPU test (``gpu(only=True)``: skipped, with the reason, where there is no CUDA device),
``native`` on every test that needs fastdiff._C (``native(cuda=True)``: its CUDA part and a device),
``triton`` on every test of the Triton tier."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides compiled vs interpreted when triton.language is imported, so the interpreter
# must be asked for before any test imports Triton. On a machine without a GPU it is the only way
# Triton kernels run, and it is what the Triton tier (tests/triton) needs; with a GPU the same
# tests run the compiled kernels on it. `auto` never picks the interpreter (see
# fastdiff.backends.ExplicitOnly), so the rest of the suite dispatches as it would without it.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _runs_on_a_gpu(item: pytest.Item) -> bool:
    """Whether a test needs a GPU or runs a CUDA/Triton kernel when one is present: a skipif naming
    CUDA or a GPU, native(cuda=True), a 'cuda' or 'triton' parameter (the backend tests pick the GPU
    for those), or 'cuda' in its name."""
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", "")).lower()
        if "cuda" in reason or "gpu" in reason:
            return True
    if any(mark.kwargs.get("cuda") for mark in item.iter_markers("native")):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(isinstance(v, str) and v in ("cuda", "triton") for v in params.values()):
        return True
    return "cuda" in item.name.lower()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every GPU test ``gpu`` (besides those marked by hand), so that one selection,
    ``pytest -m gpu tests`` (what ``python -m fastdiff.gpucheck`` runs), is the whole GPU tier; and
    every test on the Triton tier's device ``triton`` (``-m "not triton"`` leaves the interpreter out)."""
    for item in items:
        if _runs_on_a_gpu(item) and not item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.gpu)
        if "triton_device" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("triton"):
            item.add_marker(pytest.mark.triton)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip, with the reason, what this machine cannot run: ``native`` without fastdiff._C (or, with
    cuda=True, without its CUDA part or a device), ``gpu(only=True)`` without a CUDA device."""
    for mark in item.iter_markers("native"):
        from fastdiff import _native

        status = _native.status()
        if not status["built"]:
            pytest.skip(f"fastdiff._C not built: {status['reason']}")
        if mark.kwargs.get("cuda"):
            if not status["cuda_compiled"]:
                pytest.skip(f"the CUDA part of fastdiff._C is not built: {status['cuda_skipped_reason']}")
            if not torch.cuda.is_available():
                pytest.skip("needs a CUDA device; none here")
    if any(mark.kwargs.get("only") for mark in item.iter_markers("gpu")) and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; none here")


# Absolute floors per dtype, added to the 2x-eager bound (flash-attention's rule).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _deterministic_math():
    """Reference math in full precision: no TF32, fixed seed per test."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_tuning_cache(tmp_path_factory):
    """The tuner's cache file in a folder of this test session, never the user's ~/.cache."""
    os.environ["FASTDIFF_CACHE_DIR"] = str(tmp_path_factory.mktemp("fastdiff-cache"))
    yield


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """FASTDIFF_BACKEND from the caller's shell must not steer the tests."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    yield


@pytest.fixture
def fake_gpu(monkeypatch):
    """Dispatch as on a machine with a GPU, for FakeTensor CUDA tensors: torch.cuda.is_available()
    is True and Triton compiles (TRITON_INTERPRET=0). Remembered dispatch decisions are dropped
    before and after, so none made under the fake outlives the test. Yields the monkeypatch."""
    import fastdiff.backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fastdiff.backends, "interpreter_mismatch", lambda: None)
    fastdiff.backends.forget_decisions()
    yield monkeypatch
    fastdiff.backends.forget_decisions()


@pytest.fixture
def ran_backends(monkeypatch):
    """Record which backend runs each call of the ops: ``ran_backends(*ops)`` wraps every kernel of
    those ops' declarations and returns the list that fills with (op, backend) per call."""
    import dataclasses

    import fastdiff.backends

    def record(*ops: str) -> list[tuple[str, str]]:
        calls: list[tuple[str, str]] = []
        for op in ops:
            support = fastdiff.backends.registered_ops()[op]
            for backend, kernel in list(support.kernels.items()):
                if kernel.run is None:
                    continue

                def run(*args, _run=kernel.run, _op=op, _backend=backend):
                    calls.append((_op, _backend))
                    return _run(*args)

                monkeypatch.setitem(support.kernels, backend, dataclasses.replace(kernel, run=run))
        fastdiff.backends.forget_decisions()
        return calls

    yield record
    fastdiff.backends.forget_decisions()


def assert_within_eager_bound(out: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """err(out) <= 2 * err(eager in out's dtype) + floor(dtype), element-wise against ``exact``
    (the reference in float64). On failure, report the worst element and the share that fails."""
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == eager.dtype, f"{what}: dtype {out.dtype} != eager's {eager.dtype}"
    exact = exact.to(torch.float64)
    err = (out.to(torch.float64) - exact).abs()
    bound = 2 * (eager.to(torch.float64) - exact).abs().max() + FLOOR[out.dtype]
    bad = ~(err <= bound)  # NaN counts as failing
    if bad.any():
        worst = int(torch.nan_to_num(err, nan=float("inf")).argmax())
        share = bad.float().mean().item()
        raise AssertionError(
            f"{what}: {share:.2%} of {err.numel()} elements exceed the bound {bound.item():.3g}; worst at flat "
            f"index {worst}: got {out.flatten()[worst].item():.6g}, expected {exact.flatten()[worst].item():.6g}"
        )


@pytest.fixture
def triton_device() -> torch.device:
    """Where the Triton tier runs its kernels: the GPU when there is one, else the CPU in Triton's
    interpreter (TRITON_INTERPRET=1, set for the whole session at the top of this file). Skips,
    with the reason, when neither can run."""
    pytest.importorskip("triton", reason="Triton is not installed: the Triton tier needs it")
    from fastdiff.triton import interpreter_mismatch, interpreting

    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    if not interpreting():
        pytest.skip("no CUDA device, and TRITON_INTERPRET is off: Triton kernels cannot run here")
    if (why := interpreter_mismatch()) is not None:
        pytest.skip(why)
    return torch.device("cpu")


@pytest.fixture
def interpreted(triton_device):
    """The Triton tier's device when it is Triton's CPU interpreter (the bytes tests count every
    load and store there); skips where the kernels run compiled on a GPU."""
    if triton_device.type != "cpu":
        pytest.skip("counts bytes in Triton's interpreter; kernels run compiled on this machine's GPU")
    return triton_device


def full_triton_grid() -> bool:
    """FASTDIFF_FULL_TRITON=1 widens the Triton tier's grids (slow in the interpreter: minutes)."""
    return os.environ.get("FASTDIFF_FULL_TRITON", "") == "1"


def cpu_tensor_skip_reason(backend: str, dtype: torch.dtype = torch.float32) -> str | None:
    """None when ``backend`` runs CPU tensors of ``dtype`` here, else the reason it does not (for a
    skip): the reference always runs; cpu needs fastdiff._C; triton needs Triton's interpreter and
    has no float64; cuda (and the rest) run CUDA tensors only."""
    if backend == "reference":
        return None
    if backend == "cpu":
        from fastdiff import _native

        status = _native.status()
        return None if status["built"] else f"fastdiff._C not built: {status['reason']}"
    if backend == "triton":
        try:
            from fastdiff.triton import interpreting
        except ImportError as e:
            return f"Triton not importable: {e}"
        if not interpreting():
            return "Triton runs compiled here: CPU tensors need TRITON_INTERPRET=1"
        return "the Triton kernels run float32/float16/bfloat16 only" if dtype == torch.float64 else None
    return f"the {backend} backend runs CUDA tensors only (the GPU tier covers it)"
