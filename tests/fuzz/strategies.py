"""The fuzz tier's strategies and its one property: every backend that says it can run a drawn input
matches the float64 reference there, and every backend that cannot says why.

Inputs are drawn as small, printable specs (a seed, a scale, a layout, a few special values at
chosen places) and built into tensors from them, so that hypothesis' minimal falsifying example is
a readable reproducer rather than a tensor dump. ``Case.__repr__`` prints the spec.

The property (:func:`check_output`), against ``exact`` (the reference run on the same inputs in
float64) and ``eager`` (the reference in the input dtype, without upcasting):

* where ``exact`` is finite and representable in the output dtype: the tolerance rule of
  tests/conftest.py, ``err(out) <= 2 * err(eager) + floor(dtype)`` (an eager element that is itself
  non-finite there is replaced by the rounded exact value, so an eager overflow cannot make the bound
  infinite or NaN);
* where ``exact`` is finite but overflows the output dtype: ``out`` is not NaN and has its sign;
* where ``exact`` is +-Inf: ``out`` is the same infinity (a documented exception mask may allow NaN);
* where ``exact`` is NaN: ``out`` is NaN or +-Inf (the math is undefined there, but a finite number
  would hide that).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from conftest import FLOOR, assert_within_eager_bound
from hypothesis import strategies as st

from fastdiff.backends import BackendUnavailableError, ExplicitOnly, OpSupport

LONG = os.environ.get("FASTDIFF_FUZZ", "") == "long"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Sizes that break kernels: 1, primes, non-powers of two, and a few powers of two for the fast paths.
SIZES = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17) if not LONG else (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33, 40)
SPECIALS = ("nan", "inf", "-inf", "huge", "-huge", "tiny", "zero")
LAYOUTS = ("contiguous", "channels_last", "transposed", "strided", "rowpadded", "offset", "expanded")

sizes = st.sampled_from(SIZES)
dtypes = st.sampled_from(FLOAT_DTYPES)


@dataclasses.dataclass(frozen=True)
class Values:
    """How to fill one tensor: normal(seed) * scale + offset, then ``specials`` as (flat index mod
    numel, kind), ``constant`` makes every element equal (variance 0), ``layout`` its strides."""

    seed: int
    scale: float = 1.0
    offset: float = 0.0
    specials: tuple[tuple[int, str], ...] = ()
    constant: bool = False
    layout: str = "contiguous"

    def build(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        t = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * self.scale + self.offset
        if self.constant and t.numel():
            t = torch.full_like(t, t.flatten()[0].item())
        if t.numel():
            flat = t.view(-1)
            for index, kind in self.specials:
                flat[index % flat.numel()] = special_value(kind, dtype)
        if not dtype.is_floating_point:  # int and bool parts: small whole numbers
            t = t.clamp(-100, 100).round()
        return lay_out(t.to(dtype), self.layout)


def special_value(kind: str, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return {
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "huge": info.max / 4,
        "-huge": -info.max / 4,
        "tiny": info.tiny / 4 if dtype != torch.bfloat16 else info.tiny,  # a denormal (bf16: the smallest normal)
        "zero": 0.0,
    }[kind]


def _poison(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan") if t.is_floating_point() else 0)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in the given memory layout (a layout that does not apply to t's rank keeps it
    contiguous). Padding around strided and offset views is NaN (0 for int and bool tensors), so a
    kernel that reads outside its view shows it; "expanded" broadcasts t's first index along dim 0
    (stride 0, so it changes values: the case uses the returned tensor everywhere)."""
    if layout == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and t.dim() >= 1:
        return torch.stack([t, _poison(t)], dim=-1)[..., 0]
    if layout == "rowpadded" and t.dim() >= 2:  # a chunk of a wider tensor: rows longer than the view
        return torch.cat([t, _poison(t)[..., :3]], dim=-1)[..., : t.shape[-1]]
    if layout == "offset":
        pad = _poison(t.new_empty(3))
        return torch.cat([pad, t.reshape(-1)])[3:].view(t.shape)
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t.contiguous()


