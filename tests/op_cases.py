"""One test case per op: what the generic tests (tests/test_ops_harness.py) run on every declared backend.

An :class:`OpCase` holds an op's shape grid (odd sizes, empty batches, strided and transposed views,
NCHW and channels_last where they apply), its seeded input factory (:meth:`OpCase.calls`: the calls
one grid point makes), the oracle (the op's reference in float64 for the exact answer and in the
test dtype for the eager error that sets the bound, tests/conftest.py's ``assert_within_eager_bound``),
the opcheck samples of its torch ops, and its bad-input tables (argument -> value -> exception and the
words that name the argument). Which backend runs what is read from the op's declaration
(``fastdiff.ops.<op>.SUPPORT``), so a skip quotes the declaration's reasons.

Adding an op's case: subclass :class:`OpCase`, fill in the grid, ``make_x``/``calls`` and the tables
(``oracle`` defaults to the op's reference called with the public arguments plus ``upcast``), and add
it to :data:`CASES`. Each op's own behaviour (work splits, recycled memory, its dispatch corners)
stays in its tests/test_ops_<op>.py, built from the same case.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound, full_triton_grid

import fastdiff
from fastdiff.backends import ExplicitOnly, select_backend

# ---- the pieces ------------------------------------------------------------------------------------


@dataclass
class Call:
    """One call of an op: its public arguments (``backend`` aside), the layout they were made in, and
    what to name it in a failure."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    what: str = ""
    layout: str = ""


@dataclass(frozen=True)
class BadInput:
    """A malformed argument: ``make()`` gives (args, kwargs) of the public op; the call raises ``error``
    with a message matching ``match`` (the words that name the argument)."""

    id: str
    make: Callable[[], tuple[tuple, dict]]
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class NativeBadInput:
    """A malformed argument of the native torch op, called directly: ``overrides`` replace the case's
    default native arguments; the CPU (and Meta, where listed) kernel raises a RuntimeError matching."""

    id: str
    overrides: Callable[[], dict]
    match: str
    devices: tuple[str, ...] = ("cpu",)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *size: int, dtype=torch.float32, device="cpu", scale=1.0, offset=0.0) -> torch.Tensor:
    """Seeded normal values made on the CPU (the same numbers on every device), then moved."""
    return (torch.randn(*size, generator=g) * scale + offset).to(device=device, dtype=dtype)


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def as_float64(value: Any) -> Any:
    """Floating tensors (in args, kwargs, nested) on the CPU in float64; other values as they are."""
    return _map_tensors(value, lambda t: t.detach().cpu().double() if t.is_floating_point() else t.cpu())


def on_cpu(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.detach().cpu())


def param_id(value: Any) -> str:
    return str(value).replace(" ", "")


class OpCase:
    """An op's test case. Subclasses set the class attributes and override the factory methods."""

    op: str = ""
    dtypes: tuple[torch.dtype, ...] = DTYPES
    layouts: tuple[str, ...] = ("contiguous",)
    # The grid: (id, spec) pairs; ``calls`` turns a spec, a dtype and a layout into calls.
    shapes: Sequence[tuple[str, Any]] = ()
    # Smaller grids: the Triton tier's (interpreted on the CPU: slow) and extra shapes run on CUDA only.
    triton_shapes: Sequence[tuple[str, Any]] | None = None
    cuda_shapes: Sequence[tuple[str, Any]] = ()
    float64_shapes: Sequence[tuple[str, Any]] = ()
    # Backends the bad-input table runs on (validation comes before the choice, so every one refuses).
    bad_backends: tuple[str, ...] = ("auto", "reference", "cpu")
    bad_inputs: Sequence[BadInput] = ()
    native_bad_inputs: Sequence[NativeBadInput] = ()
    native_op: str | None = None  # torch.ops.fastdiff.<native_op>, where the op has a native kernel
    triton_op: str | None = None  # torch.ops.fastdiff.<triton_op>, where the op has a Triton kernel

    def __repr__(self) -> str:
        return self.op

    # -- the op and its declaration

    @property
    def module(self):
        fastdiff.ops  # noqa: B018  registers every op
        return sys.modules[f"fastdiff.ops.{self.op}"]  # the package attribute is the function

    @property
    def support(self):
        return self.module.SUPPORT

    @property
    def fn(self) -> Callable[..., Any]:
        return getattr(self.module, self.op)

    def run(self, call: Call, backend: str) -> Any:
        return self.fn(*call.args, **call.kwargs, backend=backend)

    def inputs(self, call: Call) -> dict[str, torch.Tensor]:
        """The named tensors the declaration's rules read, from the public arguments."""
        bound = inspect.signature(self.fn).bind(*call.args, **call.kwargs)
        bound.apply_defaults()
        bound.arguments.pop("backend", None)
        return self.support.inputs(*bound.arguments.values())

    def reasons(self, backend: str, calls: Iterable[Call]) -> list[str]:
        """Why the named ``backend`` cannot run these calls (ExplicitOnly reasons left out: a named
        backend runs them, e.g. Triton's interpreter)."""
        found: list[str] = []
        for call in calls:
            found += [
                r
                for r in self.support.why_not(backend, self.inputs(call))
                if not isinstance(r, ExplicitOnly) and r not in found
            ]
        return found

    # -- the grid

    def grid(self, backend: str) -> list[tuple[str, Any, str]]:
        """(id, spec, layout) for ``backend``: the triton grid for triton, plus the CUDA shapes for cuda."""
        if backend == "triton" and self.triton_shapes is not None:
            shapes = list(self.triton_shapes)
        else:
            shapes = list(self.shapes) + (list(self.cuda_shapes) if backend == "cuda" else [])
        return [(sid, spec, layout) for sid, spec in shapes for layout in self.layouts if self.applies(spec, layout)]

    def applies(self, spec: Any, layout: str) -> bool:
        return True

    def known_bug(self, backend: str, spec: Any, layout: str) -> str | None:
        """A bug of fastdiff that this grid point shows, reported and not yet fixed: the case runs as
        a strict xfail (it fails the suite once the bug is fixed, so the mark goes with the fix)."""
        return None

    def calls(
        self,
        spec: Any,
        dtype: torch.dtype,
        layout: str,
        device: str | torch.device,
        *,
        full: bool = True,
        seed: int = 0,
    ) -> list[Call]:
        """The calls one grid point makes (``full=False``: the Triton interpreter's fewer variants)."""
        raise NotImplementedError

    # -- the oracle

    reference: Callable[..., Any] | None = None

    def oracle(self, call: Call) -> tuple[Any, Any]:
        """(exact, eager): the reference in float64 and in the call's own dtype, on the CPU."""
        exact = type(self).reference(*as_float64(call.args), **as_float64(call.kwargs))
        eager = type(self).reference(*on_cpu(call.args), **on_cpu(call.kwargs), upcast=False)
        return exact, eager

    def expect(self, out: Any, call: Call) -> None:
        """Structural checks beyond the values: shape, dtype, device, memory format."""

    def check(self, out: Any, call: Call, what: str = "") -> None:
        """``out`` of ``call`` within the dtype's bound of the float64 oracle, and its structure."""
        what = what or call.what
        self.expect(out, call)
        exact, eager = self.oracle(call)
        outs, exacts, eagers = (out, exact, eager) if isinstance(out, tuple) else ((out,), (exact,), (eager,))
        for i, (o, x, e) in enumerate(zip(outs, exacts, eagers, strict=True)):
            if o is None and x is None:
                continue
            assert_within_eager_bound(o.detach().cpu(), e, x, what + (f" output {i}" if len(outs) > 1 else ""))

    # -- the torch ops

    def opcheck_samples(self, kind: str, dtype: torch.dtype, layout: str, device) -> list[tuple]:
        """Arguments of torch.ops.fastdiff.<native_op or triton_op> for torch.library.opcheck."""
        return []

    def opcheck_grid(self, kind: str) -> list[tuple[torch.dtype, str]]:
        return []

    def native_args(self) -> dict:
        """The native op's default arguments (schema order), valid; native_bad_inputs override them."""
        raise NotImplementedError

    def check_meta(self) -> None:
        """The Meta kernel's output: shape, dtype and memory format, without data."""
        raise NotImplementedError

    def example(self) -> Call:
        """One small float32 CPU call (the dispatch tests)."""
        sid, spec = self.shapes[0]
        return self.calls(spec, torch.float32, self.layouts[0], "cpu")[0]


# ---- group_norm_adagn ----------------------------------------------------------------------------------


