"""``conv3x3``: a 3x3 convolution (stride 1, padding 1) with its bias and an optional residual added.

The U-Net's workhorse: on a CPU its convolutions take 70-80% of a denoiser's time.

reference: fastdiff.reference.conv3x3 (``F.conv2d``, i.e. oneDNN on CPUs and cuDNN on GPUs, then
the residual add).
cpu: torch.ops.fastdiff.conv3x3 from fastdiff._C (csrc/cpu/conv3x3*.cpp), float32: Winograd
F(2x2, 3x3), whose GEMMs do 2.25x fewer flops than a direct convolution, with the bias and the
residual added as the output tiles are written, and the transformed filters remembered per weight
tensor: a call reuses them only while the weight's bytes equal a copy taken when they were made, so
no way of writing a weight (in place, ``.data``, numpy views, ``load_state_dict``) leaves them stale.
See :func:`weight_cache_info`. It pays off from 32 channels, on maps of 8x8 pixels or fewer, and on
small problems, where oneDNN's fixed cost per call dominates; with fewer channels on larger maps
oneDNN's direct convolution was faster there, and on other CPUs (or the AVX2 build) the balance
moves, so ``fastdiff.nn.Conv3x3`` measures both per shape (``fastdiff.nn.conv``; that rule with
``FASTDIFF_TUNE=0``). Its error is a
float32 convolution's in size, but relative to each filter's largest tap rather than tap by tap (the
transforms mix a filter's 9 taps): see :func:`conv3x3`.
cuda, triton: none; on GPUs cuDNN's convolutions (the reference path) are the ones to use.
The native op has a Meta kernel (torch.compile sees through it) and an autograd formula.
"""

from __future__ import annotations

import weakref

import torch

from .. import _native
from ..backends import Kernel, OpSupport, register_op, torch_op
from ..reference.conv3x3 import conv3x3 as _reference_conv3x3

__all__ = ["conv3x3", "weight_cache_info", "clear_weight_cache"]

OP = "conv3x3"
# The cpu kernel's Winograd paths, as its `path` argument numbers them (csrc/conv3x3.h, Conv3x3Path):
# "auto" its static rule (FASTDIFF_CONV3X3_FUSED if set, else the channel count), "fused" its own GEMMs
# on tiles kept in L1, "blas" its blocked path on torch's BLAS.
PATHS = {"auto": 0, "fused": 1, "blas": 2}


def _inputs(x, weight, bias, residual, path) -> dict[str, torch.Tensor]:
    return {"x": x, "weight": weight}


def _prepare(x, weight, bias, residual, path, backend, checked=True) -> tuple:
    # Unchecked, the kernel's own checks match _validate's except for empty maps and channels,
    # which it would compute, and the path's name, which it never sees: those are checked here.
    code = PATHS.get(path) if type(path) is str else None
    if checked or code is None or x.dim() != 4 or min(x.shape[1:]) == 0 or weight.dim() != 4 or weight.shape[0] == 0:
        _validate(x, weight, bias, residual, path)
    if backend == "cpu" and not torch.compiler.is_compiling():
        _forget_when_freed(weight)
    return x, weight, bias, residual, code


def _reference(x, weight, bias, residual, path) -> torch.Tensor:
    return _reference_conv3x3(x, weight, bias, residual)  # one convolution: the path is the cpu kernel's


SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": Kernel("reference", _reference),
            "cpu": Kernel(
                "native",
                torch_op(OP),
                dtypes=(torch.float32,),
                checks_args=True,
                layouts="NCHW or channels_last in; channels_last out",
            ),
            "cuda": Kernel("missing"),
            "triton": Kernel("missing"),
        },
        inputs=_inputs,
        validate=lambda x, weight, bias, residual, path: _validate(x, weight, bias, residual, path),
        prepare=_prepare,
    )
)


