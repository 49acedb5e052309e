"""Every public op in fastdiff.ops, on every backend that declares it can run a drawn input, against
the reference in float64 (the property of strategies.check_output). Triton runs in its CPU
interpreter on small shapes, in tests of its own with fewer examples."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis", reason="the fuzz tier needs hypothesis (pip install -e '.[test]')")
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import ops
from fastdiff.backends import select_backend
from fastdiff.reference import attention as ref_attention
from fastdiff.reference import conv3x3 as ref_conv3x3
from fastdiff.reference import group_norm_adagn as ref_group_norm_adagn
from fastdiff.reference import layer_norm_modulate as ref_layer_norm_modulate
from fastdiff.reference.guidance import cfg_combine as ref_cfg_combine
from fastdiff.reference.sampler_step import sampler_step as ref_sampler_step
from fastdiff.sampling import DDIMSampler, DDPMSampler

from .bounds import norm_statistics_overflow, winograd_conv3x3_bound
from .strategies import (
    FLOAT_DTYPES,
    Values,
    check_output,
    consistent,
    dtypes,
    examples,
    run_backends,
    sizes,
    to_exact,
    values,
)

SUPPORT = {name: sys.modules[f"fastdiff.ops.{name}"].SUPPORT for name in ops.__all__}
NON_TRITON = {name: tuple(b for b in s.backends if b != "triton") + ("auto",) for name, s in SUPPORT.items()}


@dataclasses.dataclass
class Case:
    """One drawn call: the spec (printed by hypothesis) and the tensors built from it."""

    op: str
    spec: dict[str, Any]
    args: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"Case({self.op}, {self.spec})"


def _check(case: Case, call, reference, backends, inputs, masks=None, outputs=lambda out: (out,), slack=None) -> None:
    """Run the backends, require consistent acceptance, and hold each result to the float64 reference.

    ``reference(mode)``: "exact" (float64 inputs), "eager" (the input dtype, no upcast: sets the
    tolerance) or "documented" (the reference backend's float32 math). ``masks(backend)`` gives the
    documented exceptions of that backend as keyword arguments of check_output (nan_ok, zero_ok, free,
    allowance, overflow_ok); ``slack`` adds a documented error to eager's."""
    what = repr(case)
    outcomes = run_backends(SUPPORT[case.op], inputs, call, backends, what)
    if not consistent(outcomes, what):
        return
    exact, eager, documented = (outputs(reference(mode)) for mode in ("exact", "eager", "documented"))
    if slack is not None:  # widen eager's error by the documented one: away from the exact value
        eager = tuple(
            (e.double() + torch.where(e.double() >= x, 1.0, -1.0) * d).to(e.dtype)
            for e, x, d in zip(eager, exact, outputs(slack()), strict=True)
        )
    for o in outcomes:
        exceptions = masks(o.backend) if masks is not None else {}
        for i, (out, ex, ea, doc) in enumerate(zip(outputs(o.out), exact, eager, documented, strict=True)):
            check_output(out, ea, ex, f"{what} output {i}", o.backend, documented=doc, **exceptions)


def _call_reference(fn, mode, *args, **kwargs):
    """The reference ``fn`` in ``mode`` (see _check) on the given arguments."""
    if mode == "exact":
        return fn(*(to_exact(a) for a in args), **{k: to_exact(v) for k, v in kwargs.items()})
    return fn(*args, **kwargs, upcast=mode == "documented")


# ---- cfg_combine ------------------------------------------------------------------------------------


@st.composite
def cfg_cases(draw) -> Case:
    B = draw(st.sampled_from((1, 2, 3)))
    rest = tuple(draw(st.lists(sizes, max_size=3)))
    spec = dict(
        shape=(2 * B, *rest),
        dtype=draw(dtypes),
        model_out=draw(values()),
        scale=draw(st.sampled_from((0.0, 1.0, 4.0, 7.5, -2.0, 1e-3, 1e6))),
    )
    return Case("cfg_combine", spec)


@settings(max_examples=examples(100))
@given(case=cfg_cases())
def test_cfg_combine(case):
    s = case.spec
    m = s["model_out"].build(s["shape"], s["dtype"])
    _check(
        case,
        lambda b: ops.cfg_combine(m, s["scale"], backend=b),
        lambda mode: _call_reference(ref_cfg_combine, mode, m, s["scale"]),
        NON_TRITON["cfg_combine"],
        {"model_out": m},
    )


# ---- group_norm_adagn -------------------------------------------------------------------------------

GN_PARTS = ("weight", "bias", "scale", "shift", "pre_shift")
# Part dtypes beyond the documented ones (x's dtype or float32), for the edge tests.
PART_DTYPES = (torch.int64, torch.int32, torch.bool, torch.float64, torch.float16, torch.bfloat16)


@st.composite
def group_norm_cases(draw, *, special_x=True, special_parts=False, small=False, edge=False) -> Case:
    """``edge``: empty dims (B, C or a spatial size 0) and parts of any dtype (int, bool, another float)."""
    B = draw(st.sampled_from((0, 1, 2) if edge else (1, 2, 3)))
    G = draw(st.sampled_from((1, 2, 3, 4)))
    C = G * draw(st.sampled_from((0, 1, 2) if edge else (1, 2, 3, 5)))
    dims = st.sampled_from((0, 1, 3)) if edge else st.sampled_from((1, 2, 3, 5, 7)) if small else sizes
    spatial = tuple(draw(st.lists(dims, max_size=2 if small or edge else 3)))
    dtype = draw(dtypes)
    parts = {}
    for name in GN_PARTS:
        if draw(st.booleans()):
            part_dtype = draw(st.sampled_from((dtype, torch.float32) + (PART_DTYPES if edge else ())))
            parts[name] = (draw(values(specials=special_parts, constant=False)), part_dtype)
    spec = dict(
        shape=(B, C, *spatial),
        G=G,
        dtype=dtype,
        x=draw(values(specials=special_x)),
        parts=parts,
        eps=draw(st.sampled_from((1e-5, 1e-6, 0.0, 1.0))),
        activation=draw(st.sampled_from((None, "silu"))),
    )
    return Case("group_norm_adagn", spec)


def _group_norm(case: Case, backends) -> None:
    s = case.spec
    B, C = s["shape"][:2]
    x = s["x"].build(s["shape"], s["dtype"])
    parts = {n: v.build((C,) if n in ("weight", "bias") else (B, C), d) for n, (v, d) in s["parts"].items()}

    def reference(mode):
        return _call_reference(ref_group_norm_adagn, mode, x, s["G"], **parts, eps=s["eps"], activation=s["activation"])

    _check(
        case,
        lambda b: ops.group_norm_adagn(x, s["G"], **parts, eps=s["eps"], activation=s["activation"], backend=b),
        reference,
        backends,
        {"x": x, **parts},
        masks=_group_norm_masks(x, s["G"], parts),
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_norm_masks(x: torch.Tensor, groups: int, parts: dict[str, torch.Tensor]):
    """The documented exception (README): where a group's statistics overflow the kernels' math type
    (fuzz.bounds.norm_statistics_overflow), the kernels give NaN for the group."""
    if not x.numel() or not x.dtype.is_floating_point:
        return None
    B, C = x.shape[:2]
    u = x.to(torch.float64)
    pre = parts.get("pre_shift")
    if pre is not None and pre.is_floating_point():
        u = u + pre.to(torch.float64).view(B, C, *([1] * (x.dim() - 2)))
    per_group = norm_statistics_overflow(u.reshape(B, groups, -1), _compute_dtype(x.dtype))
    if not per_group.any():
        return None
    overflow = per_group.repeat_interleave(C // groups, dim=1).view(B, C, *([1] * (x.dim() - 2))).expand(x.shape)

    def masks(backend: str):
        return {"overflow_ok": overflow} if backend != "reference" else {}

    return masks


@settings(max_examples=examples(100))
@given(case=group_norm_cases())
def test_group_norm_adagn(case):
    """Special values, constant groups and layouts in x; finite parts in x's dtype or float32."""
    _group_norm(case, NON_TRITON["group_norm_adagn"])


@settings(max_examples=examples(60))
@given(case=group_norm_cases(special_x=False, special_parts=True))
def test_group_norm_adagn_special_parts(case):
    """Special values (Inf, NaN, huge) in weight, bias, scale, shift, pre_shift."""
    _group_norm(case, NON_TRITON["group_norm_adagn"])


@settings(max_examples=examples(50))
@given(case=group_norm_cases(special_x=False, edge=True))
def test_group_norm_adagn_empty_and_part_dtypes(case):
    """Empty inputs and int/bool/other-float parts: every backend rejects them alike or matches."""
    _group_norm(case, NON_TRITON["group_norm_adagn"])


@settings(max_examples=examples(20))
@given(case=group_norm_cases(small=True))
def test_group_norm_adagn_triton(case):
    _group_norm(case, ("reference", "triton"))


# ---- layer_norm_modulate ----------------------------------------------------------------------------

LN_PARTS = ("weight", "bias", "scale", "shift")


@st.composite
def layer_norm_cases(draw, *, special_x=True, special_parts=False, small=False, edge=False) -> Case:
    """``edge``: empty dims (B, N or D 0) and parts of any dtype (int, bool, another float)."""
    B = draw(st.sampled_from((0, 1, 2) if edge else (1, 2, 3)))
    N = draw(st.sampled_from((0, 1, 3)) if edge else st.sampled_from((1, 2, 3, 5, 7)) if small else sizes)
    D = draw(st.sampled_from((0, 1, 3) if edge else (1, 3, 8, 13) if small else (1, 2, 3, 7, 8, 13, 16, 40)))
    dtype = draw(dtypes)
    parts = {}
    for name in LN_PARTS:
        if draw(st.booleans()):
            parts[name] = (
                draw(values(specials=special_parts, constant=False)),
                draw(st.sampled_from((dtype, torch.float32) + (PART_DTYPES if edge else ()))),
            )
    spec = dict(
        shape=(B, N, D),
        dtype=dtype,
        x=draw(values(specials=special_x)),
        parts=parts,
        eps=draw(st.sampled_from((1e-6, 1e-5, 0.0, 1.0))),
    )
    return Case("layer_norm_modulate", spec)


def _layer_norm(case: Case, backends) -> None:
    s = case.spec
    B, N, D = s["shape"]
    x = s["x"].build(s["shape"], s["dtype"])
    parts = {n: v.build((D,) if n in ("weight", "bias") else (B, D), d) for n, (v, d) in s["parts"].items()}

    def reference(mode):
        return _call_reference(ref_layer_norm_modulate, mode, x, **parts, eps=s["eps"])

    _check(
        case,
        lambda b: ops.layer_norm_modulate(x, **parts, eps=s["eps"], backend=b),
        reference,
        backends,
        {"x": x, **parts},
        masks=_layer_norm_masks(x, parts),
    )


def _layer_norm_masks(x: torch.Tensor, parts: dict[str, torch.Tensor]):
    """The documented exceptions (README's op table): the native kernels, given an infinite ``scale``
    and a LayerNorm ``bias``, give NaN where the reference gives +-Inf; and where a row's statistics
    overflow the kernels' math type (fuzz.bounds.norm_statistics_overflow), every kernel gives NaN
    for the row."""
    if not x.numel() or not x.dtype.is_floating_point:
        return None
    infinite = None
    if "scale" in parts and "bias" in parts and parts["scale"].is_floating_point():
        infinite = parts["scale"].isinf().unsqueeze(1).expand(x.shape)
    per_row = norm_statistics_overflow(x, _compute_dtype(x.dtype))
    overflow = per_row.unsqueeze(-1).expand(x.shape) if per_row.any() else None
    if infinite is None and overflow is None:
        return None

    def masks(backend: str):
        out = {}
        if infinite is not None and backend in ("cpu", "cuda", "auto"):
            out["nan_ok"] = infinite
        if overflow is not None and backend != "reference":
            out["overflow_ok"] = overflow
        return out

    return masks


@settings(max_examples=examples(100))
@given(case=layer_norm_cases())
def test_layer_norm_modulate(case):
    _layer_norm(case, NON_TRITON["layer_norm_modulate"])


@settings(max_examples=examples(60))
@given(case=layer_norm_cases(special_x=False, special_parts=True))
def test_layer_norm_modulate_special_parts(case):
    _layer_norm(case, NON_TRITON["layer_norm_modulate"])


@settings(max_examples=examples(50))
@given(case=layer_norm_cases(special_x=False, edge=True))
def test_layer_norm_modulate_empty_and_part_dtypes(case):
    """Empty inputs and int/bool/other-float parts: every backend rejects them alike or matches."""
    _layer_norm(case, NON_TRITON["layer_norm_modulate"])


@settings(max_examples=examples(20))
@given(case=layer_norm_cases(small=True))
def test_layer_norm_modulate_triton(case):
    _layer_norm(case, ("reference", "triton"))


# ---- attention --------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw, *, small=False) -> Case:
    B = draw(st.sampled_from((1, 2)))
    H = draw(st.sampled_from((1, 2, 3)))
    Nq = draw(st.sampled_from((1, 2, 7, 13, 16) if small else (1, 2, 7, 13, 16, 33, 64)))
    cross = draw(st.booleans())
    Nk = draw(st.sampled_from((1, 7, 77) if not small else (1, 5, 77))) if cross else Nq
    D = draw(st.sampled_from((8, 16, 40) if small else (1, 3, 8, 16, 40, 64, 80)))
    layouts = ("contiguous", "transposed", "strided", "rowpadded", "offset", "expanded")
    spec = dict(
        B=B,
        H=H,
        Nq=Nq,
        Nk=Nk,
        D=D,
        cross=cross,
        dtype=draw(dtypes),
        q=draw(values(layouts=layouts)),
        k=draw(values(layouts=layouts)),
        v=draw(values(layouts=layouts)),
        heads_last=draw(st.booleans()),  # q/k/v as views of (B, N, H, D) memory, as models make them
        scale=draw(st.sampled_from((None, None, 0.125, 1.0, 10.0))),
    )
    return Case("attention", spec)


def _attention(case: Case, backends) -> None:
    s = case.spec

    def make(v: Values, n: int) -> torch.Tensor:
        if s["heads_last"]:
            return v.build((s["B"], n, s["H"], s["D"]), s["dtype"]).transpose(1, 2)
        return v.build((s["B"], s["H"], n, s["D"]), s["dtype"])

    q = make(s["q"], s["Nq"])
    k, v = make(s["k"], s["Nk"]), make(s["v"], s["Nk"])

    def reference(mode):
        return _call_reference(ref_attention, mode, q, k, v, scale=s["scale"])

    _check(
        case,
        lambda b: ops.attention(q, k, v, s["scale"], backend=b),
        reference,
        backends,
        {"q": q, "k": k, "v": v},
        masks=_attention_masks(q, k, s["scale"]),
    )


def _attention_masks(q: torch.Tensor, k: torch.Tensor, scale: float | None):
    """The documented exception (ops.attention's docstring): on CPU tensors, PyTorch's SDPA (the sdpa
    backend, and auto where it picks it) treats NaN scores as masked out (-Inf), and returns 0 for a
    query row with no score left (every score NaN or -Inf) where the reference gives NaN. Exactly
    those rows may be 0 there: by the float64 reference's scores, or by the reference's float32 math
    (where a score that is finite in float64 overflows to -Inf, and the documented math is NaN too)."""
    if q.device.type != "cpu":
        return None
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])

    def no_score_left(compute: torch.dtype) -> torch.Tensor:
        scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * s  # as the reference
        return (scores.isnan() | (scores == float("-inf"))).all(-1, keepdim=True)

    rows = no_score_left(torch.float64) | no_score_left(torch.promote_types(q.dtype, torch.float32))
    zero_ok = rows.expand(q.shape)

    def masks(backend: str):
        if backend == "auto":
            backend = select_backend("attention", "auto", {"q": q, "k": k, "v": k})
        return {"zero_ok": zero_ok} if backend == "sdpa" else {}

    return masks


@settings(max_examples=examples(80))
@given(case=attention_cases())
def test_attention(case):
    _attention(case, NON_TRITON["attention"])


@settings(max_examples=examples(20))
@given(case=attention_cases(small=True))
def test_attention_triton(case):
    _attention(case, ("reference", "triton"))


# ---- conv3x3 ----------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw, edge=False) -> Case:
    """``edge``: empty dims (N, C_in, C_out, H or W 0)."""
    N = draw(st.sampled_from((0, 1, 2) if edge else (1, 2, 3)))
    C_in = draw(st.sampled_from((0, 1, 3) if edge else (1, 2, 3, 4, 8, 16, 17, 32)))
    C_out = draw(st.sampled_from((0, 1, 3) if edge else (1, 2, 3, 5, 8, 16, 33)))
    H, W = (draw(st.sampled_from((0, 1, 4))), draw(st.sampled_from((0, 1, 4)))) if edge else (draw(sizes), draw(sizes))
    dtype = draw(
        st.sampled_from((torch.float32, torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64))
    )
    spec = dict(
        x_shape=(N, C_in, H, W),
        C_out=C_out,
        dtype=dtype,
        x=draw(values()),
        weight=draw(values(layouts=("contiguous", "channels_last", "transposed", "offset"))),
        bias=draw(st.none() | values(constant=False)),
        residual=draw(st.none() | values()),
    )
    return Case("conv3x3", spec)


def _conv_masks(x: torch.Tensor, weight: torch.Tensor):
    """Documented exceptions. An output channel whose filter has a non-finite tap is free on every
    backend: whether the zero padding is multiplied by it (0 * Inf = NaN) is the convolution
    implementation's choice (F.conv2d in float64 does, oneDNN in float32 does not). On the cpu
    backend (Winograd F(2x2, 3x3)), and on auto where it picks cpu:

    * a non-finite input may turn into NaN over the output tiles it reaches, within 2 pixels of it,
      where the reference gives +-Inf (README's op table);
    * the error is bounded relative to each filter's largest tap times the largest input of each
      output's window, not tap by tap (the op's docstring; bounds.winograd_conv3x3_bound derives
      it): that bound is added to the dtype rule's, and where its intermediates may overflow float32
      a non-finite output is accepted."""
    bad_w = (~weight.isfinite()).flatten(1).any(1).view(1, -1, 1, 1).expand(x.shape[0], -1, x.shape[2], x.shape[3])
    bad_x = (~x.isfinite()).any(1, keepdim=True).to(torch.float32)
    near = (F.max_pool2d(bad_x, 5, stride=1, padding=2) > 0).expand_as(bad_w) if bad_x.numel() else bad_w
    winograd: dict[str, torch.Tensor] = {}

    def masks(backend: str):
        if backend == "auto":
            backend = select_backend("conv3x3", "auto", {"x": x, "weight": weight})
        if backend != "cpu":
            return {"free": bad_w}
        if not winograd:
            winograd["allowance"], winograd["overflow_ok"] = winograd_conv3x3_bound(x, weight)
        return {"nan_ok": near, "free": bad_w, **winograd}

    return masks


@settings(max_examples=examples(80))
@given(case=conv_cases())
def test_conv3x3(case):
    _conv3x3(case)


@settings(max_examples=examples(30))
@given(case=conv_cases(edge=True))
def test_conv3x3_empty(case):
    """Empty inputs: every backend rejects them alike, or all return the same empty result."""
    _conv3x3(case)


def _conv3x3(case: Case) -> None:
    s = case.spec
    N, C_in, H, W = s["x_shape"]
    x = s["x"].build(s["x_shape"], s["dtype"])
    # A filter of unit gain: the special values of x stay the interesting ones.
    weight = s["weight"].build((s["C_out"], C_in, 3, 3), s["dtype"]) / 3
    bias = s["bias"].build((s["C_out"],), s["dtype"]) if s["bias"] is not None else None
    residual = s["residual"].build((N, s["C_out"], H, W), s["dtype"]) if s["residual"] is not None else None

    def reference(mode):  # F.conv2d has no upcast switch: eager and documented are the same
        if mode == "exact":
            return ref_conv3x3(to_exact(x), to_exact(weight), to_exact(bias), to_exact(residual))
        return ref_conv3x3(x, weight, bias, residual)

    _check(
        case,
        lambda b: ops.conv3x3(x, weight, bias, residual, backend=b),
        reference,
        NON_TRITON["conv3x3"],
        {"x": x, "weight": weight},
        masks=_conv_masks(x, weight),
    )


# ---- sampler_step -----------------------------------------------------------------------------------

SCHEDULE = fastdiff.Schedule("linear")


@st.composite
def sampler_step_cases(draw, *, small=False, dtypes_=FLOAT_DTYPES, edge=False) -> Case:
    """``edge``: empty batches, and thresholds of any sign and float dtype."""
    kind = draw(st.sampled_from(("ddim", "ddpm")))
    variance = draw(
        st.sampled_from((None, "learned_range") if kind == "ddim" else ("fixed_small", "fixed_large", "learned_range"))
    )
    steps = draw(st.integers(1, 12))
    B = draw(st.sampled_from((0, 1, 2) if edge else (1, 2, 3)))
    C = draw(st.sampled_from((1, 2, 3, 4)))
    spatial = tuple(draw(st.lists(st.sampled_from((1, 2, 3, 5, 7)) if small else sizes, max_size=2)))
    dtype = draw(st.sampled_from(dtypes_))
    guided = draw(st.booleans())
    noise = draw(st.sampled_from(("none", "tensor", "philox")))
    clip_kind = draw(st.sampled_from(("threshold",) if edge else ("none", "none", "clip", "threshold")))
    threshold_dtypes = FLOAT_DTYPES if edge else (dtype, torch.float32)
    spec = dict(
        sampler=kind,
        prediction=draw(st.sampled_from(("eps", "v", "x0"))),
        variance=variance,
        eta=draw(st.sampled_from((0.0, 0.5, 1.0))) if kind == "ddim" else 0.0,
        steps=steps,
        step=draw(st.integers(0, steps - 1)),
        step_tensor=draw(st.booleans()),
        shape=(B, C, *spatial),
        dtype=dtype,
        x=draw(values()),
        model_output=draw(values()),
        # the variance channels (learned_range): in [-1, 1] as a model gives them, raw, or all NaN or
        # Inf (DDIM drops them, and no step without noise may read them)
        variance_channels=draw(st.sampled_from(("tanh", "raw", "nan", "inf", "huge"))),
        cfg_scale=draw(st.sampled_from((1.0, 4.0, 0.0, -1.5))) if guided else None,
        noise=draw(values()) if noise == "tensor" else None,
        philox_seed=draw(st.integers(0, 2**63 - 1)) if noise == "philox" else None,
        clip=draw(st.sampled_from((1.0, 0.5, 3.0))) if clip_kind == "clip" else None,
        threshold=(
            draw(values(specials=edge, constant=False)),
            draw(st.sampled_from(threshold_dtypes)),
            draw(st.sampled_from((1.0, -1.0, 0.0) if edge else (1.0,))),
        )
        if clip_kind == "threshold"
        else None,
        return_x0=draw(st.booleans()),
    )
    return Case("sampler_step", spec)


def _step_inputs(case: Case):
    """The tensors and keyword arguments of a drawn sampler_step case."""
    s = case.spec
    cls = DDIMSampler if s["sampler"] == "ddim" else DDPMSampler
    kw = dict(prediction=s["prediction"], variance=s["variance"], dtype=s["dtype"])
    if s["sampler"] == "ddim":
        kw["eta"] = s["eta"]
    coefs = cls(SCHEDULE, s["steps"], **kw).coefs
    B, C = s["shape"][:2]
    x = s["x"].build(s["shape"], s["dtype"])
    rows = 2 * B if s["cfg_scale"] is not None else B
    channels = 2 * C if s["variance"] == "learned_range" else C
    m = s["model_output"].build((rows, channels, *s["shape"][2:]), s["dtype"])
    if channels == 2 * C and s["variance_channels"] != "raw":
        var = {
            "tanh": lambda v: torch.tanh(v.float()),  # the usual range of the variance channels, [-1, 1]
            "nan": lambda v: torch.full_like(v, float("nan")),
            "inf": lambda v: torch.full_like(v, float("inf")),
            "huge": lambda v: torch.full_like(v, 20.0),  # finite, far outside [-1, 1]
        }[s["variance_channels"]](m[:, C:])
        m = torch.cat([m[:, :C], var.to(m.dtype)], dim=1)
    noise = s["noise"].build(s["shape"], s["dtype"]) if s["noise"] is not None else None
    threshold = None
    if s["threshold"] is not None:
        spec, tdtype, sign = s["threshold"]
        # a positive threshold per image; in the edge test also negative ones and zeros (sign 0)
        threshold = ((spec.build((B,), tdtype).abs() + 0.5) * sign).to(tdtype)
    kwargs = dict(
        cfg_scale=s["cfg_scale"],
        learned_range=s["variance"] == "learned_range",
        clip=s["clip"],
        threshold=threshold,
        noise=noise,
        philox_seed=s["philox_seed"],
    )
    return x, m, coefs, kwargs


def _sampler_step(case: Case, backends) -> None:
    s = case.spec
    x, m, coefs, kwargs = _step_inputs(case)
    step = torch.tensor(s["step"]) if s["step_tensor"] else s["step"]

    def reference(mode, **override):
        return _call_reference(ref_sampler_step, mode, x, m, coefs, s["step"], **{**kwargs, **override})

    def philox_slack():
        """The native and Triton kernels draw Philox normals with float32 Box-Muller (documented in
        csrc/common/philox.h); the reference in float64. Allow a few float32 ulps of the noise term."""
        z = torch.zeros_like(to_exact(x))
        noise_term = [
            a - b for a, b in zip(reference("exact"), reference("exact", philox_seed=None, noise=z), strict=True)
        ]
        return tuple(t.abs().nan_to_num(0.0) * 2.0**-20 for t in noise_term)

    _check(
        case,
        lambda b: ops.sampler_step(x, m, coefs, step, **kwargs, return_x0=s["return_x0"], backend=b),
        reference,
        backends,
        {"x": x, "model_output": m},
        outputs=lambda out: out if s["return_x0"] else out[:1],
        slack=philox_slack if s["philox_seed"] is not None else None,
    )


@settings(max_examples=examples(150))
@given(case=sampler_step_cases())
def test_sampler_step(case):
    _sampler_step(case, NON_TRITON["sampler_step"])


@settings(max_examples=examples(60))
@given(case=sampler_step_cases(edge=True))
def test_sampler_step_empty_and_thresholds(case):
    """Empty batches and thresholds of any sign and float dtype: rejected alike, or matching."""
    _sampler_step(case, NON_TRITON["sampler_step"])


@settings(max_examples=examples(20))
@given(case=sampler_step_cases(small=True, dtypes_=(torch.float32, torch.float16, torch.bfloat16, torch.float64)))
def test_sampler_step_triton(case):
    _sampler_step(case, ("reference", "triton"))


@settings(max_examples=examples(60))
@given(case=sampler_step_cases())
def test_sampler_loop_step(case):
    """The loop's step is sampler_step written in place: on every backend, both halves of x_in hold that
    backend's sampler_step result bit for bit (same kernel, same element order), the counter advances
    and the model's timestep input takes the next timestep; an input one refuses, the other refuses."""
    s = case.spec
    x, m, coefs, kwargs = _step_inputs(case)
    x = x.contiguous()  # the loop's x_in is contiguous: compare in the same element order
    threshold = kwargs["threshold"]
    # The loop step does not read threshold values on the host (a sync per step); fastdiff.sample
    # clamps them to >= 1. sampler_step's refusal of other values is fuzzed above.
    assume(threshold is None or bool((torch.isfinite(threshold) & (threshold > 0)).all()))
    B, guided = x.shape[0], kwargs["cfg_scale"] is not None
    timesteps = torch.arange(s["steps"], dtype=torch.int64) * 7 + 3
    loop_kwargs = dict(
        kwargs,
        cfg_scale=torch.tensor(kwargs["cfg_scale"], dtype=torch.float64) if guided else None,
        philox_seed=torch.tensor(s["philox_seed"]) if s["philox_seed"] is not None else None,
    )
    for backend in NON_TRITON["sampler_loop_step"]:
        try:
            expected, _ = ops.sampler_step(x, m, coefs, s["step"], **kwargs, backend=backend)
        except Exception as exc:  # noqa: BLE001 - whatever sampler_step refuses, the loop step refuses
            with pytest.raises(Exception):  # noqa: B017
                ops.sampler_loop_step(
                    torch.cat([x, x]) if guided else x.clone(),
                    m,
                    coefs,
                    torch.tensor(s["step"]),
                    **loop_kwargs,
                    backend=backend,
                )
            note(f"{backend}: both refuse ({exc})")
            continue
        x_in = torch.cat([x, x]) if guided else x.clone()
        counter = torch.tensor(s["step"])
        t_in = torch.full((x_in.shape[0],), -1, dtype=torch.int64)
        ops.sampler_loop_step(x_in, m, coefs, counter, **loop_kwargs, t_in=t_in, timesteps=timesteps, backend=backend)
        what = f"{case!r} on {backend}"
        torch.testing.assert_close(x_in[:B], expected, rtol=0, atol=0, equal_nan=True, msg=what)
        if guided:
            torch.testing.assert_close(x_in[B:], expected, rtol=0, atol=0, equal_nan=True, msg=what)
        assert int(counter) == s["step"] + 1, what
        last = s["step"] + 1 == s["steps"]
        assert t_in.tolist() == [-1 if last else int(timesteps[s["step"] + 1])] * x_in.shape[0], what


def test_fuzz_covers_every_public_op():
    """A new public op needs a fuzz test here."""
    covered = {
        "cfg_combine",
        "group_norm_adagn",
        "layer_norm_modulate",
        "attention",
        "conv3x3",
        "sampler_step",
        "sampler_loop_step",
    }
    assert set(ops.__all__) == covered