class GroupNormAdaGN(OpCase):
    """(shape, num_groups): C = 3·G with H·W = 7·9, G = C at 1×1 with an odd batch, G = 1 at batch 1,
    an odd batch, a 3-D (B, C, L) input with L prime, a 5-D input, and one large enough to spread over
    threads (and to leave vector tails: 29·31 is odd); C = 40 leaves a channels_last tail after a full
    vector step (32 + 8 with AVX-512) and H·W = 15 a partial NCHW step; 4×4 (the demo U-Net's smallest
    level) is exactly half a step per channel row. Each point runs every kind of parts with and
    without SiLU (the Triton interpreter: all parts with SiLU, unless FASTDIFF_FULL_TRITON=1)."""

    op = "group_norm_adagn"
    native_op = "group_norm_adagn"
    triton_op = "group_norm_adagn_triton"
    layouts = ("nchw", "channels_last", "strided")
    PARTS = ("none", "affine", "adagn", "pre_shift", "all")
    PART_NAMES = ("weight", "bias", "scale", "shift", "pre_shift")
    SHAPES = [
        ((2, 40, 5, 3), 8),
        ((3, 32, 4, 4), 8),
        ((2, 96, 7, 9), 32),
        ((3, 6, 1, 1), 6),
        ((1, 5, 4, 3), 1),
        ((5, 12, 7, 9), 4),
        ((2, 64, 17), 8),
        ((1, 12, 3, 4, 5), 3),
        ((2, 24, 29, 31), 8),
    ]
    shapes = [(f"{param_id(s)}-G{g}", (s, g)) for s, g in SHAPES]
    triton_shapes = [
        (f"{param_id(s)}-G{g}", (s, g)) for s, g in [((2, 40, 5, 3), 8), ((3, 6, 1, 1), 6), ((1, 12, 3, 4, 5), 3)]
    ]
    # small groups (one kernel, group in shared memory) and large ones (statistics + apply pair), each
    # with rows that take 16-byte vectors and rows that do not (H*W or C/G not a multiple of 16 bytes)
    cuda_shapes = [
        (f"cuda-{param_id(s)}-G{g}", (s, g))
        for s, g in [((2, 64, 8, 8), 8), ((2, 320, 64, 64), 32), ((1, 64, 128, 128), 1), ((3, 30, 45, 47), 5)]
    ]
    float64_shapes = [("(2,12,5,7)-G4", ((2, 12, 5, 7), 4)), ("(1,12,3,4,5)-G3", ((1, 12, 3, 4, 5), 3))]

    from fastdiff.reference import group_norm_adagn as reference

    def applies(self, spec, layout):
        return layout != "channels_last" or len(spec[0]) in (4, 5)  # no channels_last for (B, C, L)

    def make_x(self, shape, dtype, layout, device="cpu", g=None):
        """Random input with a nonzero mean, in the layout: "strided" is every other element of the last
        dim, dense in neither layout (the op copies once)."""
        g = g or generator()
        if layout == "strided":
            x = randn(g, *shape[:-1], 2 * shape[-1], dtype=dtype, device=device, scale=3, offset=1)[..., ::2]
            assert not x.is_contiguous()
            return x
        x = randn(g, *shape, dtype=dtype, device=device, scale=3, offset=1)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        return x

    def make_parts(self, kind, B, C, dtype, device="cpu", g=None):
        g = g or generator(1)
        affine, adagn = kind in ("affine", "all"), kind in ("adagn", "all")
        return {
            "weight": randn(g, C, dtype=dtype, device=device) if affine else None,
            "bias": randn(g, C, dtype=dtype, device=device) if affine else None,
            "scale": randn(g, B, C, dtype=dtype, device=device) if adagn else None,
            "shift": randn(g, B, C, dtype=dtype, device=device) if adagn else None,
            "pre_shift": randn(g, B, C, dtype=dtype, device=device) if kind in ("pre_shift", "all") else None,
        }

    def call(self, x, num_groups, parts=None, activation=None, what="", layout=""):
        return Call((x, num_groups), {**(parts or {}), "activation": activation}, what, layout)

    def calls(self, spec, dtype, layout, device, *, full=True, seed=0):
        shape, G = spec
        g = generator(seed)
        x = self.make_x(shape, dtype, layout, device, g)
        variants = [(k, a) for k in self.PARTS for a in (None, "silu")] if full else [("all", "silu")]
        return [
            self.call(
                x,
                G,
                self.make_parts(kind, shape[0], shape[1], dtype, device, g),
                act,
                f"{dtype} {shape} G={G} {layout} parts={kind} act={act}",
                layout,
            )
            for kind, act in variants
        ]

    def expect(self, out, call):
        x = call.args[0]
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device, call.what
        if call.layout == "channels_last":
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert out.is_contiguous(memory_format=fmt), f"{call.what}: strides {out.stride()}"
        elif call.layout:
            assert out.is_contiguous(), f"{call.what}: strides {out.stride()}"

    def opcheck_grid(self, kind):
        if kind == "triton":
            return [(torch.float32, "nchw"), (torch.float16, "channels_last"), (torch.bfloat16, "nchw")]
        return [(d, layout) for d in (*DTYPES, torch.float64) for layout in ("nchw", "channels_last")]

    def opcheck_samples(self, kind, dtype, layout, device):
        g = generator()
        x = self.make_x((2, 6, 5, 7), dtype, layout, device, g)
        parts = self.make_parts("all", 2, 6, dtype, device, g)
        f32 = torch.float32
        samples = [
            (x, 3, parts["weight"], parts["bias"], parts["scale"], parts["shift"], parts["pre_shift"], 1e-5, True),
            (
                x,
                6,
                None,
                randn(g, 6, dtype=f32, device=device),
                randn(g, 2, 6, dtype=f32, device=device),
                None,
                None,
                1e-6,
                False,
            ),
        ]
        if dtype in (torch.float32, torch.float64):
            grad_x = x.detach().clone().requires_grad_()
            w = randn(g, 6, dtype=dtype, device=device).requires_grad_()
            s = randn(g, 2, 6, dtype=dtype, device=device).requires_grad_()
            samples.append(
                (
                    grad_x,
                    2,
                    w,
                    None,
                    s,
                    randn(g, 2, 6, dtype=dtype, device=device),
                    randn(g, 2, 6, dtype=dtype, device=device),
                    1e-5,
                    True,
                )
            )
        return samples

    def native_args(self):
        return dict(
            x=torch.randn(2, 8, 4, 4),
            num_groups=4,
            weight=None,
            bias=None,
            scale=None,
            shift=None,
            pre_shift=None,
            eps=1e-5,
            silu=True,
        )

    def check_meta(self):
        x = torch.empty(2, 8, 5, 7, device="meta", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        out = torch.ops.fastdiff.group_norm_adagn(x, 4, None, None, None, None, None, 1e-5, True)
        assert out.device.type == "meta" and out.dtype == torch.bfloat16 and out.shape == x.shape
        assert out.stride() == x.stride()

    @staticmethod
    def _x():
        return torch.randn(2, 8, 4, 4)

    bad_inputs = [
        BadInput("x-list", lambda: (([[1.0]], 1), {}), TypeError, r"x must be a tensor, got list"),
        BadInput(
            "x-int",
            lambda: ((torch.ones(2, 4, 3, dtype=torch.int64), 2), {}),
            TypeError,
            r"x must be a floating tensor, got torch\.int64",
        ),
        BadInput(
            "x-1d", lambda: ((torch.randn(8), 2), {}), ValueError, r"x must have shape \(B, C, \*spatial\), got \(8,\)"
        ),
        BadInput(
            "groups-3",
            lambda: ((GroupNormAdaGN._x(), 3), {}),
            ValueError,
            r"channels \(8\) must be divisible by num_groups \(3\)",
        ),
        BadInput(
            "groups-0",
            lambda: ((GroupNormAdaGN._x(), 0), {}),
            ValueError,
            r"channels \(8\) must be divisible by num_groups \(0\)",
        ),
        BadInput(
            "groups-bool",
            lambda: ((GroupNormAdaGN._x(), True), {}),
            ValueError,
            r"divisible by num_groups \(True\), num_groups a positive int",
        ),
        BadInput("groups-float", lambda: ((GroupNormAdaGN._x(), 4.0), {}), ValueError, r"num_groups a positive int"),
        BadInput(
            "eps-negative",
            lambda: ((GroupNormAdaGN._x(), 4), {"eps": -1e-5}),
            ValueError,
            r"eps must be a finite real number >= 0, got -1e-05",
        ),
        BadInput(
            "eps-nan",
            lambda: ((GroupNormAdaGN._x(), 4), {"eps": math.nan}),
            ValueError,
            r"eps must be a finite real number >= 0, got nan",
        ),
        BadInput(
            "activation",
            lambda: ((GroupNormAdaGN._x(), 4), {"activation": "gelu"}),
            ValueError,
            r"activation must be one of \(None, 'silu'\), got 'gelu'",
        ),
        BadInput(
            "weight-shape",
            lambda: ((GroupNormAdaGN._x(), 4), {"weight": torch.randn(4)}),
            ValueError,
            r"weight must have shape \(8,\), got \(4,\)",
        ),
        BadInput(
            "bias-shape",
            lambda: ((GroupNormAdaGN._x(), 4), {"bias": torch.randn(2, 8)}),
            ValueError,
            r"bias must have shape \(8,\), got \(2, 8\)",
        ),
        BadInput(
            "scale-shape",
            lambda: ((GroupNormAdaGN._x(), 4), {"scale": torch.randn(3, 8)}),
            ValueError,
            r"scale must have shape \(2, 8\), got \(3, 8\)",
        ),
        BadInput(
            "shift-shape",
            lambda: ((GroupNormAdaGN._x(), 4), {"shift": torch.randn(8)}),
            ValueError,
            r"shift must have shape \(2, 8\), got \(8,\)",
        ),
        BadInput(
            "pre_shift-list",
            lambda: ((GroupNormAdaGN._x(), 4), {"pre_shift": [0.0] * 8}),
            TypeError,
            r"pre_shift must be a tensor or None, got list",
        ),
        BadInput(
            "scale-device",
            lambda: ((GroupNormAdaGN._x(), 4), {"scale": torch.empty(2, 8, device="meta")}),
            ValueError,
            r"scale is on meta but x is on cpu",
        ),
    ]
    native_bad_inputs = [
        NativeBadInput(
            "x-1d",
            lambda: {"x": torch.randn(8)},
            r"group_norm_adagn: x must have shape \(B, C, "
            r"\*spatial\) with at least 2 dimensions, got 1 dimension",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "x-int",
            lambda: {"x": torch.ones(2, 8, 3, dtype=torch.int32)},
            r"group_norm_adagn: x dtype must be float32, float64, float16 or bfloat16, got Int",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "groups-0", lambda: {"num_groups": 0}, r"group_norm_adagn: num_groups must be >= 1, got 0", ("cpu", "meta")
        ),
        NativeBadInput(
            "groups-3",
            lambda: {"num_groups": 3},
            r"group_norm_adagn: channels \(8\) must be divisible by num_groups \(3\)",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "eps-negative",
            lambda: {"eps": -1.0},
            r"group_norm_adagn: eps must be finite and >= 0, got -1",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "eps-inf",
            lambda: {"eps": math.inf},
            r"group_norm_adagn: eps must be finite and >= 0, got inf",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "weight-shape",
            lambda: {"weight": torch.randn(4)},
            r"group_norm_adagn: weight must have shape \(C,\) = \[8\], got \[4\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "bias-shape",
            lambda: {"bias": torch.randn(1, 8)},
            r"group_norm_adagn: bias must have shape \(C,\) = \[8\], got \[1, 8\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "scale-shape",
            lambda: {"scale": torch.randn(3, 8)},
            r"group_norm_adagn: scale must have shape \(B, C\) = \[2, 8\], got \[3, 8\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "shift-shape",
            lambda: {"shift": torch.randn(8)},
            r"group_norm_adagn: shift must have shape \(B, C\) = \[2, 8\], got \[8\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "pre_shift-shape",
            lambda: {"pre_shift": torch.randn(2, 4)},
            r"group_norm_adagn: pre_shift must have shape \(B, C\) = \[2, 8\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "scale-dtype",
            lambda: {"scale": torch.randn(2, 8, dtype=torch.float64)},
            r"group_norm_adagn: scale dtype must be x's dtype \(Float\) or float32, got Double",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "weight-dtype",
            lambda: {"x": torch.randn(2, 8, 4).half(), "weight": torch.randn(8).bfloat16()},
            r"group_norm_adagn: weight dtype must be x's dtype \(Half\) or float32, got BFloat16",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "shift-device",
            lambda: {"shift": torch.empty(2, 8, device="meta")},
            r"group_norm_adagn: shift is on meta but x is on cpu",
        ),
    ]


# ---- layer_norm_modulate -------------------------------------------------------------------------------


class LayerNormModulate(OpCase):
    """(B, N, D): D = 1 and 3 (no full vector), 77 (vector tails), DiT-XL's 1152; N prime; batch 1 and
    odd; one long row (D > 4096: the CPU kernel merges the moments of two blocks); one shape large
    enough to spread over threads. Layouts: contiguous, every other token of a (B, 2N, D) buffer
    (features contiguous, read in place), a (B, D, N) buffer seen as (B, N, D) (the op copies once).
    The Triton interpreter's grid: D = 1 and 3 in a masked tile, 77 (tile 128), 1152 (tile 2048), N
    prime and past a program's 16 rows (FASTDIFF_FULL_TRITON=1 adds three more)."""

    op = "layer_norm_modulate"
    native_op = "layer_norm_modulate"
    triton_op = "layer_norm_modulate_triton"
    layouts = ("contiguous", "strided-rows", "transposed")
    PARTS = ("none", "affine", "modulate", "all")
    shapes = [
        (param_id(s), s)
        for s in [(2, 7, 1), (1, 13, 3), (3, 17, 77), (2, 5, 1152), (5, 31, 64), (1, 3, 5003), (3, 67, 256)]
    ]
    triton_shapes = [(param_id(s), s) for s in [(2, 7, 1), (1, 13, 3), (3, 17, 77), (1, 5, 1152)]] + (
        [(param_id(s), s) for s in [(5, 67, 40), (2, 300, 384), (1, 3, 5003)]] if full_triton_grid() else []
    )
    # warp kernel (row in registers) with 16-byte vectors and without, at its largest vectorized row
    # (1536) and just past it; the block kernel (D = 8192 vectorized)
    cuda_shapes = [(f"cuda-{param_id(s)}", s) for s in [(8, 256, 1152), (2, 5, 1536), (2, 5, 1544), (2, 3, 8192)]]
    float64_shapes = [("(2,7,77)", (2, 7, 77))]
    bad_backends = ("auto", "reference", "cpu", "triton")

    from fastdiff.reference import layer_norm_modulate as reference

    def make_x(self, shape, dtype, layout, device="cpu", g=None):
        g = g or generator()
        B, N, D = shape
        if layout == "strided-rows":
            x = randn(g, B, 2 * N, D, dtype=dtype, device=device, scale=3, offset=1)[:, ::2]
        elif layout == "transposed":
            x = randn(g, B, D, N, dtype=dtype, device=device, scale=3, offset=1).transpose(1, 2)
        else:
            x = randn(g, *shape, dtype=dtype, device=device, scale=3, offset=1)
        assert x.shape == shape
        return x

    def make_parts(self, kind, B, D, dtype, device="cpu", g=None):
        """scale and shift are chunks of one (B, 6D) projection, as in DiT (strided views)."""
        g = g or generator(1)
        affine, modulate = kind in ("affine", "all"), kind in ("modulate", "all")
        chunks = randn(g, B, 6 * D, dtype=dtype, device=device).chunk(6, dim=1)
        return {
            "weight": randn(g, D, dtype=dtype, device=device) if affine else None,
            "bias": randn(g, D, dtype=dtype, device=device) if affine else None,
            "scale": chunks[1] if modulate else None,
            "shift": chunks[0] if modulate else None,
        }

    def call(self, x, parts=None, eps=1e-6, what="", layout=""):
        return Call((x,), {**(parts or {}), "eps": eps}, what, layout)

    def calls(self, spec, dtype, layout, device, *, full=True, seed=0):
        g = generator(seed)
        x = self.make_x(spec, dtype, layout, device, g)
        return [
            self.call(
                x,
                self.make_parts(kind, spec[0], spec[2], dtype, device, g),
                what=f"{dtype} {spec} {layout} parts={kind}",
                layout=layout,
            )
            for kind in self.PARTS
        ]

    def expect(self, out, call):
        x = call.args[0]
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device, call.what
        assert out.is_contiguous(), f"{call.what}: strides {out.stride()}"

    def opcheck_grid(self, kind):
        if kind == "triton":
            return [(d, "strided-rows") for d in DTYPES]
        return [(d, layout) for d in (*DTYPES, torch.float64) for layout in ("contiguous", "strided-rows")]

    def opcheck_samples(self, kind, dtype, layout, device):
        g = generator()
        x = self.make_x((2, 5, 24), dtype, layout, device, g)
        parts = self.make_parts("all", 2, 24, dtype, device, g)
        samples = [(x, parts["weight"], parts["bias"], parts["scale"], parts["shift"], 1e-6)]
        if kind == "triton":
            return [*samples, (x, None, None, None, None, 1e-5)]
        f32 = torch.float32
        samples.append(
            (x, None, randn(g, 24, dtype=f32, device=device), randn(g, 2, 24, dtype=f32, device=device), None, 1e-5)
        )
        if dtype in (torch.float32, torch.float64):
            grad_x = x.detach().clone().requires_grad_()
            w = randn(g, 24, dtype=dtype, device=device).requires_grad_()
            s = randn(g, 2, 24, dtype=dtype, device=device).requires_grad_()
            samples.append((grad_x, w, None, s, randn(g, 2, 24, dtype=dtype, device=device), 1e-6))
        return samples

    def native_args(self):
        return dict(x=torch.randn(2, 5, 8), weight=None, bias=None, scale=None, shift=None, eps=1e-6)

    def check_meta(self):
        x = torch.empty(2, 16, 10, device="meta", dtype=torch.bfloat16).transpose(0, 1)  # (16, 2, 10), strided
        out = torch.ops.fastdiff.layer_norm_modulate(x, None, None, None, None, 1e-6)
        assert out.device.type == "meta" and out.dtype == torch.bfloat16 and out.shape == x.shape
        assert out.is_contiguous()

    @staticmethod
    def _x():
        return torch.randn(2, 5, 8)

    bad_inputs = [
        BadInput("x-list", lambda: (([[1.0]],), {}), TypeError, r"x must be a tensor, got list"),
        BadInput(
            "x-int",
            lambda: ((torch.ones(2, 4, 3, dtype=torch.int64),), {}),
            TypeError,
            r"x must be a floating tensor, got torch\.int64",
        ),
        BadInput(
            "x-2d", lambda: ((torch.randn(8, 4),), {}), ValueError, r"x must have shape \(B, N, D\), got \(8, 4\)"
        ),
        BadInput(
            "x-4d",
            lambda: ((torch.randn(2, 3, 4, 5),), {}),
            ValueError,
            r"x must have shape \(B, N, D\), got \(2, 3, 4, 5\)",
        ),
        BadInput(
            "x-D0",
            lambda: ((torch.randn(2, 3, 0),), {}),
            ValueError,
            r"x must have D >= 1 features, got shape \(2, 3, 0\)",
        ),
        BadInput(
            "eps-negative",
            lambda: ((LayerNormModulate._x(),), {"eps": -1e-5}),
            ValueError,
            r"eps must be a finite real number >= 0, got -1e-05",
        ),
        BadInput(
            "eps-nan",
            lambda: ((LayerNormModulate._x(),), {"eps": math.nan}),
            ValueError,
            r"eps must be a finite real number >= 0, got nan",
        ),
        BadInput(
            "eps-str",
            lambda: ((LayerNormModulate._x(),), {"eps": "1e-6"}),
            ValueError,
            r"eps must be a finite real number >= 0, got '1e-6'",
        ),
        BadInput(
            "weight-shape",
            lambda: ((LayerNormModulate._x(),), {"weight": torch.randn(4)}),
            ValueError,
            r"weight must have shape \(8,\), got \(4,\)",
        ),
        BadInput(
            "bias-shape",
            lambda: ((LayerNormModulate._x(),), {"bias": torch.randn(2, 8)}),
            ValueError,
            r"bias must have shape \(8,\), got \(2, 8\)",
        ),
        BadInput(
            "scale-shape",
            lambda: ((LayerNormModulate._x(),), {"scale": torch.randn(3, 8)}),
            ValueError,
            r"scale must have shape \(2, 8\), got \(3, 8\)",
        ),
        BadInput(
            "scale-3d",
            lambda: ((LayerNormModulate._x(),), {"scale": torch.randn(2, 1, 8)}),
            ValueError,
            r"scale must have shape \(2, 8\), got \(2, 1, 8\)",
        ),
        BadInput(
            "shift-shape",
            lambda: ((LayerNormModulate._x(),), {"shift": torch.randn(8)}),
            ValueError,
            r"shift must have shape \(2, 8\), got \(8,\)",
        ),
        BadInput(
            "shift-list",
            lambda: ((LayerNormModulate._x(),), {"shift": [0.0] * 8}),
            TypeError,
            r"shift must be a tensor or None, got list",
        ),
        BadInput(
            "weight-int",
            lambda: ((LayerNormModulate._x(),), {"weight": torch.ones(8, dtype=torch.int32)}),
            TypeError,
            r"weight must be a floating tensor, got torch\.int32",
        ),
        BadInput(
            "scale-device",
            lambda: ((LayerNormModulate._x(),), {"scale": torch.empty(2, 8, device="meta")}),
            ValueError,
            r"scale is on meta but x is on cpu",
        ),
    ]
    native_bad_inputs = [
        NativeBadInput(
            "x-2d",
            lambda: {"x": torch.randn(8, 4)},
            r"layer_norm_modulate: x must have shape \(B, N, D\), got 2 dimension\(s\) \[8, 4",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "x-int",
            lambda: {"x": torch.ones(2, 8, 3, dtype=torch.int32)},
            r"layer_norm_modulate: x dtype must be float32, float64, float16 or bfloat16, got Int",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "eps-negative",
            lambda: {"eps": -1.0},
            r"layer_norm_modulate: eps must be finite and >= 0, got -1",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "eps-inf",
            lambda: {"eps": math.inf},
            r"layer_norm_modulate: eps must be finite and >= 0, got inf",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "weight-shape",
            lambda: {"weight": torch.randn(4)},
            r"layer_norm_modulate: weight must have shape \(D,\) = \[8\], got \[4\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "bias-shape",
            lambda: {"bias": torch.randn(1, 8)},
            r"layer_norm_modulate: bias must have shape \(D,\) = \[8\], got \[1, 8\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "scale-shape",
            lambda: {"scale": torch.randn(3, 8)},
            r"layer_norm_modulate: scale must have shape \(B, D\) = \[2, 8\], got \[3, 8\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "shift-shape",
            lambda: {"shift": torch.randn(8)},
            r"layer_norm_modulate: shift must have shape \(B, D\) = \[2, 8\], got \[8\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "scale-dtype",
            lambda: {"scale": torch.randn(2, 8, dtype=torch.float64)},
            r"layer_norm_modulate: scale dtype must be x's dtype \(Float\) or float32, got Double",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "weight-dtype",
            lambda: {"x": torch.randn(2, 4, 8).half(), "weight": torch.randn(8).bfloat16()},
            r"layer_norm_modulate: weight dtype must be x's dtype \(Half\) or float32, got BFloat16",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "shift-device",
            lambda: {"shift": torch.empty(2, 8, device="meta")},
            r"layer_norm_modulate: shift is on meta but x is on cpu",
        ),
    ]


# ---- cfg_combine ---------------------------------------------------------------------------------------


class CfgCombine(OpCase):
    """(rows, *rest): 2 to 14 rows, a 1-D rest, an odd 3-D one, a 1×1×1 one, and one of 3·129·129
    elements per half (above the CPU kernel's 32768 parallel grain and no multiple of any vector
    width: the threaded split and the scalar tails). Layouts: contiguous, transposed (every dim
    reversed), every other row of a buffer, and rows expanded from one (stride 0). Each point runs
    guidance scales 4, 1, 0 and -2.5."""

    op = "cfg_combine"
    native_op = "cfg_combine"
    layouts = ("contiguous", "transposed", "strided-rows", "expanded")
    SCALES = (4.0, 1.0, 0.0, -2.5)
    shapes = [
        (f"{rows}x{param_id(rest)}", (rows, *rest)) for rest in ((3,), (4, 7, 9), (1, 1, 1)) for rows in (2, 6, 14)
    ] + [("2x(3,129,129)", (2, 3, 129, 129))]
    float64_shapes = [("6x(5,)", (6, 5)), ("2x(3,129,129)", (2, 3, 129, 129))]

    from fastdiff.reference.guidance import cfg_combine as reference

    def applies(self, spec, layout):
        # a view of a (rows, 1, 1, 1) tensor is contiguous whatever its strides: nothing to tell apart
        return layout == "contiguous" or math.prod(spec[1:]) > 1

    def make_x(self, shape, dtype, layout, device="cpu", g=None):
        g = g or generator()
        rows, rest = shape[0], shape[1:]
        if layout == "transposed":
            x = randn(g, *reversed(shape), dtype=dtype, device=device).permute(*reversed(range(len(shape))))
        elif layout == "strided-rows":
            x = randn(g, 2 * rows, *rest, dtype=dtype, device=device)[::2]
        elif layout == "expanded":
            x = randn(g, 1, *rest, dtype=dtype, device=device).expand(rows, *rest)
        else:
            x = randn(g, *shape, dtype=dtype, device=device)
        assert x.shape == shape and x.is_contiguous() == (layout == "contiguous"), (layout, x.stride())
        return x

    def calls(self, spec, dtype, layout, device, *, full=True, seed=0):
        x = self.make_x(spec, dtype, layout, device, generator(seed))
        return [Call((x, s), {}, f"{dtype} {spec} {layout} scale={s}", layout) for s in self.SCALES]

    def expect(self, out, call):
        x = call.args[0]
        assert out.shape == (x.shape[0] // 2, *x.shape[1:]) and out.dtype == x.dtype, call.what
        assert out.device == x.device and out.is_contiguous(), f"{call.what}: strides {out.stride()}"

    def opcheck_grid(self, kind):
        return [(d, "any") for d in (*DTYPES, torch.float64)] if kind == "native" else []

    def opcheck_samples(self, kind, dtype, layout, device):
        g = generator()
        samples = [
            (randn(g, 6, 3, dtype=dtype, device=device), 2.5),
            (randn(g, 2, 4, 7, 9, dtype=dtype, device=device), -1.0),
            (self.make_x((14, 4, 7, 9), dtype, "transposed", device, g), 4.0),
        ]
        if dtype in (torch.float32, torch.float64):
            samples.append((randn(g, 4, 5, dtype=dtype, device=device).requires_grad_(), 3.0))
        return samples

    def native_args(self):
        return dict(model_out=torch.ones(4, 2), scale=1.0)

    def check_meta(self):
        out = torch.ops.fastdiff.cfg_combine(torch.empty(6, 4, 7, device="meta", dtype=torch.bfloat16), 2.0)
        assert out.shape == (3, 4, 7) and out.dtype == torch.bfloat16 and out.device.type == "meta"

    bad_inputs = [
        BadInput(
            "list",
            lambda: (([[1.0, 2.0], [3.0, 4.0]], 1.0), {}),
            TypeError,
            r"model_out must be a torch\.Tensor, got list",
        ),
        BadInput(
            "int",
            lambda: ((torch.ones(4, 3, dtype=torch.int64), 1.0), {}),
            TypeError,
            r"model_out must be a floating tensor.*int64",
        ),
        BadInput(
            "complex",
            lambda: ((torch.ones(4, 3, dtype=torch.complex64), 1.0), {}),
            TypeError,
            r"model_out must be a floating tensor",
        ),
        BadInput(
            "0-d",
            lambda: ((torch.tensor(1.0), 1.0), {}),
            ValueError,
            r"model_out must have an even number.*got shape \(\)",
        ),
        BadInput(
            "odd-rows",
            lambda: ((torch.ones(3, 4), 1.0), {}),
            ValueError,
            r"model_out must have an even number.*\(3, 4\)",
        ),
        BadInput(
            "no-rows",
            lambda: ((torch.ones(0, 4), 1.0), {}),
            ValueError,
            r"model_out must have an even number \(>= 2\).*\(0, 4\)",
        ),
        BadInput("scale-str", lambda: ((torch.ones(4, 3), "2"), {}), TypeError, r"scale must be a real number.*str"),
        BadInput("scale-bool", lambda: ((torch.ones(4, 3), True), {}), TypeError, r"scale must be a real number.*bool"),
        BadInput(
            "scale-tensor",
            lambda: ((torch.ones(4, 3), torch.tensor(2.0)), {}),
            TypeError,
            r"scale must be a real number.*Tensor",
        ),
        BadInput("scale-nan", lambda: ((torch.ones(4, 3), math.nan), {}), ValueError, r"scale must be finite, got nan"),
        BadInput(
            "scale-inf", lambda: ((torch.ones(4, 3), -math.inf), {}), ValueError, r"scale must be finite, got -inf"
        ),
    ]
    native_bad_inputs = [
        NativeBadInput(
            "odd-rows",
            lambda: {"model_out": torch.ones(3, 2)},
            r"cfg_combine: model_out must have an even number of rows .* got 3",
        ),
        NativeBadInput(
            "int",
            lambda: {"model_out": torch.ones(4, 2, dtype=torch.int32)},
            r"cfg_combine: model_out dtype must be float32, float64, float16 or bfloat16, got Int",
        ),
        NativeBadInput(
            "0-d", lambda: {"model_out": torch.tensor(1.0)}, r"cfg_combine: model_out must have at least 1 dimension"
        ),
        NativeBadInput("scale-inf", lambda: {"scale": math.inf}, r"cfg_combine: scale must be finite, got inf"),
    ]


# ---- sampler_step ----------------------------------------------------------------------------------------

SCHEDULE = fastdiff.Schedule("linear")
STEPS = 10
STEP_INDICES = (0, 4, STEPS - 1)
CFG = 3.5
SAMPLER_CONFIGS = {
    "ddim-eps": dict(cls="ddim", prediction="eps"),
    "ddim-v-eta-clip": dict(cls="ddim", prediction="v", eta=0.7, clip_x0=1.0),
    "ddim-x0-learned": dict(cls="ddim", prediction="x0", variance="learned_range"),
    "ddpm-small": dict(cls="ddpm", prediction="eps", variance="fixed_small"),
    "ddpm-large-v-clip": dict(cls="ddpm", prediction="v", variance="fixed_large", clip_x0=1.0),
    "ddpm-learned": dict(cls="ddpm", prediction="eps", variance="learned_range"),
    "euler-v-trailing": dict(cls="euler", prediction="v", timestep_spacing="trailing"),
    "euler_a-eps": dict(cls="euler_a", prediction="eps"),
    "euler-x0-linspace": dict(cls="euler", prediction="x0", timestep_spacing="linspace"),  # float32 timesteps
    "dpmpp_2m-v": dict(cls="dpmpp_2m", prediction="v"),  # the history input carries the previous step's x0
    "dpmpp_2m_sde-eps-karras": dict(cls="dpmpp_2m_sde", prediction="eps", karras_sigmas=True),  # history and noise
}
SAMPLER_SHAPES = {"7x9": (3, 4, 7, 9), "1x1": (1, 3, 1, 1), "1d-prime": (2, 5, 13)}


def make_sampler(config: str, dtype=torch.float32, device="cpu"):
    from fastdiff.sampling import make_sampler as make

    kw = dict(SAMPLER_CONFIGS[config])
    return make(kw.pop("cls"), SCHEDULE, STEPS, dtype=dtype, device=device, **kw)


def learned_range(sampler) -> bool:
    from fastdiff.sampling import DDPMSampler

    return sampler.variance == "learned_range" and isinstance(sampler, DDPMSampler)


def step_inputs(sampler, shape, guided, dtype, device, layout="contiguous", seed=0, g=None):
    """x, model_output (2B rows when guided; 2C channels with learned variances, in [-1, 1]) and noise,
    drawn from ``g`` (default: a generator seeded with ``seed``)."""
    g = g or generator(seed)
    B, C = shape[:2]
    rows = 2 * B if guided else B
    channels = 2 * C if sampler.variance == "learned_range" else C
    x = torch.randn(shape, generator=g)
    out = torch.randn((rows, channels) + shape[2:], generator=g)
    if sampler.variance == "learned_range":
        out[:, C:] = torch.tanh(out[:, C:])  # the variance channels lie in [-1, 1]
    noise = torch.randn(shape, generator=g)
    x, out, noise = (t.to(dtype=dtype, device=device) for t in (x, out, noise))
    if layout == "channels_last" and x.dim() == 4:
        x, out, noise = (t.contiguous(memory_format=torch.channels_last) for t in (x, out, noise))
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]  # a non-contiguous view with x's values
    return x, out, noise


def step_oracle(sampler, i, x, out, noise, cfg, upcast, history=None):
    """The oracle step (fastdiff.reference.sampling's, itself checked against diffusers) in x's dtype
    (eager) or, given float64 inputs, exactly; ``history`` is a multistep solver's previous x0."""
    from fastdiff.reference import ddim_step, ddpm_step, dpmpp_2m_step, euler_step
    from fastdiff.sampling import DDIMSampler, DPMSolverPlusPlus2MSampler, EulerSampler

    B, C = x.shape[:2]
    if out.shape[0] == 2 * B:
        u, c = out.chunk(2)
        out = torch.cat([u[:, :C] + cfg * (c[:, :C] - u[:, :C]), c[:, C:]], dim=1)
    table = torch.promote_types(x.dtype, sampler.alpha_t.dtype)  # the sampler's float32 tables, or float64
    a, ap = (t[i].to(device=x.device, dtype=table) for t in (sampler.alpha_t, sampler.alpha_prev))
    if isinstance(sampler, DPMSolverPlusPlus2MSampler):
        before = sampler.alpha_before(i)
        before = None if before is None else before.to(device=x.device, dtype=table)
        return dpmpp_2m_step(
            x,
            out[:, :C],
            a,
            ap,
            prediction=sampler.prediction,
            alpha_before=before,
            previous_x0=history,
            sde=sampler.sde,
            noise=noise if sampler.draws_noise(i) else None,
            upcast=upcast,
        )
    if isinstance(sampler, EulerSampler):
        add = sampler.draws_noise(i)
        return euler_step(
            x,
            out[:, :C],
            a,
            ap,
            prediction=sampler.prediction,
            ancestral=sampler.ancestral,
            noise=noise if add else None,
            upcast=upcast,
        )
    common = dict(prediction=sampler.prediction, clip=sampler.clip_x0, upcast=upcast)
    if isinstance(sampler, DDIMSampler):
        return ddim_step(x, out[:, :C], a, ap, eta=sampler.eta, noise=noise, **common)
    add = sampler.draws_noise(i)
    return ddpm_step(x, out, a, ap, variance=sampler.variance, add_noise=add, noise=noise if add else None, **common)


class SamplerStep(OpCase):
    """(sampler config, shape): DDIM/DDPM × eps/v/x0 × fixed/learned variances × clipping, at 7×9,
    1×1 and a prime 1-D length; layouts contiguous, channels_last (4-D) and a strided x. Each point
    runs unguided and guided (2B rows, cfg 3.5) at the first, a middle and the last step, with the
    noise where the step draws it. The oracle is the step-by-step reference sampler
    (fastdiff.reference.sampling), not the fused reference kernel."""

    op = "sampler_step"
    native_op = "sampler_step"
    layouts = ("contiguous", "channels_last", "strided")
    shapes = [
        (f"{config}-{name}", (config, shape)) for config in SAMPLER_CONFIGS for name, shape in SAMPLER_SHAPES.items()
    ]
    triton_shapes = [
        (f"{config}-7x9", (config, SAMPLER_SHAPES["7x9"]))
        for config in ("ddim-v-eta-clip", "ddpm-learned", "euler_a-eps", "dpmpp_2m-v")
    ]
    float64_shapes = [
        ("ddpm-learned-7x9", ("ddpm-learned", (3, 4, 7, 9))),
        ("ddim-v-eta-clip-1d-prime", ("ddim-v-eta-clip", (2, 5, 13))),
    ]

    def applies(self, spec, layout):
        return layout != "channels_last" or len(spec[1]) == 4

    def calls(self, spec, dtype, layout, device, *, full=True, seed=0):
        config, shape = spec
        sampler = make_sampler(config, dtype, device)
        calls = []
        for guided in (False, True):
            x, out, noise = step_inputs(sampler, shape, guided, dtype, device, layout, seed)
            for i in STEP_INDICES:
                kwargs = dict(
                    cfg_scale=CFG if guided else None,
                    learned_range=learned_range(sampler),
                    clip=sampler.clip_x0,
                    noise=noise if sampler.draws_noise(i) else None,
                    return_x0=True,
                )
                if sampler.multistep:  # the previous step's x0: any values (not the noise's), in its layout
                    kwargs["history"] = noise * -0.5 + 0.1
                call = Call(
                    (x, out, sampler.coefs, i),
                    kwargs,
                    f"{dtype} {config} {'cfg' if guided else 'plain'} {shape} {layout} step {i}",
                    layout,
                )
                call.sampler = sampler
                calls.append(call)
        return calls

    def oracle(self, call):
        x, out, _, i = call.args
        noise, cfg, history = call.kwargs["noise"], call.kwargs["cfg_scale"] or 1.0, call.kwargs.get("history")
        x64, out64, noise64, history64 = as_float64((x, out, noise, history))
        exact = step_oracle(call.sampler, i, x64, out64, noise64, cfg, False, history64)
        xc, outc, noisec, historyc = on_cpu((x, out, noise, history))
        eager = step_oracle(call.sampler, i, xc, outc, noisec, cfg, False, historyc)
        return exact, eager

    def expect(self, out, call):
        prev, x0 = out
        x = call.args[0]
        assert prev.dtype == x.dtype and prev.shape == x.shape and prev.device == x.device, call.what
        assert x0.shape == x.shape and x0.stride() == prev.stride(), call.what
        if call.layout == "channels_last":
            assert prev.is_contiguous(memory_format=torch.channels_last), f"{call.what}: strides {prev.stride()}"

    def opcheck_grid(self, kind):
        variants = ("plain", "cfg-learned-x0", "philox-clip", "threshold-noise")
        return [(d, v) for d in (*DTYPES, torch.float64) for v in variants] if kind == "native" else []

    def opcheck_samples(self, kind, dtype, variant, device):
        sampler = make_sampler("ddpm-learned" if "learned" in variant else "ddim-v-eta-clip", dtype, device)
        x, out, noise = step_inputs(sampler, (2, 3, 5, 4), "cfg" in variant, dtype, device)
        return [
            (
                x,
                out,
                sampler.coefs,
                torch.tensor(3, device=device),
                2.0,
                "learned" in variant,
                1.0 if "clip" in variant else math.inf,
                torch.full((2,), 1.3, device=device) if "threshold" in variant else None,
                noise if "noise" in variant else None,
                torch.tensor(11, device=device) if "philox" in variant else None,
                "x0" in variant,
            )
        ]

    def native_args(self):
        sampler = make_sampler("ddim-eps")
        x, out, _ = step_inputs(sampler, (2, 3, 5, 4), False, torch.float32, "cpu")
        return dict(
            x=x,
            model_output=out,
            coefs=sampler.coefs,
            step=torch.tensor(1),
            cfg_scale=1.0,
            learned_range=False,
            clip=math.inf,
            threshold=None,
            noise=None,
            philox_seed=None,
            return_x0=False,
        )

    def check_meta(self):
        args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in self.native_args().items()}
        args["x"] = args["x"].contiguous(memory_format=torch.channels_last)
        prev, x0 = torch.ops.fastdiff.sampler_step(*dict(args, return_x0=True).values())
        assert prev.device.type == "meta" and prev.shape == args["x"].shape and prev.dtype == torch.float32
        assert prev.stride() == args["x"].stride() and x0.stride() == prev.stride()

    @staticmethod
    def _bad(**kwargs):
        sampler = make_sampler("ddim-eps")
        x, out, _ = step_inputs(sampler, (2, 3, 5, 4), False, torch.float32, "cpu")
        args = dict(x=x, model_output=out, coefs=sampler.coefs, step=1) | kwargs
        return (args.pop("x"), args.pop("model_output"), args.pop("coefs"), args.pop("step")), args

    bad_inputs = [
        BadInput(
            "rows",
            lambda: SamplerStep._bad(model_output=torch.randn(3, 3, 5, 4)),
            ValueError,
            r"B \(2\) rows, or 2B \(4\)",
        ),
        BadInput(
            "2B-rows-no-cfg",
            lambda: SamplerStep._bad(model_output=torch.randn(4, 3, 5, 4)),
            ValueError,
            "2B rows .* but cfg_scale is None",
        ),
        BadInput(
            "learned_range", lambda: SamplerStep._bad(learned_range=True), ValueError, r"must have 2C \(6\) channels"
        ),
        BadInput("step-range", lambda: SamplerStep._bad(step=10), ValueError, r"step must be in \[0, 10\)"),
        BadInput(
            "step-float",
            lambda: SamplerStep._bad(step=1.5),
            TypeError,
            "step must be an int or a one-element int64 tensor",
        ),
        BadInput(
            "coefs",
            lambda: SamplerStep._bad(coefs=torch.randn(10, 5)),
            ValueError,
            r"coefs must be a float32/float64 table \(steps, 12\)",
        ),
        BadInput("clip", lambda: SamplerStep._bad(clip=-1.0), ValueError, "clip must be a positive number"),
        BadInput(
            "noise-and-philox",
            lambda: SamplerStep._bad(noise=torch.randn(2, 3, 5, 4), philox_seed=3),
            ValueError,
            "noise or philox_seed, not both",
        ),
        BadInput("philox_seed", lambda: SamplerStep._bad(philox_seed=-3), ValueError, "philox_seed must be an int"),
        BadInput(
            "x-int",
            lambda: SamplerStep._bad(x=torch.ones(2, 3, 5, 4, dtype=torch.int64)),
            TypeError,
            "x must be a floating tensor",
        ),
        BadInput(
            "clip-and-threshold",
            lambda: SamplerStep._bad(threshold=torch.ones(2), clip=1.0),
            ValueError,
            "clip or threshold, not both",
        ),
        BadInput(
            "history-shape",
            lambda: SamplerStep._bad(history=torch.randn(2, 3, 5)),
            ValueError,
            r"history must be a tensor like x \(\(2, 3, 5, 4\), torch.float32, cpu\) holding the previous",
        ),
        BadInput(
            "history-dtype",
            lambda: SamplerStep._bad(history=torch.randn(2, 3, 5, 4, dtype=torch.float64)),
            ValueError,
            "history must be a tensor like x .* got \\(2, 3, 5, 4\\) torch.float64",
        ),
    ]
    native_bad_inputs = [
        NativeBadInput(
            "rows",
            lambda: dict(model_output=torch.randn(3, 3, 5, 4)),
            r"model_output must have B \(2\) rows, or 2B \(4\)",
        ),
        NativeBadInput(
            "channels", lambda: dict(model_output=torch.randn(2, 5, 5, 4)), r"must have C \(3\) channels, or 2C \(6\)"
        ),
        NativeBadInput(
            "learned_range", lambda: dict(learned_range=True), r"learned_range needs 2C \(6\) model_output channels"
        ),
        NativeBadInput("spatial", lambda: dict(model_output=torch.randn(2, 3, 5, 5)), "spatial size"),
        NativeBadInput(
            "model_output-dtype",
            lambda: dict(model_output=torch.randn(2, 3, 5, 4, dtype=torch.float64)),
            "model_output dtype",
        ),
        NativeBadInput(
            "x-int",
            lambda: dict(x=torch.ones(2, 3, 5, 4, dtype=torch.int32)),
            "x dtype must be float32, float64, float16 or bfloat16",
        ),
        NativeBadInput("x-1d", lambda: dict(x=torch.randn(6)), r"x must have shape \(B, C, \*spatial\)"),
        NativeBadInput("coefs", lambda: dict(coefs=torch.randn(10, 7)), r"coefs must have shape \(steps, 12\)"),
        NativeBadInput("step-10", lambda: dict(step=torch.tensor(10)), r"step index 10 is out of range \[0, 10\)"),
        NativeBadInput("step-negative", lambda: dict(step=torch.tensor(-1)), r"step index -1 is out of range"),
        NativeBadInput("step-float", lambda: dict(step=torch.tensor(1.0)), "step must be an int64 tensor"),
        NativeBadInput("noise-shape", lambda: dict(noise=torch.randn(2, 3, 5)), "noise must have x's shape"),
        NativeBadInput(
            "noise-and-philox",
            lambda: dict(noise=torch.randn(2, 3, 5, 4), philox_seed=torch.tensor(1)),
            "noise or philox_seed, not both",
        ),
        NativeBadInput("clip", lambda: dict(clip=0.0), r"clip must be > 0 \(inf for no clipping\)"),
        NativeBadInput("cfg_scale", lambda: dict(cfg_scale=math.nan), "cfg_scale must be finite"),
        NativeBadInput("threshold", lambda: dict(threshold=torch.ones(3)), r"threshold must have shape \(2,\)"),
        NativeBadInput("history-shape", lambda: dict(history=torch.randn(2, 3, 5)), "history must have x's shape"),
        NativeBadInput(
            "history-dtype",
            lambda: dict(history=torch.randn(2, 3, 5, 4, dtype=torch.float64)),
            r"history dtype \(Double\) must equal x's \(Float\)",
        ),
    ]


