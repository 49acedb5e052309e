"""Issue 13's unclear errors, one named regression test each: every backend that runs here gives the
reference's result or the same clear error (the CLI, Schedule and DiT have theirs in their own files)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff import _native
from fastdiff.backends import BackendUnavailableError
from fastdiff.ops import cfg_combine, conv3x3, group_norm_adagn, layer_norm_modulate, sampler_step
from fastdiff.reference.sampler_step import STEP_COEFS

NATIVE = _native.status()["built"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _backends(op_triton: bool = True) -> list:
    """The backends that run CPU tensors here: reference, cpu (native), triton (interpreter)."""
    out = ["reference", pytest.param("cpu", marks=pytest.mark.native)]
    if op_triton:
        out.append(
            pytest.param(
                "triton",
                marks=pytest.mark.skipif(
                    not (HAS_TRITON and INTERPRETED), reason="Triton's CPU interpreter is not on (TRITON_INTERPRET=1)"
                ),
            )
        )
    return out


def _coefs(steps: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(steps, len(STEP_COEFS), dtype=dtype) + 0.1


# ---- sampler_step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_sampler_step_threshold_must_be_finite_positive(backend, bad):
    """A negative threshold gave x0 = +1 on cpu and -1 on the reference: every backend refuses it."""
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"sampler_step: threshold must hold finite positive values .* got "):
        sampler_step(x, m, _coefs(), 1, threshold=torch.tensor([1.5, bad]), backend=backend)


@pytest.mark.parametrize("backend", ["auto", *_backends()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sampler_step_half_threshold_is_read_as_float32(backend, dtype):
    """An fp16 threshold passed validation and then the native op rejected it under auto: every
    backend now reads it as float32 (exact) and gives the reference's numbers."""
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    coefs = _coefs()
    s = torch.tensor([1.25, 2.5], dtype=dtype)
    got = sampler_step(x, m, coefs, 1, threshold=s, return_x0=True, backend=backend)
    want = sampler_step(x, m, coefs, 1, threshold=s.float(), return_x0=True, backend="reference")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    "extra", [{}, {"philox_seed": 3}, {"threshold": "ones"}, {"cfg_scale": 2.0}, {"noise": "randn"}]
)
def test_sampler_step_empty_batch_returns_empty(backend, extra):
    """B = 0 raised a TypeError on the reference (0 rows read as 2B rows, combined with cfg_scale
    None) and an IndexError with philox_seed; every backend returns empty tensors."""
    x, m = torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4)
    kwargs = dict(extra)
    if kwargs.get("threshold") == "ones":
        kwargs["threshold"] = torch.ones(0)
    if kwargs.get("noise") == "randn":
        kwargs["noise"] = torch.randn(0, 3, 4, 4)
    x_prev, x0 = sampler_step(x, m, _coefs(), 1, return_x0=True, backend=backend, **kwargs)
    assert x_prev.shape == (0, 3, 4, 4) and x0.shape == (0, 3, 4, 4) and x_prev.dtype == x.dtype


def test_sampler_step_gradcheck_through_auto_float64():
    """With inputs that require grad, auto takes the differentiable reference (the kernels have no
    backward); its gradients are right (gradcheck in float64)."""
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    coefs = _coefs(dtype=torch.float64).requires_grad_()

    def step(x, m, noise, coefs):
        return sampler_step(x, m, coefs, 1, cfg_scale=3.0, noise=noise, return_x0=True, backend="auto")

    assert torch.autograd.gradcheck(step, (x, m, noise, coefs))


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "reference"])
@pytest.mark.parametrize("which", ["x", "model_output", "noise", "coefs"])
def test_sampler_step_explicit_kernel_refuses_inputs_that_require_grad(backend, which):
    """The cpu and triton kernels returned an output with requires_grad=True and a wrong backward
    (PyTorch only warned); they now refuse, naming the reason."""
    tensors = {
        "x": torch.randn(2, 3, 4, 4),
        "model_output": torch.randn(2, 3, 4, 4),
        "noise": torch.randn(2, 3, 4, 4),
        "coefs": _coefs(),
    }
    tensors[which].requires_grad_()
    with pytest.raises(
        BackendUnavailableError,
        match=rf"inputs require grad \({which}\): the {backend} kernel is "
        r"forward-only \(no backward\)",
    ):
        sampler_step(
            tensors["x"], tensors["model_output"], tensors["coefs"], 1, noise=tensors["noise"], backend=backend
        )
    with torch.no_grad():  # without grad mode the kernel runs
        out, _ = sampler_step(
            tensors["x"], tensors["model_output"], tensors["coefs"], 1, noise=tensors["noise"], backend=backend
        )
    assert not out.requires_grad