@st.composite
def values(draw, *, specials: bool = True, layouts: Sequence[str] = LAYOUTS, constant: bool = True) -> Values:
    """A tensor spec: often plain normals, sometimes scaled far up or down, sometimes with special
    values in a few places, sometimes constant (variance 0), in one of ``layouts``."""
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from((1.0, 1.0, 1.0, 3.0, 1e-3, 1e3, 1e-30, 1e30)))
    offset = draw(st.sampled_from((0.0, 0.0, 1.0, -5.0, 100.0)))
    chosen: tuple[tuple[int, str], ...] = ()
    if specials and draw(st.integers(0, 3)) == 0:
        chosen = tuple(
            draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), min_size=1, max_size=3))
        )
    const = constant and draw(st.integers(0, 7)) == 0
    layout = draw(st.sampled_from(tuple(layouts)))
    return Values(seed, scale, offset, chosen, const, layout)


def to_exact(v: Any) -> Any:
    """A float64 copy of a tensor argument (None and non-tensors as they are)."""
    return v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


# ---- the property -------------------------------------------------------------------------------


class FuzzFailure(AssertionError):
    """A broken property. Each (backend, rule) gets its own subclass (:func:`failure`), so hypothesis
    tells the failures apart and shrinks each to its own minimal example: a known bug on one backend
    does not hide a new one on another."""


_FAILURES: dict[str, type[FuzzFailure]] = {}


def failure(backend: str, rule: str) -> type[FuzzFailure]:
    name = "".join(c if c.isalnum() else "_" for c in f"{backend}_{rule}")
    if name not in _FAILURES:
        _FAILURES[name] = type(name, (FuzzFailure,), {})
    return _FAILURES[name]


def check_output(
    out: torch.Tensor,
    eager: torch.Tensor,
    exact: torch.Tensor,
    what: str,
    backend: str,
    *,
    documented: torch.Tensor | None = None,
    nan_ok: torch.Tensor | None = None,
    free: torch.Tensor | None = None,
    allowance: torch.Tensor | None = None,
    overflow_ok: torch.Tensor | None = None,
    zero_ok: torch.Tensor | None = None,
) -> None:
    """The tier's property (module docstring). ``documented`` is the reference backend's own result
    (its documented float32 math): where the float64 reference is finite but that is not, the
    inputs exceed the range of the documented math, and a non-finite ``out`` is accepted there;
    where the float64 reference is +-Inf and that is NaN, NaN is accepted.
    ``nan_ok`` marks elements where a documented exception lets this backend return NaN where the
    reference gives +-Inf, ``zero_ok`` where it lets it return 0 (the caller marks exactly the elements
    where the reference or its documented math is NaN), ``free``
    elements whose value no rule fixes. ``allowance`` is a backend's documented error bound (float64,
    per element) added to the tolerance rule's where the reference is finite: ``out`` is moved towards
    the reference by up to it before the rule is applied. ``overflow_ok`` marks elements where that
    backend's documented intermediates may overflow: a non-finite ``out`` (+-Inf, or NaN from Inf - Inf)
    is accepted there, whatever the reference."""
    what = f"{what} backend={backend!r}"
    if not isinstance(out, torch.Tensor) or out.shape != exact.shape or out.dtype != eager.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise failure(backend, "shape")(f"{what}: returned {got}, expected {tuple(exact.shape)} {eager.dtype}")
    exact = exact.to(torch.float64)
    o = out.detach().to(torch.float64)
    allowed = torch.zeros_like(o, dtype=torch.bool)
    if nan_ok is not None:  # documented: NaN where the reference gives +-Inf
        allowed |= nan_ok & o.isnan() & exact.isinf()
    if zero_ok is not None:  # documented: 0 there (where the reference, or its documented math, is NaN)
        allowed |= zero_ok & (o == 0)
    if overflow_ok is not None:  # documented: the backend's intermediates may overflow there (Inf - Inf is NaN)
        allowed |= overflow_ok & ~o.isfinite()
    if free is not None:
        allowed |= free
    if documented is not None:
        doc = documented.detach()
        allowed |= exact.isfinite() & ~doc.isfinite() & ~o.isfinite()
        # An Inf the documented float32 math turns into NaN (a weight that underflows to 0 meets the
        # Inf: softmax probabilities times an infinite value) may be NaN here too.
        allowed |= exact.isinf() & doc.isnan() & o.isnan()
    rounded = exact.to(out.dtype).to(torch.float64)
    fin = exact.isfinite() & rounded.isfinite() & ~allowed
    if allowance is not None and fin.any():
        # err(out) <= rule + allowance: take the allowance off the error first.
        diff = o - exact
        o = torch.where(fin & (diff.abs() <= allowance), exact, torch.where(fin, o - diff.sign() * allowance, o))
        what = f"{what} (error less the documented bound, at most {float(allowance[fin].max()):.3g})"
    if fin.any():
        e = eager.detach().to(torch.float64)
        e = torch.where(e.isfinite(), e, rounded)
        # The floors are relative to the tensor's magnitude (they stand for the dtype's rounding):
        # divide by a power of two of the size of the largest value, which is exact (at most 2^1023,
        # float64's largest: a value of 2^1023 or more has the exponent 1024).
        top = float(exact[fin].abs().max())
        scale = 2.0 ** min(max(0, math.frexp(top)[1]), 1023) if top > 0 else 1.0
        try:
            assert_within_eager_bound(
                (o[fin] / scale).to(out.dtype),
                (e[fin] / scale).to(out.dtype),
                exact[fin] / scale,
                f"{what} (finite ref, values / {scale:g})",
            )
        except AssertionError as err:
            raise failure(backend, "finite")(str(err)) from None

    def fail(mask: torch.Tensor, rule: str) -> None:
        if mask.any():
            i = int(mask.flatten().nonzero()[0])
            raise failure(backend, rule.split(":")[0])(
                f"{what}: {int(mask.sum())} of {mask.numel()} elements break '{rule}'; first at flat index {i}: "
                f"got {o.flatten()[i].item()}, reference {exact.flatten()[i].item()}"
            )

    overflow = exact.isfinite() & ~rounded.isfinite() & ~allowed
    fail(overflow & (o.isnan() | (o.sign() != exact.sign())), "reference overflows the dtype: +-Inf of its sign")
    inf = exact.isinf() & ~allowed
    fail(inf & (o != exact), "reference is +-Inf: the same Inf")
    fail(exact.isnan() & o.isfinite() & ~allowed, "reference is NaN: NaN or Inf")