# ---- sampler_loop_step -----------------------------------------------------------------------------------

LOOP_SHAPES = {**SAMPLER_SHAPES, "B1-5x7": (1, 3, 5, 7), "3d": (3, 2, 3, 5, 7), "empty": (0, 3, 5, 7)}
DRAWS = ("none", "tensor", "philox")
PHILOX_SEED = 2**40 + 7
# A batch's first image index ("philox2": philox_seed = (key, first)) whose images wrap past 2**32 - 1
PHILOX_FIRST = 2**32 - 2
CFG64 = 3.0 + 1e-7  # not a float32: a float64 cfg tensor must combine as sampler_step's float argument does
META = ("cpu", "meta")  # checks the Meta kernel makes too (those that need no data nor concrete sizes)


def _loop_bad(id: str, overrides: Callable[[], dict], match: str, devices=("cpu",)) -> NativeBadInput:
    return NativeBadInput(id, overrides, f"sampler_loop_step: {match}", devices)


def _loop_shares(name: str) -> Callable[[], dict]:
    """Overrides that put ``name`` in x_in's memory (the step would read it half-updated)."""

    def overrides():
        x_in = torch.randn(4, 3, 5, 4)
        return {"x_in": x_in, name: x_in if name == "model_output" else x_in[2:]}

    return overrides


