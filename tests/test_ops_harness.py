"""Every op's case (tests/op_cases.py) on every backend its declaration names × dtypes × layouts × shapes.

A backend that cannot run a case here skips with the declaration's reasons (a skip is not a pass).
The triton backend runs its own smaller grid (marked ``triton``), on the GPU when there is one, else
on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1); the cuda backend adds its CUDA-only
shapes. Then each op's opcheck samples, Meta kernel, bad-input tables and dispatch basics.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import DTYPES, full_triton_grid
from op_cases import CASES, BadInput, NativeBadInput, OpCase, device_for, skip_unless_runs

from fastdiff import _native
from fastdiff.backends import AUTO, BackendUnavailableError, ExplicitOnly, select_backend


def _marks(backend: str) -> list:
    if backend == "triton":
        return [pytest.mark.triton]
    if backend == "cuda":
        return [pytest.mark.gpu]
    return []


def _grid():
    for case in CASES:
        for backend in case.support.backends:
            for dtype in case.dtypes:
                for sid, spec, layout in case.grid(backend):
                    bug = case.known_bug(backend, spec, layout)
                    marks = _marks(backend) + ([pytest.mark.xfail(strict=True, reason=bug)] if bug else [])
                    yield pytest.param(
                        case,
                        backend,
                        dtype,
                        layout,
                        spec,
                        marks=marks,
                        id=f"{case.op}-{backend}-{str(dtype)[6:]}-{layout}-{sid}",
                    )


def _device(request, backend: str):
    return request.getfixturevalue("triton_device") if backend == "triton" else device_for(backend)


@pytest.mark.parametrize(("case", "backend", "dtype", "layout", "spec"), list(_grid()))
def test_matches_reference(case: OpCase, backend, dtype, layout, spec, request):
    full = backend != "triton" or full_triton_grid()
    calls = case.calls(spec, dtype, layout, _device(request, backend), full=full)
    skip_unless_runs(case, backend, *calls)
    for call in calls:
        case.check(case.run(call, backend), call, f"{backend} {call.what}")


def _float64_grid():
    for case in CASES:
        for backend in case.support.backends:
            shapes = list(case.float64_shapes) + ([(s, v) for s, v in case.cuda_shapes] if backend == "cuda" else [])
            for sid, spec in shapes:
                for layout in case.layouts:
                    if case.applies(spec, layout):
                        bug = case.known_bug(backend, spec, layout)
                        marks = _marks(backend) + ([pytest.mark.xfail(strict=True, reason=bug)] if bug else [])
                        yield pytest.param(
                            case, backend, layout, spec, marks=marks, id=f"{case.op}-{backend}-{layout}-{sid}"
                        )


@pytest.mark.parametrize(("case", "backend", "layout", "spec"), list(_float64_grid()))
def test_float64_stays_float64(case: OpCase, backend, layout, spec, request):
    """float64 in, float64 out, within 1e-12 of the reference (the float64 floor: eager is exact)."""
    calls = case.calls(spec, torch.float64, layout, _device(request, backend))
    skip_unless_runs(case, backend, *calls)
    for call in calls:
        case.check(case.run(call, backend), call, f"{backend} {call.what}")


# ---- the torch ops: opcheck and Meta -------------------------------------------------------------------


def _opcheck_grid():
    for case in CASES:
        for kind, op in (("native", case.native_op), ("triton", case.triton_op)):
            if op is None:
                continue
            # the native op on CUDA tensors only where the declaration has a native CUDA kernel
            native_cuda = case.support.kernels["cuda"].kind == "native"
            for dtype, layout in case.opcheck_grid(kind):
                devices = (("cpu", "cuda") if native_cuda else ("cpu",)) if kind == "native" else ("triton",)
                for device in devices:
                    marks = {
                        "cpu": [pytest.mark.native],
                        "cuda": [pytest.mark.native(cuda=True)],
                        "triton": [pytest.mark.triton],
                    }[device]
                    yield pytest.param(
                        case, op, device, dtype, layout, marks=marks, id=f"{op}-{device}-{str(dtype)[6:]}-{layout}"
                    )


@pytest.mark.parametrize(("case", "op", "device", "dtype", "layout"), list(_opcheck_grid()))
def test_opcheck(case: OpCase, op, device, dtype, layout, request):
    """Schema, fake impl (FakeTensor, AOTAutograd with dynamic shapes), autograd registration and the
    kernel agree on the case's samples."""
    if device == "triton":
        device = request.getfixturevalue("triton_device")
    for args in case.opcheck_samples("triton" if op == case.triton_op else "native", dtype, layout, device):
        torch.library.opcheck(getattr(torch.ops.fastdiff, op).default, args)


@pytest.mark.native
@pytest.mark.parametrize("case", [c for c in CASES if c.native_op is not None], ids=repr)
def test_meta_gives_shape_dtype_and_format(case: OpCase):
    case.check_meta()


# ---- bad input: each error names the argument ----------------------------------------------------------