# ---- every op: no backend returns a graph whose backward is wrong ----------------------------------


def _grad_cases():
    B, C, H, W = 2, 4, 3, 5
    return {
        "cfg_combine": (lambda b, t: cfg_combine(t[0], 2.5, backend=b), [torch.randn(2 * B, C, H)], False),
        "conv3x3": (
            lambda b, t: conv3x3(t[0], t[1], t[2], backend=b),
            [torch.randn(B, C, H, W), torch.randn(C, C, 3, 3), torch.randn(C)],
            False,
        ),
        "group_norm_adagn": (
            lambda b, t: group_norm_adagn(t[0], 2, t[1], t[2], t[3], t[4], activation="silu", backend=b),
            [torch.randn(B, C, H, W), torch.randn(C), torch.randn(C), torch.randn(B, C), torch.randn(B, C)],
            True,
        ),
        "layer_norm_modulate": (
            lambda b, t: layer_norm_modulate(t[0], t[1], t[2], t[3], t[4], backend=b),
            [torch.randn(B, 5, C), torch.randn(C), torch.randn(C), torch.randn(B, C), torch.randn(B, C)],
            True,
        ),
        "sampler_step": (
            lambda b, t: sampler_step(t[0], t[1], t[2], 1, noise=t[3], backend=b)[0],
            [torch.randn(B, C, H, W), torch.randn(B, C, H, W), _coefs(), torch.randn(B, C, H, W)],
            True,
        ),
    }


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "reference"])
@pytest.mark.parametrize("op", sorted(_grad_cases()))
def test_no_backend_returns_a_wrong_backward(op, backend):
    """Each op on each backend that runs here, with every input requiring grad: either the backend
    refuses with a reason, or its gradients are the reference's."""
    fn, tensors, has_triton = _grad_cases()[op]
    if backend == "triton" and not has_triton:
        pytest.skip(f"{op} has no triton kernel")
    ref_in = [t.clone().requires_grad_() for t in tensors]
    out_ref = fn("reference", ref_in)
    g = torch.randn_like(out_ref)
    ref_grads = torch.autograd.grad(out_ref, ref_in, g)
    got_in = [t.clone().requires_grad_() for t in tensors]
    try:
        out = fn(backend, got_in)
    except BackendUnavailableError as exc:
        assert "require grad" in str(exc)
        return
    got_grads = torch.autograd.grad(out, got_in, g)
    for i, (a, b) in enumerate(zip(got_grads, ref_grads, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"input {i}: {m}")


# ---- torch.ops.fastdiff after `import fastdiff` ----------------------------------------------------


def _schema_names() -> list[str]:
    """Every op the native sources define (m.def("name(..."; each op's in its csrc/cpu/<op>.cpp)."""
    import re
    from pathlib import Path

    csrc = Path(fastdiff.__file__).resolve().parent.parent / "csrc"
    sources = sorted([*csrc.rglob("*.cpp"), *csrc.rglob("*.cu")])
    return [name for f in sources for name in re.findall(r'm\.def\(\s*"([a-z_0-9]+)\(', f.read_text())]


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.native
def test_every_native_op_exists_right_after_import():
    """torch.ops.fastdiff.cfg_combine was missing after `import fastdiff` until some op loaded _C."""
    names = _schema_names()
    assert {"cfg_combine", "sampler_step", "group_norm_adagn", "layer_norm_modulate", "conv3x3"} <= set(names)
    proc = _fresh_python(
        "import torch, fastdiff\n"
        f"missing = [n for n in {names!r} if not hasattr(torch.ops.fastdiff, n)]\n"
        "print('missing', missing)\n"
        "print(torch.ops.fastdiff.cfg_combine(torch.arange(4.).reshape(2, 2), 2.0).tolist())\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "missing []" in proc.stdout and "[[4.0, 5.0]]" in proc.stdout, proc.stdout


def test_import_stays_silent_and_working_when_native_cannot_load():
    """With _C unimportable, `import fastdiff` neither fails nor warns; the first op warns once and
    runs on the reference."""
    proc = _fresh_python(
        "import sys, warnings\n"
        "sys.modules['fastdiff._C'] = None  # import fails as for a missing or broken .so\n"
        "with warnings.catch_warnings(record=True) as at_import:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, fastdiff\n"
        "print('import warnings', [str(w.message) for w in at_import if 'fastdiff' in str(w.message)])\n"
        "with warnings.catch_warnings(record=True) as at_use:\n"
        "    warnings.simplefilter('always')\n"
        "    out = fastdiff.ops.cfg_combine(torch.arange(4.).reshape(2, 2), 2.0)\n"
        "print('use warnings', len([w for w in at_use if 'native extension unavailable' in str(w.message)]))\n"
        "print(out.tolist())\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "import warnings []" in proc.stdout and "use warnings 1" in proc.stdout, proc.stdout
    assert "[[4.0, 5.0]]" in proc.stdout


# ---- infinite scale in the norms -------------------------------------------------------------------

INF = float("inf")


def _norm_case(op: str, with_weight: bool, with_bias: bool, value: float):
    """x, parts with scale = value in two places (one per sample), and the op's call."""
    torch.manual_seed(1)
    B, F_ = 2, 6
    scale, shift = torch.randn(B, F_), torch.randn(B, F_)
    scale[0, 1] = value
    scale[1, 4] = value
    weight = torch.randn(F_) if with_weight else None
    bias = torch.randn(F_) if with_bias else None
    if op == "group_norm_adagn":
        x = torch.randn(B, F_, 3, 5)
        return lambda b, act: group_norm_adagn(x, 3, weight, bias, scale, shift, activation=act, backend=b)
    x = torch.randn(B, 4, F_)
    return lambda b, act: layer_norm_modulate(x, weight, bias, scale, shift, backend=b)


def _assert_matches_where_reference_is_not_nan(got: torch.Tensor, want: torch.Tensor) -> None:
    keep = ~torch.isnan(want)
    assert torch.isinf(want).any()  # the case reaches the infinite branch
    infinite = torch.isinf(want)
    bad = keep & ~(torch.isclose(got, want, rtol=1e-4, atol=1e-4) | (infinite & (got == want)))
    assert not bad.any(), f"{int(bad.sum())} of {int(keep.sum())} differ: got {got[bad][:6]}, want {want[bad][:6]}"


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "reference"])
@pytest.mark.parametrize("value", [INF, -INF])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_adagn_infinite_scale_gives_the_references_infinities(
    backend, value, with_weight, with_bias, activation
):
    """scale = +-Inf gave NaN (0 * Inf in the folded offset bias * (1 + s) + t) where the reference's
    (n * w + bias) * (1 + s) is +-Inf; every backend now matches it wherever it is not NaN."""
    call = _norm_case("group_norm_adagn", with_weight, with_bias, value)
    _assert_matches_where_reference_is_not_nan(call(backend, activation), call("reference", activation))


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "reference"])
@pytest.mark.parametrize("value", [INF, -INF])
@pytest.mark.parametrize("with_weight", [False, True])
def test_layer_norm_modulate_infinite_scale_gives_the_references_infinities(backend, value, with_weight):
    """DiT's adaLN (no LayerNorm bias): scale = +-Inf gave NaN from 0 * Inf in the offset. With a
    LayerNorm bias the fold can still cancel two infinities (documented in
    csrc/common/layer_norm_modulate.h), so that case is not claimed."""
    call = _norm_case("layer_norm_modulate", with_weight, False, value)
    _assert_matches_where_reference_is_not_nan(call(backend, None), call("reference", None))