@dataclasses.dataclass
class Outcome:
    backend: str
    out: Any = None
    error: BaseException | None = None


def run_backends(
    support: OpSupport,
    inputs: Mapping[str, torch.Tensor],
    call: Callable[[str], Any],
    backends: Sequence[str] | None = None,
    what: str = "",
) -> list[Outcome]:
    """Run ``call(backend)`` on every backend of ``support`` (or ``backends``) that declares it can
    run ``inputs``, and on "auto". A backend that declares it cannot must give reasons, and asking it
    by name must raise BackendUnavailableError carrying them. A backend that declares it can must not
    raise anything but TypeError/ValueError (argument validation, checked for consistency by the
    caller)."""
    outcomes = []
    names = list(backends) if backends is not None else [*support.backends, "auto"]
    for b in names:
        if b != "auto":
            reasons = [r for r in support.why_not(b, inputs) if not isinstance(r, ExplicitOnly)]
            assert all(isinstance(r, str) and r.strip() for r in reasons), f"{what}: {b} gave an empty reason"
            if reasons:
                try:
                    call(b)
                except BackendUnavailableError as e:
                    assert e.reasons, f"{what}: {b} refused without reasons"
                    continue
                except (TypeError, ValueError) as e:  # validation comes before dispatch
                    outcomes.append(Outcome(b, error=e))
                    continue
                raise failure(b, "refusal")(f"{what}: {b} declared it cannot run ({reasons}) but ran")
        try:
            outcomes.append(Outcome(b, out=call(b)))
        except (TypeError, ValueError) as e:
            outcomes.append(Outcome(b, error=e))
        except Exception as e:  # noqa: BLE001 - the property: nothing else escapes a backend that said yes
            raise failure(b, type(e).__name__)(
                f"{what}: backend {b!r} declared it can run this input but raised {type(e).__name__}: {e}"
            ) from e
    return outcomes


def consistent(outcomes: Sequence[Outcome], what: str) -> bool:
    """Every backend rejected the arguments with the same exception type, or none did. Returns
    whether they were accepted."""
    errors = {o.backend: type(o.error).__name__ for o in outcomes if o.error is not None}
    if errors and len(errors) != len(outcomes):
        ran = [o.backend for o in outcomes if o.error is None]
        raise failure("all", "disagree")(
            f"{what}: backends disagree: {errors} raised, {ran} ran; first error: "
            f"{next(o.error for o in outcomes if o.error is not None)}"
        )
    if errors:
        kinds = set(errors.values())
        assert len(kinds) == 1, f"{what}: backends reject with different exception types: {errors}"
    return not errors


def floor(dtype: torch.dtype) -> float:
    return FLOOR[dtype]


def examples(n: int) -> int:
    """max_examples of a test: ``n`` in the CI profile, 30 times as many in the long one."""
    return n * 30 if LONG else n