def _bad_grid():
    for case in CASES:
        for bad in case.bad_inputs:
            for backend in case.bad_backends:
                yield pytest.param(case, bad, backend, id=f"{case.op}-{bad.id}-{backend}")


@pytest.mark.parametrize(("case", "bad", "backend"), list(_bad_grid()))
def test_bad_input_names_the_argument(case: OpCase, bad: BadInput, backend):
    """Validation comes before the backend's choice: every backend, runnable here or not, gives it;
    and it writes nothing."""
    args, kwargs = bad.make()
    before = _clones((args, kwargs))
    with pytest.raises(bad.error, match=bad.match):
        case.fn(*args, **kwargs, backend=backend)
    _assert_unchanged((args, kwargs), before)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in (nested tuples, lists and dicts of) arguments, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _clones(value) -> list[torch.Tensor | None]:
    return [t.detach().clone() if t.device.type == "cpu" else None for t in _tensors(value)]


def _assert_unchanged(value, before) -> None:
    """A refusal writes nothing: every CPU tensor argument holds what it held before the call (an op
    that works in place, sampler_loop_step, must check before it writes)."""
    for i, (t, was) in enumerate(zip(_tensors(value), before, strict=True)):
        if was is not None:
            torch.testing.assert_close(t, was, rtol=0, atol=0, equal_nan=True, msg=f"tensor argument {i} changed")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_unknown_backend_names_the_argument_and_the_choices(case: OpCase):
    names = (AUTO, *case.support.backends)
    accepted = (
        AUTO,
        "reference",
        "cpu",
        "cuda",
        "triton",
        *(b for b in names[1:] if b not in ("reference", "cpu", "cuda", "triton")),
    )
    with pytest.raises(ValueError, match=re.escape(f"{case.op}: backend must be one of {accepted!r}, got 'fast'")):
        case.run(case.example(), "fast")


def _native_bad_grid():
    for case in CASES:
        for bad in case.native_bad_inputs:
            for device in bad.devices:
                yield pytest.param(case, bad, device, id=f"{case.native_op}-{bad.id}-{device}")


@pytest.mark.native
@pytest.mark.parametrize(("case", "bad", "device"), list(_native_bad_grid()))
def test_native_checks_name_the_argument(case: OpCase, bad: NativeBadInput, device):
    """The C++ op checks too (its CPU and Meta kernels alike), for callers of torch.ops directly, before
    it writes anything (an in-place op's arguments keep their values)."""
    args = dict(case.native_args(), **bad.overrides())
    args = {k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in args.items()}
    before = _clones(args)
    with pytest.raises(RuntimeError, match=bad.match):
        getattr(torch.ops.fastdiff, case.native_op)(*args.values())
    _assert_unchanged(args, before)


# ---- dispatch --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_auto_picks_the_first_backend_that_runs(case: OpCase):
    """Auto takes the first backend of the declared order with no reasons: on CPU tensors here the
    native cpu kernel where there is one and fastdiff._C is built."""
    call = case.example()
    inputs = case.inputs(call)
    chosen = select_backend(case.op, "auto", inputs)
    assert chosen == next(b for b in case.support.backends if not case.support.why_not(b, inputs))
    if case.native_op is not None and _native.status()["built"]:
        assert chosen == "cpu"
    case.check(case.run(call, "auto"), call, f"auto ({chosen}) {call.what}")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_explicit_cuda_refusal_lists_every_reason(case: OpCase):
    """Without a CUDA device, backend='cuda' raises with every reason the declaration gives, in its message."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the cuda backend's refusal is tested where there is none")
    call = case.example()
    with pytest.raises(BackendUnavailableError, match=rf"{case.op}: backend='cuda' cannot run") as info:
        case.run(call, "cuda")
    reasons = info.value.reasons
    assert reasons == [r for r in case.support.why_not("cuda", case.inputs(call)) if not isinstance(r, ExplicitOnly)]
    assert reasons and all(r in str(info.value) for r in reasons)
    if case.support.kernels["cuda"].kind == "missing":  # no CUDA kernel (e.g. conv3x3: cuDNN is the one)
        assert any("not implemented for this op yet" in r for r in reasons), reasons
        return
    status = _native.status()
    if not status["built"]:
        assert reasons == [f"fastdiff._C not built ({status['reason']})"]
    elif status["cuda_compiled"]:
        assert "no CUDA device (torch.cuda.is_available() is False)" in reasons
        name = next(iter(case.inputs(call)))
        assert f"{name} is on cpu, cuda backend needs CUDA tensors" in reasons
    else:
        assert any(r.startswith("CUDA not compiled into fastdiff._C") for r in reasons)


def test_every_case_is_a_registered_op():
    """Each case is a declared op and names its declared torch ops; DTYPES is the grid's dtype set."""
    from fastdiff.backends import registered_ops

    ops = registered_ops()
    for case in CASES:
        assert case.op in ops and ops[case.op] is case.support
        for op in (case.native_op, case.triton_op):
            assert op is None or op in (case.support.kernels["cpu"].native_op or case.op, f"{case.op}_triton"), op
        assert case.dtypes == DTYPES