class SamplerLoopStep(OpCase):
    """(sampler config, shape): sampler_step's configs at its shapes, plus batch 1 on 5×7, a 3-D spatial
    input and an empty batch. x_in is the loop's buffer (contiguous; x twice when guided). Layouts: the
    model output and noise contiguous, or "views": the model output channels_last (4-D) or every other
    element of its last dim, the noise every other element. Each point runs unguided and guided (a
    float32 cfg tensor, 3.5) × no noise, a noise tensor (where the step draws it) and Philox noise ×
    the first, a middle and the last step, and Philox noise counted from a batch's first image (a
    two-element philox_seed, the images wrapping past 2**32) at the middle step; then dynamic
    thresholding (the model output ×4: x0 past the thresholds) and, guided, a float64 cfg tensor not
    representable in float32. The outputs are the state the step writes, (x_in, the counter, t_in),
    each against the oracle's (fastdiff.reference.sampler_step.sampler_loop_step on clones): x_in
    within the dtype's bound, the counter at s + 1, t_in at timesteps[s + 1] (unchanged after the last
    step)."""

    op = "sampler_loop_step"
    native_op = "sampler_loop_step"
    layouts = ("contiguous", "views")
    shapes = [
        (f"{config}-{name}", (config, shape)) for config in SAMPLER_CONFIGS for name, shape in LOOP_SHAPES.items()
    ]
    triton_shapes = [
        (f"{config}-7x9", (config, LOOP_SHAPES["7x9"]))
        for config in ("ddim-v-eta-clip", "ddpm-learned", "euler_a-eps", "dpmpp_2m_sde-eps-karras", "euler-x0-linspace")
    ]
    cuda_shapes = [(f"cuda-{config}-8x8", (config, (2, 4, 8, 8))) for config in SAMPLER_CONFIGS]
    float64_shapes = shapes

    def applies(self, spec, layout):
        shape = spec[1]
        return layout == "contiguous" or (shape[0] > 0 and math.prod(shape[2:]) > 1)  # else no view to tell apart

    def make_call(
        self,
        config,
        shape,
        dtype,
        device="cpu",
        *,
        guided,
        draw="none",
        step=0,
        threshold=False,
        cfg64=False,
        layout="contiguous",
        seed=0,
        sampler=None,
    ) -> Call:
        """One call of the public op (its arguments on ``device``); ``call.sampler`` is the sampler."""
        sampler = sampler or make_sampler(config, dtype, device)
        g = generator(seed)
        B, C = shape[:2]
        x, out, noise = step_inputs(sampler, shape, guided, dtype, device, g=g)
        thresholds = (0.5 + torch.rand(B, generator=g)).to(device) if threshold else None
        if threshold:
            out[:, :C] *= 4  # x0 beyond the thresholds (learned variances stay in [-1, 1])
        if layout == "views":
            out = (
                out.contiguous(memory_format=torch.channels_last)
                if out.dim() == 4
                else torch.cat([out, out], dim=-1)[..., ::2]
            )
            noise = torch.cat([noise, noise], dim=-1)[..., ::2]
            assert not out.is_contiguous() and not noise.is_contiguous()
        cfg = None
        if guided:
            cfg = (
                torch.tensor(CFG64, dtype=torch.float64, device=device)
                if cfg64  # 0-d is one element too
                else torch.tensor([CFG], dtype=torch.float32, device=device)
            )
        kwargs = dict(
            cfg_scale=cfg,
            learned_range=learned_range(sampler),
            clip=None if threshold else sampler.clip_x0,
            threshold=thresholds,
            noise=noise if draw == "tensor" else None,
            philox_seed=(
                torch.tensor(PHILOX_SEED, device=device)
                if draw == "philox"
                else torch.tensor([PHILOX_SEED, PHILOX_FIRST], device=device)
                if draw == "philox2"
                else None
            ),
            t_in=torch.full((2 * B if guided else B,), -1, dtype=sampler.timesteps_device.dtype, device=device),
            timesteps=sampler.timesteps_device,
        )
        if sampler.multistep:  # the loop's buffer of the previous x0, which the step rewrites
            kwargs["history"] = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
        x_in = torch.cat([x, x]) if guided else x
        what = (
            f"{dtype} {config} {shape} {layout} {'cfg' if guided else 'plain'}{'64' if cfg64 else ''} {draw}"
            f"{' threshold' if threshold else ''} step {step}"
        )
        call = Call(
            (x_in, out, sampler.coefs, torch.tensor(step, dtype=torch.int64, device=device)), kwargs, what, layout
        )
        call.sampler = sampler
        return call

    def calls(self, spec, dtype, layout, device, *, full=True, seed=0):
        config, shape = spec
        sampler = make_sampler(config, dtype, device)
        variants = []
        for guided in (False, True):
            variants += [
                dict(guided=guided, draw=draw, step=i)
                for draw in DRAWS
                for i in STEP_INDICES
                if draw != "tensor" or sampler.draws_noise(i)
            ]
            variants.append(
                dict(guided=guided, draw="tensor" if sampler.draws_noise(3) else "none", step=3, threshold=True)
            )
        variants.append(dict(guided=True, step=5, cfg64=True))
        if sampler.draws_noise(STEP_INDICES[1]):  # Philox counted from a batch's first image, wrapping past 2**32
            variants += [dict(guided=guided, draw="philox2", step=STEP_INDICES[1]) for guided in (False, True)]
        if not full:  # the Triton interpreter: every kind once (the middle step)
            variants = [v for v in variants if v["step"] != STEP_INDICES[0] and v["step"] != STEP_INDICES[-1]]
        return [
            self.make_call(config, shape, dtype, device, layout=layout, seed=seed + v["step"], sampler=sampler, **v)
            for v in variants
        ]

    @staticmethod
    def native_kwargs(call: Call) -> dict:
        """The native op's arguments of a public call, in schema order (clip a float, inf for none)."""
        x_in, out, coefs, step = call.args
        kw = call.kwargs
        return dict(
            x_in=x_in,
            model_output=out,
            coefs=coefs,
            step=step,
            cfg_scale=kw["cfg_scale"],
            learned_range=kw["learned_range"],
            clip=math.inf if kw["clip"] is None else float(kw["clip"]),
            threshold=kw["threshold"],
            noise=kw["noise"],
            philox_seed=kw["philox_seed"],
            t_in=kw["t_in"],
            timesteps=kw["timesteps"],
            history=kw.get("history"),
        )

    @staticmethod
    def _state(x_in, step, t_in, history=None):
        return tuple(None if t is None else t.clone() for t in (x_in, step, t_in, history))

    def run(self, call, backend):
        """The step on clones of the state it writes; returns that state (x_in, step, t_in, history)."""
        x_in, out, coefs, step = call.args
        state = self._state(x_in, step, call.kwargs["t_in"], call.kwargs.get("history"))
        kwargs = dict(call.kwargs, t_in=state[2], history=state[3])
        assert self.fn(state[0], out, coefs, state[1], **kwargs, backend=backend) is None
        return state

    def oracle(self, call):
        from fastdiff.reference.sampler_step import sampler_loop_step as reference

        def state(convert):
            x_in, out, coefs, step = convert(call.args)
            kwargs = convert(call.kwargs)
            state = self._state(x_in, step, kwargs["t_in"], kwargs.get("history"))
            reference(state[0], out, coefs, state[1], **dict(kwargs, t_in=state[2], history=state[3]))
            return state

        return state(as_float64), state(on_cpu)

    def check(self, out, call, what=""):
        what = what or call.what
        x_in, step_in, t_start = on_cpu((call.args[0], call.args[3], call.kwargs["t_in"]))
        x, step, t_in, history = on_cpu(out)
        (x_exact, step_exact, t_exact, h_exact), (x_eager, step_eager, t_eager, h_eager) = self.oracle(call)
        assert x.shape == x_in.shape and x.dtype == x_in.dtype and out[0].device == call.args[0].device, what
        if x.numel() == 0:
            pass
        elif call.kwargs["philox_seed"] is not None and x.dtype == torch.float64:
            # The kernels draw their Philox normals in float32 with their own log/sincos: they match
            # fastdiff.reference.philox to float32 ulps, not float64 ones (sampler_step's own Philox test
            # holds it to 1e-5 too), so float64 gets that tolerance; the others' floors cover it.
            torch.testing.assert_close(x, x_exact, rtol=1e-5, atol=1e-5, msg=f"{what} x_in")
        else:
            assert_within_eager_bound(x, x_eager, x_exact, f"{what} x_in")
            if history is not None:  # the step's x0, written over the previous one
                assert_within_eager_bound(history, h_eager, h_exact, f"{what} history")
        s = int(step_in)
        assert int(step) == s + 1 and torch.equal(step, step_eager), f"{what}: step {step} after {s}"
        if t_in is not None:
            timesteps = call.kwargs["timesteps"].cpu()
            want = timesteps[s + 1] if s + 1 < len(timesteps) else t_start
            assert torch.equal(t_in, t_eager) and (t_in == want).all(), f"{what}: t_in {t_in}"

    def opcheck_grid(self, kind):
        variants = ("cfg-learned-philox", "plain-noise", "cfg-threshold", "cfg64-no-t_in")
        return [(d, v) for d in (*DTYPES, torch.float64) for v in variants] if kind == "native" else []

    def opcheck_samples(self, kind, dtype, variant, device):
        config = "ddpm-learned" if "learned" in variant else "ddim-v-eta-clip"
        call = self.make_call(
            config,
            (2, 3, 5, 4),
            dtype,
            device,
            guided="cfg" in variant,
            step=3,
            draw="philox" if "philox" in variant else "tensor" if "noise" in variant else "none",
            threshold="threshold" in variant,
            cfg64="cfg64" in variant,
        )
        args = self.native_kwargs(call)
        if "no-t_in" in variant:
            args.update(t_in=None, timesteps=None)
        return [tuple(args.values())]

    def native_args(self):
        return self.native_kwargs(self.make_call("ddim-eps", (2, 3, 5, 4), torch.float32, guided=True, step=1))

    def check_meta(self):
        """In place: nothing to return; the checks that need no data nor concrete sizes (more in the native
        bad-input table), a strided x_in among them (made on meta: moving one there would make it dense)."""
        args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in self.native_args().items()}
        assert torch.ops.fastdiff.sampler_loop_step(*args.values()) is None
        strided = torch.empty(4, 3, 5, 8, device="meta")[..., ::2]
        with pytest.raises(RuntimeError, match="sampler_loop_step: x_in must be contiguous"):
            torch.ops.fastdiff.sampler_loop_step(*dict(args, x_in=strided).values())

    @staticmethod
    def _bad(**overrides):
        call = SamplerLoopStep().make_call("ddim-eps", (2, 3, 5, 4), torch.float32, guided=True, step=1)
        names = ("x_in", "model_output", "coefs", "step")
        args = dict(zip(names, call.args, strict=True)) | call.kwargs | overrides
        return tuple(args.pop(k) for k in names), args

    @staticmethod
    def _shared(name):
        x_in = torch.randn(4, 3, 5, 4)
        return SamplerLoopStep._bad(x_in=x_in, **{name: x_in if name == "model_output" else x_in[2:]})

    @staticmethod
    def _history_shares_model_output():
        out = torch.randn(4, 3, 5, 4)
        return SamplerLoopStep._bad(model_output=out, history=out[2:])

    bad_inputs = [
        BadInput(
            "model_output-shares-x_in",
            lambda: SamplerLoopStep._shared("model_output"),
            ValueError,
            "sampler_loop_step: model_output shares memory with x_in",
        ),
        BadInput(
            "noise-shares-x_in",
            lambda: SamplerLoopStep._shared("noise"),
            ValueError,
            "sampler_loop_step: noise shares memory with x_in",
        ),
        BadInput(
            "x_in-strided",
            lambda: SamplerLoopStep._bad(x_in=torch.randn(4, 3, 5, 8)[..., ::2]),
            ValueError,
            "sampler_loop_step: x_in must be contiguous",
        ),
        BadInput(
            "x_in-odd-rows",
            lambda: SamplerLoopStep._bad(x_in=torch.randn(5, 3, 5, 4), model_output=torch.randn(5, 3, 5, 4)),
            ValueError,
            r"sampler_loop_step: with cfg_scale x_in holds x twice \(2B rows\), got 5 rows",
        ),
        BadInput(
            "cfg_scale-float",
            lambda: SamplerLoopStep._bad(cfg_scale=3.5),
            ValueError,
            "sampler_loop_step: cfg_scale must be None or a one-element float32/float64 tensor",
        ),
        BadInput(
            "step-int",
            lambda: SamplerLoopStep._bad(step=1),
            TypeError,
            "sampler_loop_step: step must be a one-element int64 tensor",
        ),
        BadInput(
            "philox_seed-int",
            lambda: SamplerLoopStep._bad(philox_seed=3),
            TypeError,
            "sampler_loop_step: philox_seed must be None or a one- or two-element int64 tensor",
        ),
        BadInput(
            "t_in-alone",
            lambda: SamplerLoopStep._bad(timesteps=None),
            ValueError,
            "sampler_loop_step: give t_in and timesteps together",
        ),
        BadInput(
            "t_in-int32",
            lambda: SamplerLoopStep._bad(t_in=torch.zeros(4, dtype=torch.int32)),
            ValueError,
            r"sampler_loop_step: t_in must be a 1-D int64 \(or float32\) tensor",
        ),
        BadInput(
            "timesteps-dtype",
            lambda: SamplerLoopStep._bad(timesteps=torch.zeros(10)),
            ValueError,
            "sampler_loop_step: t_in and timesteps must have one dtype, got torch.int64 and torch.float32",
        ),
        BadInput(
            "model_output-rows",
            lambda: SamplerLoopStep._bad(model_output=torch.randn(2, 3, 5, 4)),
            ValueError,
            "sampler_loop_step: model_output must have x_in's 4 rows",
        ),
        BadInput(
            "history-shares-x_in",
            lambda: SamplerLoopStep._shared("history"),
            ValueError,
            "sampler_loop_step: history shares memory with x_in",
        ),
        BadInput(
            "history-shares-model_output",
            lambda: SamplerLoopStep._history_shares_model_output(),
            ValueError,
            "sampler_loop_step: model_output shares memory with history",
        ),
        BadInput(
            "history-2B-rows",
            lambda: SamplerLoopStep._bad(history=torch.randn(4, 3, 5, 4)),
            ValueError,
            r"sampler_loop_step: history must be a contiguous tensor like x_in\[:B\] \(\(2, 3, 5, 4\)",
        ),
        BadInput(
            "history-strided",
            lambda: SamplerLoopStep._bad(history=torch.randn(2, 3, 5, 8)[..., ::2]),
            ValueError,
            "sampler_loop_step: history must be a contiguous tensor .* not contiguous",
        ),
        BadInput(
            "history-dtype",
            lambda: SamplerLoopStep._bad(history=torch.randn(2, 3, 5, 4, dtype=torch.float64)),
            ValueError,
            "sampler_loop_step: history must be a contiguous tensor .* torch.float64",
        ),
    ]
    native_bad_inputs = [
        _loop_bad(
            "x_in-strided",
            lambda: dict(x_in=torch.randn(4, 3, 5, 8)[..., ::2]),
            r"x_in must be contiguous \(NCHW order\)",
        ),
        _loop_bad(
            "x_in-channels_last",
            lambda: dict(x_in=torch.randn(4, 3, 5, 4).contiguous(memory_format=torch.channels_last)),
            "x_in must be contiguous",
            META,
        ),
        _loop_bad(
            "x_in-odd-rows",
            lambda: dict(x_in=torch.randn(5, 3, 5, 4), model_output=torch.randn(5, 3, 5, 4)),
            "with cfg_scale, x_in must have 2B rows .* got an odd 5",
        ),
        _loop_bad(
            "model_output-rows",
            lambda: dict(model_output=torch.randn(2, 3, 5, 4)),
            r"model_output must have x_in's 4 rows \(2B",
        ),
        _loop_bad(
            "rows-no-cfg",
            lambda: dict(cfg_scale=None, x_in=torch.randn(2, 3, 5, 4)),
            r"model_output must have x_in's 2 rows \(B: no cfg_scale",
        ),
        _loop_bad(
            "cfg_scale-int",
            lambda: dict(cfg_scale=torch.tensor([2])),
            "cfg_scale must be a one-element float32 or float64 tensor",
            META,
        ),
        _loop_bad(
            "cfg_scale-half",
            lambda: dict(cfg_scale=torch.tensor([2.0], dtype=torch.float16)),
            "cfg_scale must be a one-element float32",
            META,
        ),
        _loop_bad(
            "cfg_scale-2", lambda: dict(cfg_scale=torch.tensor([2.0, 3.0])), "cfg_scale must hold one value, got 2"
        ),
        _loop_bad("cfg_scale-nan", lambda: dict(cfg_scale=torch.tensor(math.nan)), "cfg_scale must be finite"),
        _loop_bad(
            "cfg_scale-device",
            lambda: dict(cfg_scale=torch.tensor(2.0, device="meta")),
            "cfg_scale must be on x_in's device",
        ),
        _loop_bad("t_in-no-timesteps", lambda: dict(timesteps=None), r"t_in needs timesteps", META),
        _loop_bad(
            "t_in-int32",
            lambda: dict(t_in=torch.zeros(4, dtype=torch.int32)),
            r"t_in must be a 1-D int64 \(or float32\) tensor",
            META,
        ),
        _loop_bad(
            "t_in-2d",
            lambda: dict(t_in=torch.zeros(2, 2, dtype=torch.int64)),
            r"t_in must be a 1-D int64 \(or float32\) tensor, got 2-D",
            META,
        ),
        _loop_bad(
            "timesteps-float64",
            lambda: dict(timesteps=torch.zeros(10, dtype=torch.float64)),
            r"timesteps must be a 1-D int64 \(or float32\) tensor",
            META,
        ),
        _loop_bad(
            "timesteps-float32-t_in-int64",
            lambda: dict(timesteps=torch.zeros(10)),
            "t_in and timesteps must have one dtype, got Long and Float",
            META,
        ),
        _loop_bad("step-float", lambda: dict(step=torch.tensor(1.0)), "step must be an int64 tensor", META),
        _loop_bad("step-2", lambda: dict(step=torch.tensor([1, 2])), "step must hold one index, got 2"),
        # out of range: the CPU kernel raises and changes nothing (CUDA and Triton write NaN)
        _loop_bad("step-10", lambda: dict(step=torch.tensor(10)), r"step index 10 is out of range \[0, 10\)"),
        _loop_bad("step--1", lambda: dict(step=torch.tensor(-1)), r"step index -1 is out of range \[0, 10\)"),
        _loop_bad(
            "noise-shape",
            lambda: dict(noise=torch.randn(4, 3, 5, 4)),
            r"noise must have x_in\[:B\]'s shape \[2, 3, 5, 4\]",
        ),
        _loop_bad(
            "noise-and-philox",
            lambda: dict(noise=torch.randn(2, 3, 5, 4), philox_seed=torch.tensor(1)),
            "give noise or philox_seed, not both",
            META,
        ),
        _loop_bad(
            "philox_seed-float",
            lambda: dict(philox_seed=torch.tensor(1.0)),
            "philox_seed must be an int64 tensor",
            META,
        ),
        _loop_bad(
            "learned_range", lambda: dict(learned_range=True), r"learned_range needs 2C \(6\) model_output channels"
        ),
        _loop_bad(
            "model_output-channels",
            lambda: dict(model_output=torch.randn(4, 5, 5, 4)),
            r"model_output must have C \(3\) channels",
        ),
        _loop_bad(
            "model_output-spatial",
            lambda: dict(model_output=torch.randn(4, 3, 5, 5)),
            "model_output spatial size .* must equal x_in",
        ),
        _loop_bad(
            "model_output-dtype",
            lambda: dict(model_output=torch.randn(4, 3, 5, 4, dtype=torch.float64)),
            "model_output dtype .* must equal x_in's",
            META,
        ),
        _loop_bad(
            "x_in-int",
            lambda: dict(x_in=torch.ones(4, 3, 5, 4, dtype=torch.int32)),
            "x_in dtype must be float32, float64",
            META,
        ),
        _loop_bad("x_in-1d", lambda: dict(x_in=torch.randn(6)), r"x_in must have shape \(B, C, \*spatial\)", META),
        _loop_bad("coefs", lambda: dict(coefs=torch.randn(10, 7)), r"coefs must have shape \(steps, 12\)"),
        _loop_bad("clip", lambda: dict(clip=0.0), r"clip must be > 0 \(inf for no clipping\)", META),
        _loop_bad("threshold", lambda: dict(threshold=torch.ones(3)), r"threshold must have shape \(2,\)"),
        _loop_bad("model_output-shares-x_in", _loop_shares("model_output"), "model_output shares memory with x_in"),
        _loop_bad("noise-shares-x_in", _loop_shares("noise"), "noise shares memory with x_in"),
        _loop_bad("history-shares-x_in", _loop_shares("history"), "history shares memory with x_in"),
        _loop_bad(
            "model_output-shares-history",
            lambda: (lambda out: dict(model_output=out, history=out[2:]))(torch.randn(4, 3, 5, 4)),
            "model_output shares memory with history",
        ),
        _loop_bad(
            "history-strided",
            lambda: dict(history=torch.randn(2, 3, 5, 8)[..., ::2]),
            r"history must be contiguous \(NCHW order\)",
        ),  # on meta the move would make it dense
        _loop_bad(
            "history-shape",
            lambda: dict(history=torch.randn(4, 3, 5, 4)),
            r"history must have x_in\[:B\]'s shape \[2, 3, 5, 4\]",
        ),
        _loop_bad(
            "history-dtype",
            lambda: dict(history=torch.randn(2, 3, 5, 4, dtype=torch.float64)),
            "history dtype .* must equal x_in's",
            META,
        ),
    ]