def _validate(x: object, weight: object, bias: object, residual: object, path: object = "auto") -> None:
    for name, t, optional in (
        ("x", x, False),
        ("weight", weight, False),
        ("bias", bias, True),
        ("residual", residual, True),
    ):
        if t is None and optional:
            continue
        if not isinstance(t, torch.Tensor):
            kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
            raise TypeError(f"conv3x3: {name} must be {kind}, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"conv3x3: {name} must be a floating tensor, got {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"conv3x3: {name} dtype {t.dtype} must match x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"conv3x3: {name} is on {t.device} but x is on {x.device}")
    if x.dim() != 4:
        raise ValueError(f"conv3x3: x must have shape (N, C_in, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"conv3x3: x must have at least one channel (C_in >= 1), got shape {tuple(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"conv3x3: x must have H and W >= 1, got shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"conv3x3: weight must have shape (C_out, C_in={x.shape[1]}, 3, 3), got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    if c_out == 0:  # as for C_in, H and W: F.conv2d refuses it, so every backend does
        raise ValueError(
            f"conv3x3: weight must have at least one output channel (C_out >= 1), got shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"conv3x3: bias must have shape (C_out,) = ({c_out},), got {tuple(bias.shape)}")
    want = (x.shape[0], c_out, x.shape[2], x.shape[3])
    if residual is not None and tuple(residual.shape) != want:
        raise ValueError(f"conv3x3: residual must have shape (N, C_out, H, W) = {want}, got {tuple(residual.shape)}")
    if type(path) is not str or path not in PATHS:
        raise ValueError(f"conv3x3: path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")


def conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    path: str = "auto",
) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride=1, padding=1) + residual``.

    x (N, C_in, H, W), NCHW or channels_last; weight (C_out, C_in, 3, 3); bias (C_out,) or None;
    residual (N, C_out, H, W) or None; one dtype and device for all. The cpu backend returns a
    channels_last tensor (NCHW input is converted first, a copy); the reference backend returns
    what ``F.conv2d`` does. ``backend``: "auto" | "reference" | "cpu" | "cuda" | "triton";
    FASTDIFF_BACKEND overrides it. Empty batches return empty outputs; no channels (C_in or C_out
    of 0) and empty maps are refused on every backend.

    ``path``: which Winograd path the cpu kernel takes: "auto" (its static rule:
    FASTDIFF_CONV3X3_FUSED=1/0 if set, else the fused path when a side has few channels), "fused"
    (its own GEMMs on groups of tiles kept in L1) or "blas" (blocked GEMMs on the BLAS torch links).
    Both compute the same convolution, to the accuracy below; the choice is speed only, which is
    what lets a tuner time them per shape. Every other backend ignores it (the reference is one
    convolution).

    Non-finite inputs on the cpu backend: an Inf in x or weight gives NaN where the reference gives
    +-Inf (over the same outputs, the 3x3 neighbourhood of an Inf pixel in every output channel),
    because the Winograd transforms add and subtract input values and Inf - Inf is NaN. NaN inputs
    and finite inputs give what the reference gives. Use ``backend="reference"`` where an Inf must
    stay an Inf.

    Accuracy of the cpu backend: Winograd's filter transform mixes a filter's 9 taps (sums such as
    ``(g0 + g1 + g2) / 2``) and its input and output transforms mix each output's 3x3 window of x, so
    its error is bounded relative to the largest tap of each filter and the largest input of each
    window, not tap by tap as a direct convolution's. For out[n, co, y, x], to first order in 2^-24:

        |error| <= (C_in + 10) * 2^-18 * sum over ci of max|weight[co, ci]| * max|x[n, ci, window]|

    (the window: the 3x3 pixels around (y, x), zero padding included), plus one rounding each for the
    bias and the residual. That is 64 * (C_in + 10) float32 roundings (2^-24): 64 from the transforms'
    coefficients (three ones per row of A^T, row sums of |G| of 1, 1.5, 1.5, 1 and of |B^T| of 2, so
    (2 * (1 + 1.5 + 1.5))^2), C_in + 10 from the additions along the way, the GEMMs' C_in among them.
    A direct float32 convolution's worst case, 81 * C_in roundings of the tap-by-tap sum of
    ``|weight| * |x|``, is the same size, and the two agree for filters whose taps are of one
    magnitude. A tap more than about 2^24 / (C_in + 10) times a filter's others drowns their share of
    the output, even where it multiplies only zero padding: x of shape (1, 1, 1, 1) holding 1.541,
    and a weight of 0.5137 whose corner tap is 2.8e37, give 0 where the reference gives 0.7916 (the
    bound is 1.8e33). Where ``64 * sum over ci of max|weight[co, ci]| * max|x[n, ci, window]|``
    exceeds float32's largest value, the intermediates may overflow: +-Inf or NaN even where the
    exact result is finite. Use ``backend="reference"`` for filters whose taps span that much.
    """
    return SUPPORT(backend, x, weight, bias, residual, path)


# ---- the cpu kernel's remembered filters -------------------------------------------------------
# The kernel drops the entry of a freed weight on its next call; for the weights that pass through
# here, a finalizer drops it as soon as Python frees the tensor, so the memory goes with the model.
_WATCHED: dict[int, list] = {}  # id(weight) -> [finalizer, the data address last seen]


def _forget(key: int) -> None:
    record = _WATCHED.pop(key, None)
    cache = getattr(torch.ops.fastdiff, "conv3x3_weight_cache", None)
    if record is not None and cache is not None:
        cache(record[1])


def _forget_when_freed(weight: torch.Tensor) -> None:
    if type(weight) is not torch.Tensor and type(weight) is not torch.nn.Parameter:
        return  # a tensor subclass (FakeTensor, a tracing wrapper) has no data the kernel remembered
    record = _WATCHED.get(id(weight))
    if record is None:
        finalizer = weakref.finalize(weight, _forget, id(weight))
        finalizer.atexit = False
        _WATCHED[id(weight)] = [finalizer, weight.data_ptr()]
    else:
        record[1] = weight.data_ptr()  # a `.data` swap moves it


def weight_cache_info() -> dict[str, int]:
    """The cpu kernel's remembered filters: ``entries`` (weights), ``bytes`` (their transformed
    filters and byte copies), ``budget`` (the most they may take: ``FASTDIFF_CONV3X3_CACHE_MB``,
    default 1024 MiB, read once per process; 0 turns remembering off; past it new weights are
    transformed on every call), and ``hits``/``misses`` since the last :func:`clear_weight_cache`.
    Raises RuntimeError when fastdiff._C is not built."""
    entries, size, budget, hits, misses = _cache_op()()
    return {"entries": entries, "bytes": size, "budget": budget, "hits": hits, "misses": misses}


def clear_weight_cache() -> None:
    """Drop every remembered filter (the next call of each weight transforms it again)."""
    _cache_op()(0, True)


def _cache_op():
    if _native.load() is None or not hasattr(torch.ops.fastdiff, "conv3x3_weight_cache"):
        raise RuntimeError(f"conv3x3: the cpu kernel is not available ({_native.status().get('reason', 'not built')})")
    return torch.ops.fastdiff.conv3x3_weight_cache


# ---- autograd for the native op ----------------------------------------------------------------
# The gradients of a convolution are aten's own (convolution_backward); the residual's is grad.


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, _path = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
    )
    # path: an int, no gradient
    return grad_x, grad_w, grad_b if ctx.has_bias else None, grad if ctx.has_residual else None, None


_native.register_autograd_on_load(OP, _backward, _setup_context)