# ---- empty inputs and integer parts: every backend agrees -----------------------------------------


def _outcome(fn):
    try:
        out = fn()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return "ok", (tuple(out.shape), out.dtype)


def _agree(fn_of_backend, backends):
    outcomes = {b: _outcome(lambda b=b: fn_of_backend(b)) for b in backends}
    assert len(set(outcomes.values())) == 1, outcomes
    return next(iter(outcomes.values()))


def _runnable(op_triton: bool = True) -> list[str]:
    names = ["auto", "reference"]
    if NATIVE:
        names.append("cpu")
    if op_triton and HAS_TRITON and INTERPRETED:
        names.append("triton")
    return names


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3), (2, 4, 0, 0), (3, 4, 0)])
@pytest.mark.parametrize("with_parts", [False, True])
def test_group_norm_adagn_empty_input_is_empty_on_every_backend(shape, with_parts):
    """C = 0 or no pixels: the kernels returned an empty tensor, the reference raised from F.group_norm."""
    x = torch.randn(shape)
    B, C = shape[:2]
    parts = (torch.randn(C), torch.randn(C), torch.randn(B, C), torch.randn(B, C)) if with_parts else ()
    kind, detail = _agree(
        lambda b: group_norm_adagn(x, 2 if C else 1, *parts, activation="silu", backend=b), _runnable()
    )
    assert (kind, detail) == ("ok", (shape, torch.float32))


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_layer_norm_modulate_empty_input_agrees_on_every_backend(shape):
    x = torch.randn(shape)
    B, _, D = shape
    kind, detail = _agree(
        lambda b: layer_norm_modulate(
            x, torch.randn(D), torch.randn(D), torch.randn(B, D), torch.randn(B, D), backend=b
        ),
        _runnable(),
    )
    if D == 0:
        assert kind == "ValueError" and "D >= 1 features" in detail
    else:
        assert (kind, detail) == ("ok", (shape, torch.float32))


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "expect"),
    [
        ((0, 4, 5, 5), (3, 4, 3, 3), "ok"),
        ((2, 0, 5, 5), (3, 0, 3, 3), "C_in >= 1"),
        ((2, 4, 0, 5), (3, 4, 3, 3), "H and W >= 1"),
        ((2, 4, 5, 5), (0, 4, 3, 3), "C_out >= 1"),
    ],
)
def test_conv3x3_empty_input_agrees_on_every_backend(x_shape, w_shape, expect):
    """C_out = 0 returned an empty map on cpu (also through auto's fast path) and raised in F.conv2d."""
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    kind, detail = _agree(lambda b: conv3x3(x, w, backend=b), _runnable(op_triton=False))
    if expect == "ok":
        assert kind == "ok" and detail[0] == (0, 3, 5, 5)
    else:
        assert kind == "ValueError" and expect in detail


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (4, 3, 0), (3, 2)])
def test_cfg_combine_empty_input_agrees_on_every_backend(shape):
    x = torch.randn(shape)
    kind, detail = _agree(lambda b: cfg_combine(x, 2.0, backend=b), _runnable(op_triton=False))
    if shape[0] in (0, 3):
        assert kind == "ValueError" and "even number (>= 2) of rows" in detail
    else:
        assert (kind, detail) == ("ok", ((shape[0] // 2, *shape[1:]), torch.float32))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("op", ["group_norm_adagn", "layer_norm_modulate"])
def test_integer_and_bool_norm_parts_are_refused_by_every_backend(op, dtype):
    """group_norm_adagn's reference took integer and bool parts and its kernels refused them by
    dtype; both ops now refuse them on every backend, naming the part."""
    names = (
        ("weight", "bias", "scale", "shift", "pre_shift")
        if op == "group_norm_adagn"
        else ("weight", "bias", "scale", "shift")
    )
    for name in names:
        if op == "group_norm_adagn":
            x = torch.randn(2, 4, 3, 3)
            part = torch.randint(0, 2, (4,) if name in ("weight", "bias") else (2, 4)).to(dtype)
            call = lambda b, name=name, part=part, x=x: group_norm_adagn(x, 2, backend=b, **{name: part})  # noqa: E731
        else:
            x = torch.randn(2, 3, 4)
            part = torch.randint(0, 2, (4,) if name in ("weight", "bias") else (2, 4)).to(dtype)
            call = lambda b, name=name, part=part, x=x: layer_norm_modulate(x, backend=b, **{name: part})  # noqa: E731
        kind, detail = _agree(call, _runnable())
        assert kind == "TypeError" and f"{op}: {name} must be a floating tensor, got {dtype}" in detail


@pytest.mark.native
def test_conv3x3_inf_input_gives_nan_on_cpu_only_where_the_reference_is_infinite():
    """Documented in conv3x3's docstring: Winograd's transforms turn an Inf into NaN, over exactly the
    outputs where the reference is +-Inf; everything else matches."""
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    x[0, 0, 3, 4] = INF
    ref, got = conv3x3(x, w, backend="reference"), conv3x3(x, w, backend="cpu")
    assert (torch.isfinite(got) == torch.isfinite(ref)).all()
    torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], rtol=1e-4, atol=1e-4)
    assert "Inf - Inf is NaN" in conv3x3.__doc__


@pytest.mark.parametrize("backend", ["auto", *_backends()])
@pytest.mark.parametrize("shape", [(1, 3), (1, 4, 1, 1)])
def test_group_norm_adagn_one_value_per_group_is_zero_on_every_backend(backend, shape):
    """Found by the fuzz tier: with one value per group (B = 1, C = num_groups, no pixels) the
    reference raised F.group_norm's batch-norm size check ("Expected more than 1 value per channel
    when training", naming no argument) while the kernels returned the norm, which is 0 there."""
    x = torch.randn(shape)
    bias, shift = torch.randn(shape[1]), torch.randn(1, shape[1])
    out = group_norm_adagn(x, shape[1], None, bias, shift=shift, backend=backend)
    torch.testing.assert_close(out, (bias + shift[0]).view(shape), rtol=0, atol=0)