# ---- attention -------------------------------------------------------------------------------------------


class Attention(OpCase):
    """(B, H, Nq, Nk, D): cross-attention over 77 tokens at SD 1.5's head dim, one query, one key,
    primes, self-attention over 7×9 positions with an odd batch. Layouts: contiguous, (B, C, N) conv
    outputs seen as heads (stride 1 along N), (B, N, H, D) projections transposed (as CrossAttention
    makes them). The Triton interpreter runs two of the shapes through the op (its kernel's own grid,
    the other three shapes among them, is tests/triton/test_attention_kernel.py's)."""

    op = "attention"
    layouts = ("contiguous", "conv-views", "transposed")
    bad_backends = ("auto", "reference", "sdpa")
    shapes = [
        (param_id(s), s)
        for s in [(1, 2, 37, 77, 40), (2, 1, 1, 13, 64), (1, 1, 67, 1, 160), (1, 2, 131, 127, 80), (3, 2, 63, 63, 96)]
    ]
    # the grid's shapes that tests/triton/test_attention_kernel.py's kernel grid lacks or widens (an odd batch
    # at D = 96; cross-attention's two heads), through the op
    triton_shapes = [(param_id(s), s) for s in [(1, 2, 37, 77, 40), (3, 2, 63, 63, 96)]]
    float64_shapes = [("(1,2,9,11,16)", (1, 2, 9, 11, 16))]

    from fastdiff.reference.attention import attention as reference

    def make_qkv(self, shape, dtype, layout, device="cpu", g=None):
        g = g or generator()
        B, H, Nq, Nk, D = shape

        def rnd(*size):
            return randn(g, *size, dtype=dtype, device=device)

        if layout == "contiguous":
            return rnd(B, H, Nq, D), rnd(B, H, Nk, D), rnd(B, H, Nk, D)
        if layout == "conv-views":  # (B, C, N) conv outputs: stride 1 along N
            q = rnd(B, H * D, Nq).view(B, H, D, Nq).transpose(-1, -2)
            k, v = rnd(B, 2 * H * D, Nk).view(B, 2, H, D, Nk).transpose(-1, -2).unbind(1)
            return q, k, v
        q = rnd(B, Nq, H, D).transpose(1, 2)  # (B, N, H, D) projections, as CrossAttention makes them
        return q, rnd(B, Nk, H, D).transpose(1, 2), rnd(B, Nk, H, D).transpose(1, 2)

    def calls(self, spec, dtype, layout, device, *, full=True, seed=0):
        q, k, v = self.make_qkv(spec, dtype, layout, device, generator(seed))
        calls = [Call((q, k, v), {}, f"{dtype} {spec} {layout}", layout)]
        if dtype == torch.float64:
            calls.append(Call((q, k, v, 0.37), {}, f"{dtype} {spec} {layout} scale 0.37", layout))
        return calls

    def expect(self, out, call):
        q = call.args[0]
        assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, call.what
        # dense: contiguous, or heads interleaved per token as SDPA/xformers write it (a free head merge)
        assert out.is_contiguous() or out.transpose(1, 2).is_contiguous(), f"{call.what}: strides {out.stride()}"

    bad_inputs = [
        BadInput(
            "k-D",
            lambda: ((torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 5), torch.randn(1, 1, 3, 5)), {}),
            ValueError,
            r"k must have shape \(1, 1, Nk, 4\), got \(1, 1, 3, 5\)",
        ),
        BadInput(
            "v-shape",
            lambda: ((torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4)), {}),
            ValueError,
            r"v must have the shape of k \(1, 1, 3, 4\), got \(1, 1, 2, 4\)",
        ),
        BadInput(
            "dtypes",
            lambda: ((torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4).half(), torch.randn(1, 1, 3, 4)), {}),
            TypeError,
            r"q, k and v must share a dtype",
        ),
        BadInput(
            "Nk-0",
            lambda: ((torch.randn(1, 1, 2, 4), torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4)), {}),
            ValueError,
            r"Nq \(2\), Nk \(0\) and D \(4\) must be >= 1",
        ),
        BadInput(
            "scale-str",
            lambda: ((torch.randn(1, 1, 2, 4),) * 3, {"scale": "0.5"}),
            TypeError,
            r"scale must be a real number or None, got str",
        ),
        BadInput(
            "scale-nan",
            lambda: ((torch.randn(1, 1, 2, 4),) * 3, {"scale": float("nan")}),
            ValueError,
            r"scale must be finite, got nan",
        ),
    ]


