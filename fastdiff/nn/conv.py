"""``Conv3x3``: a U-Net's 3x3 convolution (stride 1, padding 1), on fastdiff.ops.conv3x3 where that is faster."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import tuning
from ..backends import AUTO, BACKENDS, resolve_backend
from ..ops.conv3x3 import SUPPORT as _CONV3X3_SUPPORT
from ..ops.conv3x3 import conv3x3

__all__ = [
    "Conv3x3",
    "conv1x1_module",
    "conv3x3_module",
    "tuning_decisions",
    "pointwise_decisions",
    "clear_tuning",
    "TUNE_ENV",
]

TUNE_ENV = tuning.TUNE_ENV
# The measured choice (see _measured_choice): alternating runs of each candidate, and the margin by
# which the one the static rule did not pick must win to be taken instead (the tuner's, which the
# model's memory-format choice shares).
TUNE_REPEATS = 5
TUNE_MARGIN = tuning.TUNE_MARGIN

# The static rule, used when tuning is off (FASTDIFF_TUNE=0), under torch.compile and autograd, and
# as the default a measurement must beat: the kernel from 32 channels up, on small maps, on mid-size
# maps with enough input channels, and on small problems as a whole; never with so few input
# channels that Winograd's GEMMs degenerate. Its thresholds were read off measurements on one
# machine (docs/tuning.md has them), which is why auto measures each shape instead.
MIN_CHANNELS = 32
SMALL_MAP_PIXELS = 64
MID_MAP_PIXELS = 1024
MID_MAP_MIN_IN_CHANNELS = 16
SMALL_PROBLEM_PRODUCTS = 1 << 19
SMALL_PROBLEM_MIN_IN_CHANNELS = 8
# A 1x1 convolution of a channels_last map is a matrix product over pixels; as F.linear it skips
# oneDNN's fixed cost per call, which wins on small maps and loses on large ones (docs/tuning.md).
POINTWISE_MAX_MACS = 1 << 24


def conv1x1_module(conv: nn.Conv2d, x: torch.Tensor, backend: str = AUTO) -> torch.Tensor:
    """``conv(x)`` for any ``nn.Conv2d``; a plain 1x1 convolution (stride 1, no padding or groups)
    of a channels_last CPU map may run as ``F.linear`` over its pixels instead (same math, a
    channels_last-strided result), unless ``backend`` is "reference" (the module's own forward).
    Which of the two runs is measured on the first call of each signature (shape, dtype, channels
    out, bias, threads, CPU capability) and remembered, like the 3x3 convolutions' choice; the static
    rule (F.linear up to POINTWISE_MAX_MACS multiply-adds) decides with FASTDIFF_TUNE=0, while autograd
    records, and under torch.compile where no eager call measured the signature."""
    if (
        backend != "reference"
        and type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid", "same")
        and conv.groups == 1
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        static = x.numel() * conv.out_channels <= POINTWISE_MAX_MACS
        if torch.compiler.is_compiling():
            known = _known_pointwise(tuple(x.shape), str(x.dtype), conv.out_channels, conv.bias is not None)
            linear = static if known is None else known
        else:
            linear = _measured_linear(conv, x, static) if _tuning() else static
        if linear:
            return _as_linear(conv, x)
    return conv(x)


def _as_linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
    return F.linear(x.permute(0, 2, 3, 1), weight, conv.bias).permute(0, 3, 1, 2)


def _remembered(table: dict, kind: str, key: tuple, valid: Callable[[dict], bool]) -> dict | None:
    """This process's decision for ``key``, else the cache file's (remembered here, marked "cache"),
    else None. The file is read only with tuning on."""
    hit = table.get(key)
    if hit is None and _tuning():
        cached = tuning.load(kind).get(repr(key))  # measured by an earlier process on this machine
        if isinstance(cached, dict) and valid(cached):
            hit = table[key] = cached | {"source": "cache"}
    return hit


_pointwise: dict[tuple, dict] = {}


def _pointwise_key(shape: tuple, dtype: str, out_channels: int, bias: bool) -> tuple:
    return (shape, dtype, out_channels, bias, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())


def _valid_pointwise(decision: dict) -> bool:
    return decision.get("choice") in ("linear", "onednn")


def _measured_linear(conv: nn.Conv2d, x: torch.Tensor, static: bool) -> bool:
    """Whether this 1x1 convolution runs as F.linear: measured once per signature against the
    module's own convolution, the static rule's pick kept unless the other wins by TUNE_MARGIN."""
    key = _pointwise_key(tuple(x.shape), str(x.dtype), conv.out_channels, conv.bias is not None)
    hit = _remembered(_pointwise, "conv1x1", key, _valid_pointwise)
    if hit is not None:
        return hit["choice"] == "linear"
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return static
    with torch.no_grad():
        candidates = {"linear": lambda: _as_linear(conv, x), "onednn": lambda: conv(x)}
        for run in candidates.values():
            run()  # first calls: oneDNN's primitive
        m = tuning.measure(candidates, TUNE_REPEATS)
    default = "linear" if static else "onednn"
    choice = tuning.pick(m.seconds, default)
    decision = {"choice": choice, "static": default, **m.record()}
    tuning.keep("conv1x1", repr(key), decision, m)
    _pointwise[key] = decision | {"source": "measured"}
    return choice == "linear"


def _known_pointwise(shape: tuple, dtype: str, out_channels: int, bias: bool) -> bool | None:
    """The 1x1 choice an eager call measured for this signature, or None (see _known_choice)."""
    hit = _remembered(_pointwise, "conv1x1", _pointwise_key(shape, dtype, out_channels, bias), _valid_pointwise)
    return None if hit is None else hit["choice"] == "linear"


_known_pointwise._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _same_3x3(conv: nn.Conv2d) -> bool:
    # A subclass of nn.Conv2d may change forward (LoRA adapters do): only these two run the op.
    return (
        type(conv) in (nn.Conv2d, Conv3x3)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding in ((1, 1), "same")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _auto_takes(x: torch.Tensor, c_in: int, c_out: int) -> bool:
    """The auto rule's shape part (see MIN_CHANNELS and the constants after it)."""
    pixels = x.shape[-2] * x.shape[-1]
    if min(c_in, c_out) >= MIN_CHANNELS or pixels <= SMALL_MAP_PIXELS:
        return True
    if c_in >= MID_MAP_MIN_IN_CHANNELS and pixels <= MID_MAP_PIXELS:
        return True
    return c_in >= SMALL_PROBLEM_MIN_IN_CHANNELS and x.shape[0] * pixels * c_in * c_out <= SMALL_PROBLEM_PRODUCTS


_tuning = tuning.enabled  # FASTDIFF_TUNE: 1 (measure, the default) or 0 (the static rule)


_decisions: dict[tuple, dict] = {}


def _layout(x: torch.Tensor) -> str:
    if x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "nchw" if x.is_contiguous() else "strided"


def _conv_key(shape: tuple, layout: str, out_channels: int, bias: bool, residual: bool) -> tuple:
    return (
        shape,
        layout,
        out_channels,
        bias,
        residual,
        torch.get_num_threads(),
        torch.backends.cpu.get_cpu_capability(),
    )


def _valid_conv(decision: dict) -> bool:
    return isinstance(decision.get("fastdiff"), bool)


def _measured_choice(
    conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None, chosen: str, static: bool
) -> tuple[bool, str]:
    """Whether fastdiff's kernel runs this convolution, and which of its Winograd paths: measured once
    per signature (shape, layout, channels, bias, residual, threads, CPU capability), the kernel's
    fused path and its BLAS path against the module's own convolution (oneDNN), and remembered. The
    faster path is the kernel's; the static rule's pick (the kernel or oneDNN) stays unless the other
    is faster by TUNE_MARGIN. Not measured (the static rule decides, and the kernel its own path) when
    autograd records; never called while torch.compile traces."""
    key = _conv_key(tuple(x.shape), _layout(x), conv.out_channels, conv.bias is not None, residual is not None)
    hit = _remembered(_decisions, "conv3x3", key, _valid_conv)
    if hit is not None:
        return hit["fastdiff"], _path_of(hit)
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return static, "auto"
    if _CONV3X3_SUPPORT.why_not("cpu", {"x": x, "weight": conv.weight}):
        return static, "auto"  # the kernel cannot run here (not built): the op would take the reference anyway

    def winograd(path: str):
        return lambda: conv3x3(x, conv.weight, conv.bias, residual, backend=chosen, path=path)

    def onednn():
        return _own_convolution(conv, x, residual, chosen)

    with torch.no_grad():
        candidates = {"fused": winograd("fused"), "blas": winograd("blas"), "onednn": onednn}
        for run in candidates.values():
            run()  # first calls: the filter transform, oneDNN's primitive
        m = tuning.measure(candidates, TUNE_REPEATS)
    t = m.seconds
    path = "fused" if t["fused"] <= t["blas"] else "blas"
    takes = tuning.pick({"fastdiff": t[path], "onednn": t["onednn"]}, "fastdiff" if static else "onednn") == "fastdiff"
    decision = {"fastdiff": takes, "path": path, "static": static, **m.record()}
    tuning.keep("conv3x3", repr(key), decision, m)
    _decisions[key] = decision | {"source": "measured"}
    return takes, path


def _path_of(decision: dict) -> str:
    """The Winograd path a decision names ("auto", the kernel's own rule, for one made before paths
    were measured)."""
    path = decision.get("path")
    return path if path in ("fused", "blas") else "auto"


def _known_choice(shape: tuple, layout: str, out_channels: int, bias: bool, residual: bool) -> tuple[bool, str] | None:
    """The choice already measured for this signature (in this process or, by an earlier one, in the
    cache file), or None. Called outside the trace while torch.compile traces (marked constant, as
    torch.compiler.assume_constant_result marks): a compiled model keeps the choices eager calls measured."""
    hit = _remembered(_decisions, "conv3x3", _conv_key(shape, layout, out_channels, bias, residual), _valid_conv)
    return None if hit is None else (hit["fastdiff"], _path_of(hit))


# What torch.compiler.assume_constant_result does, without importing torch._dynamo here (see
# fastdiff/_native.py; tests/test_compile.py checks the mark's name).
_known_choice._dynamo_marked_constant = True  # type: ignore[attr-defined]


def tuning_decisions() -> list[dict]:
    """The measured conv3x3 choices of this process: one dict per signature (shape, layout, channels
    out, bias, residual, threads, CPU capability) with the choice, the static rule's, both times, the
    signature as the cache file keys it, and ``source``: "measured" (here) or "cache" (the file)."""
    keys = ("shape", "layout", "out_channels", "bias", "residual", "threads", "cpu_capability")
    return [dict(zip(keys, key, strict=True)) | value | {"signature": repr(key)} for key, value in _decisions.items()]


def pointwise_decisions() -> list[dict]:
    """The measured 1x1 choices of this process: one dict per signature (shape, dtype, channels out,
    bias, threads, CPU capability) with the choice ("linear" or "onednn"), the static rule's, both
    times, and ``source``: "measured" (here) or "cache" (the file)."""
    keys = ("shape", "dtype", "out_channels", "bias", "threads", "cpu_capability")
    return [dict(zip(keys, key, strict=True)) | value | {"signature": repr(key)} for key, value in _pointwise.items()]


def clear_tuning() -> None:
    """Forget this process's measured choices (the convolutions' and the models' memory formats); the
    next call of each signature reads the cache file (``fastdiff.tuning``), or measures again."""
    _decisions.clear()
    _pointwise.clear()
    tuning.clear_memory_formats()


def conv3x3_module(
    conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, backend: str = AUTO
) -> torch.Tensor:
    """``conv(x) + residual`` (residual optional) for any ``nn.Conv2d``, through
    :func:`fastdiff.ops.conv3x3` when ``conv`` is a plain 3x3 "same" convolution and

    * ``backend="auto"``: the input is float32 on the CPU and the kernel is faster than the
      module's own convolution (oneDNN) for it: measured on the first call of each signature on
      this machine and remembered (:func:`tuning_decisions`), the static rule's pick kept unless
      the other wins by 10%. With ``FASTDIFF_TUNE=0``, the static rule alone: at least 32 channels
      in and out, a map of at most 64 pixels, a map of at most 1024 pixels with at least 16 input
      channels, or a small problem (N * H * W * C_in * C_out up to 2^19, with at least 8 input
      channels), where the kernel was faster on one AVX-512 machine;
    * another backend name: that backend of the op can run the input. The name is meant for every
      fastdiff op of a block (``fastdiff.patch(model, backend=...)``), and convolutions have only a
      float32 CPU kernel, so a convolution it cannot run (a GPU, another dtype) runs ``conv``;
    * ``"reference"``: never.

    Otherwise ``conv`` itself runs, and so does a subclass of ``nn.Conv2d``, whose forward may differ.
    """
    chosen = resolve_backend(backend, "conv3x3") if _same_3x3(conv) else "reference"  # FASTDIFF_BACKEND applies
    path = "auto"  # the kernel's own rule, unless a measurement picked its path
    if chosen == "reference":
        use_op = False
    elif chosen == AUTO:
        use_op = (
            x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32 and x.dim() == 4
        )
        if use_op:
            static = _auto_takes(x, conv.in_channels, conv.out_channels)
            if not torch.compiler.is_compiling():
                use_op, path = _measured_choice(conv, x, residual, chosen, static) if _tuning() else (static, path)
            else:  # a measurement cannot be traced: the choice eager calls measured, else the static rule
                known = _known_choice(
                    tuple(x.shape), _layout(x), conv.out_channels, conv.bias is not None, residual is not None
                )
                if known is not None:
                    # The path as a literal (Dynamo cannot guard a string that came out of the lookup).
                    use_op = known[0]
                    path = "fused" if known[1] == "fused" else "blas" if known[1] == "blas" else "auto"
                else:
                    use_op = static
    else:
        use_op = not _CONV3X3_SUPPORT.why_not(chosen, {"x": x, "weight": conv.weight})
    if use_op:
        return conv3x3(x, conv.weight, conv.bias, residual, backend=chosen, path=path)
    return _own_convolution(conv, x, residual, chosen)


def _own_convolution(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None, chosen: str) -> torch.Tensor:
    """``conv(x) + residual`` the module's own way (oneDNN on the CPU): what conv3x3_module runs when
    the op does not, and what the tuner times against the op."""
    if not isinstance(conv, Conv3x3):
        out = conv(x)  # its hooks run; what they return may be anyone's tensor: added to, not into
        return out if residual is None else out + residual
    # Its own convolution: its __call__ (hooks included) already ran. For a plain 3x3 "same"
    # convolution that is F.conv2d with stride and padding 1, called directly: nn.Conv2d.forward's
    # attribute lookups cost about half as much again as oneDNN's whole call on a 4x4 map.
    out = F.conv2d(x, conv.weight, conv.bias, 1, 1) if chosen != "reference" else nn.Conv2d.forward(conv, x)
    if residual is None:
        return out
    if residual.dtype == out.dtype and residual.shape == out.shape and not torch.compiler.is_compiling():
        return out.add_(residual)  # the convolution's fresh output (its backward does not read it): no new tensor
    return out + residual


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 3, padding=1)`` whose forward takes an optional residual
    and runs :func:`conv3x3_module`: fastdiff's Winograd kernel where it is faster, the convolution
    of ``nn.Conv2d`` elsewhere. Same parameters and state_dict keys as the ``nn.Conv2d``.
    ``backend``: "auto" (the rule above), "reference" (never the op), or another backend name of
    :func:`fastdiff.ops.conv3x3` (the op where that backend can run the input, the module's own
    convolution elsewhere; see :func:`conv3x3_module`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        backend: str = AUTO,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if backend not in (AUTO, *BACKENDS):
            raise ValueError(f"Conv3x3: backend must be one of {(AUTO, *BACKENDS)}, got {backend!r}")
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return conv3x3_module(self, x, residual, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