# ---- conv3x3 -------------------------------------------------------------------------------------------

CONV_BAD_PATHS = ("winograd", "FUSED", "", 1, None)


class Conv3x3(OpCase):
    """(N, C_in, C_out, H, W): every size 1; primes with odd H and W (half tiles on both edges); C_in 17
    and C_out 33 leave vector tails after one full step; a map smaller than one 4x4 patch; a single
    column (W = 1); a batch of 64-channel maps large enough for several L2 blocks per thread; C_out 96
    (not a power of two) on a 5x6 map; an odd batch of 7. The cpu kernel's fused path (16 or fewer
    channels on one side): C_in 16 with C_out 33 (GEMM column blocks of two vectors, then one), 48 ->
    16 on odd sizes, 13 -> 7 (partial vectors on both sides), and 256 tiles (groups of 12 with a
    remainder). For its ``path`` argument: one input channel (K = 1 GEMMs), 16 -> 16 and 32 -> 48 (the
    static rule's fused and BLAS sides), 13 -> 7 on 5x3, and enough tiles for several fused groups and
    L2 blocks. Then 33 -> 40 on 7x10, 32 -> 32 on 6x7 and an empty batch.

    Layouts (x and the residual alike unless named): NCHW, channels_last, every other column (dense in
    neither: a copy in the kernel), (N, H, C, W) storage seen as (N, C, H, W); "mixed": x NCHW with a
    channels_last residual, "mixed-cl": x channels_last with a strided residual, both with the weight a
    transposed view and the bias every other element; "expanded": x NCHW, the residual expanded over
    the batch and the bias from one element (stride 0). Each point runs bias and residual each on and
    off, on every ``path`` (the Triton interpreter's grid, were there a kernel: path "auto" only).
    Besides the dtype's bound, an absolute sanity bound (the rounding of a few dozen products of O(1)
    values): where the backend is the eager op itself (the reference), the bound alone says little."""

    op = "conv3x3"
    native_op = "conv3x3"
    layouts = ("nchw", "channels_last", "strided", "permuted", "mixed", "mixed-cl", "expanded")
    X_LAYOUT = {"mixed": "nchw", "mixed-cl": "channels_last", "expanded": "nchw"}
    RESIDUAL_LAYOUT = {"mixed": "channels_last", "mixed-cl": "strided", "expanded": "expanded"}
    PATHS = ("auto", "fused", "blas")
    ABS_LIMIT = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-1}
    # the path argument's shapes (in the grid below too)
    PATH_SHAPES = [
        (2, 1, 8, 7, 9),
        (3, 16, 16, 16, 16),
        (2, 32, 48, 9, 11),
        (2, 13, 7, 5, 3),
        (1, 1, 1, 1, 1),
        (4, 24, 40, 17, 15),
    ]
    SHAPES = [
        (1, 1, 1, 1, 1),
        (2, 3, 5, 7, 9),
        (3, 17, 33, 8, 8),
        (2, 40, 24, 2, 3),
        (1, 64, 64, 15, 1),
        (16, 64, 64, 16, 16),
        (2, 128, 96, 5, 6),
        (7, 32, 32, 9, 11),
        (3, 16, 33, 8, 8),
        (5, 48, 16, 17, 9),
        (2, 13, 7, 9, 11),
        (4, 16, 16, 16, 16),
        # the path argument's
        (2, 1, 8, 7, 9),
        (3, 16, 16, 16, 16),
        (2, 32, 48, 9, 11),
        (2, 13, 7, 5, 3),
        (4, 24, 40, 17, 15),
        (3, 33, 40, 7, 10),
        (4, 32, 32, 6, 7),
        (0, 8, 5, 4, 4),
    ]
    shapes = [(param_id(s), s) for s in SHAPES]
    float64_shapes = [(param_id(s), s) for s in [(1, 1, 1, 1, 1), (2, 3, 5, 7, 9), (3, 17, 33, 8, 8)]]

    from fastdiff.reference import conv3x3 as reference

    def make_map(self, shape, dtype, layout, device="cpu", g=None):
        """Random values (nonzero mean) of an (N, C, H, W) ``shape`` in ``layout``."""
        g = g or generator()
        n, c, h, w = shape
        if layout == "strided":  # every other column: dense in neither layout
            t = randn(g, n, c, h, 2 * w, dtype=dtype, device=device, offset=0.5)[..., ::2]
        elif layout == "permuted":  # (N, H, C, W) storage seen as (N, C, H, W)
            t = randn(g, n, h, c, w, dtype=dtype, device=device, offset=0.5).permute(0, 2, 1, 3)
        elif layout == "expanded":  # one image's values for every image of the batch (stride 0)
            t = randn(g, 1, c, h, w, dtype=dtype, device=device, offset=0.5).expand(n, c, h, w)
        else:
            t = randn(g, n, c, h, w, dtype=dtype, device=device, offset=0.5)
            if layout == "channels_last":
                t = t.contiguous(memory_format=torch.channels_last)
        assert tuple(t.shape) == tuple(shape)
        if layout in ("strided", "permuted") and min(t.shape) > 1:
            assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
        return t

    def make(self, spec, dtype, layout="nchw", device="cpu", g=None):
        """x, weight, bias and residual of a grid point (N, C_in, C_out, H, W) in ``layout``."""
        g = g or generator()
        n, c_in, c_out, h, w = spec
        x = self.make_map((n, c_in, h, w), dtype, self.X_LAYOUT.get(layout, layout), device, g)
        # He-like scaling keeps outputs O(1) whatever C_in, so the float32 floor means the same everywhere
        scale = 1 / math.sqrt(9 * max(c_in, 1))
        weight = randn(g, c_out, c_in, 3, 3, dtype=dtype, device=device, scale=scale)
        bias = randn(g, c_out, dtype=dtype, device=device)
        if layout in ("mixed", "mixed-cl"):
            weight = weight.transpose(2, 3)  # a view
            bias = randn(g, 2 * c_out, dtype=dtype, device=device)[::2]
        elif layout == "expanded":
            bias = randn(g, 1, dtype=dtype, device=device).expand(c_out)
        residual = self.make_map((n, c_out, h, w), dtype, self.RESIDUAL_LAYOUT.get(layout, layout), device, g)
        return x, weight, bias, residual

    def calls(self, spec, dtype, layout, device, *, full=True, seed=0):
        x, weight, bias, residual = self.make(spec, dtype, layout, device, generator(seed))
        calls = []
        for b in (None, bias):
            for r in (None, residual):
                answers = {}  # the paths of one (x, weight, bias, residual) share the oracle's answer
                for path in self.PATHS if full else ("auto",):
                    call = Call(
                        (x, weight, b, r),
                        {"path": path},
                        f"{dtype} {spec} {layout} bias={b is not None} residual={r is not None} path={path}",
                        layout,
                    )
                    call.answers = answers
                    calls.append(call)
        return calls

    def run(self, call, backend):
        out = super().run(call, backend)
        call.backend = select_backend(self.op, backend, self.inputs(call))  # which one ran (expect reads it)
        return out

    def oracle(self, call):
        known = getattr(call, "answers", {})
        if not known:
            known["answer"] = type(self).reference(*as_float64(call.args)), type(self).reference(*on_cpu(call.args))
        return known["answer"]

    def expect(self, out, call):
        x, weight = call.args[:2]
        assert out.shape == (x.shape[0], weight.shape[0], *x.shape[2:]), f"{call.what}: shape {tuple(out.shape)}"
        assert out.dtype == x.dtype and out.device == x.device, call.what
        # no out= argument to poison: every element must be written (finite)
        assert torch.isfinite(out).all(), call.what
        if getattr(call, "backend", None) == "cpu":  # the kernel's documented layout, whatever x's
            assert out.is_contiguous(memory_format=torch.channels_last), f"{call.what}: strides {out.stride()}"

    def check(self, out, call, what=""):
        what = what or call.what
        self.expect(out, call)
        exact, eager = self.oracle(call)
        out = out.detach().cpu()
        if out.numel() == 0:  # an empty batch: nothing to bound
            assert out.shape == exact.shape, what
            return
        assert_within_eager_bound(out, eager, exact, what)
        if out.dtype in self.ABS_LIMIT:
            err = (out.double() - exact).abs().max().item()
            assert err <= self.ABS_LIMIT[out.dtype], f"{what}: max error {err:.3g} > {self.ABS_LIMIT[out.dtype]}"

    def opcheck_grid(self, kind):
        return [(torch.float32, layout) for layout in ("nchw", "channels_last")] if kind == "native" else []

    def opcheck_samples(self, kind, dtype, layout, device):
        x, weight, bias, residual = self.make((2, 5, 6, 7, 9), dtype, layout, device)
        paths = self.module.PATHS

        def grad(t):
            return t.detach().clone().requires_grad_()

        return [
            (x, weight, None, None),
            (x, weight, bias, None),
            (x, weight, None, residual),
            (x, weight, bias, residual),
            tuple(grad(t) for t in (x, weight, bias, residual)),
            (grad(x), weight, None, residual),
            (x, weight, bias, residual, paths["fused"]),
            (x, weight, None, residual, paths["blas"]),
            (x, grad(weight), bias, None, paths["blas"]),
        ]

    def native_args(self):
        return dict(x=self._x(), weight=self._w(), bias=None, residual=None, path=0)

    def check_meta(self):
        x = torch.empty(2, 8, 5, 7, device="meta")
        out = torch.ops.fastdiff.conv3x3(x, torch.empty(12, 8, 3, 3, device="meta"), None, None)
        assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == (2, 12, 5, 7)
        assert out.is_contiguous(memory_format=torch.channels_last)

    @staticmethod
    def _x():
        return torch.randn(2, 4, 5, 6)

    @staticmethod
    def _w():
        return torch.randn(3, 4, 3, 3)

    @staticmethod
    def _bad(*args, **kwargs):
        return (Conv3x3._x(), Conv3x3._w(), *args), kwargs

    bad_inputs = [
        BadInput(
            "x-list", lambda: (([[1.0]], Conv3x3._w()), {}), TypeError, r"conv3x3: x must be a torch\.Tensor, got list"
        ),
        BadInput(
            "weight-str",
            lambda: ((Conv3x3._x(), "w"), {}),
            TypeError,
            r"conv3x3: weight must be a torch\.Tensor, got str",
        ),
        BadInput(
            "bias-list",
            lambda: Conv3x3._bad([0.0] * 3),
            TypeError,
            r"conv3x3: bias must be a torch\.Tensor or None, got list",
        ),
        BadInput(
            "residual-float",
            lambda: Conv3x3._bad(None, 1.0),
            TypeError,
            r"conv3x3: residual must be a torch\.Tensor or None, got float",
        ),
        BadInput(
            "x-int",
            lambda: ((torch.ones(2, 4, 5, 6, dtype=torch.int64), Conv3x3._w()), {}),
            TypeError,
            r"x must be a floating tensor.*int64",
        ),
        BadInput(
            "weight-dtype",
            lambda: ((Conv3x3._x(), Conv3x3._w().double()), {}),
            TypeError,
            r"weight dtype torch\.float64 must match x's dtype torch\.float32",
        ),
        BadInput(
            "bias-dtype",
            lambda: Conv3x3._bad(torch.randn(3).half()),
            TypeError,
            r"bias dtype torch\.float16 must match x's dtype",
        ),
        BadInput(
            "residual-dtype",
            lambda: Conv3x3._bad(None, torch.randn(2, 3, 5, 6).bfloat16()),
            TypeError,
            r"residual dtype torch\.bfloat16 must match x's dtype",
        ),
        BadInput(
            "weight-device",
            lambda: ((Conv3x3._x(), Conv3x3._w().to("meta")), {}),
            ValueError,
            r"conv3x3: weight is on meta but x is on cpu",
        ),
        BadInput(
            "x-3d",
            lambda: ((torch.randn(4, 5, 6), Conv3x3._w()), {}),
            ValueError,
            r"x must have shape \(N, C_in, H, W\), got \(4, 5, 6\)",
        ),
        BadInput(
            "x-5d",
            lambda: ((torch.randn(1, 2, 4, 5, 6), Conv3x3._w()), {}),
            ValueError,
            r"x must have shape \(N, C_in, H, W\)",
        ),
        BadInput(
            "weight-5x5",
            lambda: ((Conv3x3._x(), torch.randn(3, 4, 5, 5)), {}),
            ValueError,
            r"weight must have shape \(C_out, C_in=4, 3, 3\), got \(3, 4, 5, 5\)",
        ),
        BadInput(
            "weight-C_in",
            lambda: ((Conv3x3._x(), torch.randn(3, 5, 3, 3)), {}),
            ValueError,
            r"weight must have shape \(C_out, C_in=4, 3, 3\), got \(3, 5",
        ),
        BadInput(
            "weight-3d",
            lambda: ((Conv3x3._x(), torch.randn(3, 4, 3)), {}),
            ValueError,
            r"weight must have shape \(C_out, C_in=4, 3, 3\), got \(3, 4, 3\)",
        ),
        BadInput(
            "bias-shape",
            lambda: Conv3x3._bad(torch.randn(4)),
            ValueError,
            r"bias must have shape \(C_out,\) = \(3,\), got \(4,\)",
        ),
        BadInput(
            "bias-2d",
            lambda: Conv3x3._bad(torch.randn(1, 3)),
            ValueError,
            r"bias must have shape \(C_out,\) = \(3,\), got \(1, 3\)",
        ),
        BadInput(
            "residual-channels",
            lambda: Conv3x3._bad(None, torch.randn(2, 4, 5, 6)),
            ValueError,
            r"residual must have shape \(N, C_out, H, W\) = \(2, 3, 5, 6\), got \(2, 4, 5, 6\)",
        ),
        BadInput(
            "residual-batch",
            lambda: Conv3x3._bad(None, torch.randn(1, 3, 5, 6)),
            ValueError,
            r"residual must have shape .* got \(1, 3, 5, 6\)",
        ),
        BadInput(
            "residual-3d",
            lambda: Conv3x3._bad(None, torch.randn(3, 5, 6)),
            ValueError,
            r"residual must have shape .* got \(3, 5, 6\)",
        ),
        # F.conv2d (the reference) fails on an empty map and returns (N, 0, H, W) for no input channels,
        # so the public op refuses both for every backend, naming the size; no output channels too
        BadInput("x-H0", lambda: ((torch.randn(2, 4, 0, 5), Conv3x3._w()), {}), ValueError, r"conv3x3: x .*H and W"),
        BadInput("x-W0", lambda: ((torch.randn(2, 4, 5, 0), Conv3x3._w()), {}), ValueError, r"conv3x3: x .*H and W"),
        BadInput(
            "x-C_in0",
            lambda: ((torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3)), {}),
            ValueError,
            r"conv3x3: x .*C_in",
        ),
        BadInput(
            "weight-C_out0",
            lambda: ((Conv3x3._x(), torch.randn(0, 4, 3, 3)), {}),
            ValueError,
            r"conv3x3: weight must have at least one output channel \(C_out >= 1\)",
        ),
        *(
            BadInput(
                f"path-{path!r}",
                lambda path=path: Conv3x3._bad(path=path),
                ValueError,
                r"conv3x3: path must be one of 'auto', 'fused', 'blas', got ",
            )
            for path in CONV_BAD_PATHS
        ),
    ]
    native_bad_inputs = [
        NativeBadInput(
            "x-3d",
            lambda: {"x": torch.randn(4, 5, 6)},
            r"conv3x3: x must have shape \(N, C_in, H, W\), got 3 dimension",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "x-double",
            lambda: {"x": Conv3x3._x().double(), "weight": Conv3x3._w().double()},
            r"conv3x3: x dtype must be float32, got Double",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "weight-5x5",
            lambda: {"weight": torch.randn(3, 4, 5, 5)},
            r"conv3x3: weight must have shape \(C_out, C_in, 3, 3\), got \[3, 4, 5, 5\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "weight-3d",
            lambda: {"weight": torch.randn(3, 4, 9)},
            r"conv3x3: weight must have shape \(C_out, C_in, 3, 3\), got \[3, 4, 9\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "weight-C_in",
            lambda: {"weight": torch.randn(3, 5, 3, 3)},
            r"conv3x3: weight has 5 input channels but x has 4",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "weight-half",
            lambda: {"weight": Conv3x3._w().half()},
            r"conv3x3: weight dtype must be float32, got Half",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "bias-shape",
            lambda: {"bias": torch.randn(4)},
            r"conv3x3: bias must have shape \[3\], got \[4\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "bias-double",
            lambda: {"bias": torch.randn(3).double()},
            r"conv3x3: bias dtype must be float32, got Double",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "residual-3d",
            lambda: {"residual": torch.randn(2, 3, 5)},
            r"conv3x3: residual must have shape \[2, 3, 5, 6\], got \[2, 3, 5\]",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "residual-shape",
            lambda: {"residual": torch.randn(2, 3, 6, 5)},
            r"conv3x3: residual must have shape \[2, 3, 5, 6\], got \[2, 3, 6",
            ("cpu", "meta"),
        ),
        NativeBadInput(
            "residual-device",
            lambda: {"residual": torch.empty(2, 3, 5, 6, device="meta")},
            r"conv3x3: residual is on meta but x is on cpu",
        ),
        *(
            NativeBadInput(
                f"path-{code}",
                lambda code=code: {"path": code},
                rf"conv3x3: path must be 0 \(the static rule\), 1 \(the fused path\) or 2 \(the BLAS "
                rf"path\), got {code}",
                ("cpu", "meta"),
            )
            for code in (-1, 3, 1 << 40)
        ),
    ]


CASES: list[OpCase] = [
    GroupNormAdaGN(),
    LayerNormModulate(),
    CfgCombine(),
    SamplerStep(),
    SamplerLoopStep(),
    Attention(),
    Conv3x3(),
]
BY_OP = {case.op: case for case in CASES}


def skip_unless_runs(case: OpCase, backend: str, *calls: Call) -> None:
    """Skip, quoting the declaration's reasons, where the named ``backend`` cannot run these calls."""
    reasons = case.reasons(backend, calls)
    if reasons:
        pytest.skip(f"{case.op}: {backend} cannot run this input here: {'; '.join(reasons)}")


def device_for(backend: str) -> str:
    """Where a backend's tensors live in the grid: CUDA for the GPU-only backends when there is a GPU
    (else the CPU, and the declaration's reasons skip them); the triton backend's is the triton_device
    fixture's."""
    return "cuda" if backend in ("cuda", "xformers") and torch.cuda.is_available() else "cpu"
