"""Which backend runs an op, and when one cannot, the reasons why.

Every op registers an :class:`OpSupport`: per backend, a function that returns the list of reasons
it cannot run the given inputs (an empty list means it can). Called with ``inputs=None`` it returns
the static reasons only (not compiled, no device, no kernel yet), which is what ``fastdiff info``
prints. ``backend="auto"`` tries the op's priority in order and takes the first backend with no
reasons; an explicit backend that cannot run raises :class:`BackendUnavailableError` with all of
them. ``FASTDIFF_BACKEND`` overrides the argument everywhere.

Every op has the :data:`BACKENDS` (fastdiff's own kernels and the reference). An op may declare
extra backends that only make sense for it, e.g. attention's "sdpa" (PyTorch's
scaled_dot_product_attention) and "xformers": by default auto tries them after fastdiff's own
kernels and before the reference. ``FASTDIFF_BACKEND`` naming an extra backend steers the ops that
have it and leaves the others on auto.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import _native
from ..triton import interpreter_mismatch, interpreting

__all__ = [
    "AUTO",
    "BACKENDS",
    "PRIORITY",
    "ENV_VAR",
    "DEVICES_AND_DTYPES",
    "BackendUnavailableError",
    "ExplicitOnly",
    "OpSupport",
    "register_op",
    "unregister_op",
    "registered_ops",
    "known_backends",
    "resolve_backend",
    "select_backend",
    "forget_decisions",
    "auto_runs_native_cpu",
    "call_native",
    "run_native_cpu",
    "NOT_RUN",
    "support_table",
    "native_reasons",
    "native_support",
    "part_dtype_reasons",
    "not_implemented",
    "triton_reasons",
]

AUTO = "auto"
BACKENDS = ("reference", "cpu", "cuda", "triton")
# Fastest first; the reference accepts everything, so auto always finds a backend.
PRIORITY = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "FASTDIFF_BACKEND"
AVAILABLE = "available"

# reasons(inputs) -> list of reasons the backend cannot run them; inputs=None: static reasons only.
ReasonsFn = Callable[[Mapping[str, torch.Tensor] | None], list[str]]
# cache_key(inputs) -> what the reasons look at beyond devices and dtypes (see OpSupport.cache_key).
CacheKeyFn = Callable[[Mapping[str, torch.Tensor]], tuple]


def _nothing_beyond_devices_and_dtypes(inputs: Mapping[str, torch.Tensor]) -> tuple:
    return ()


# The cache_key of an op whose reasons look only at the inputs' devices and dtypes.
DEVICES_AND_DTYPES: CacheKeyFn = _nothing_beyond_devices_and_dtypes


class ExplicitOnly(str):
    """A reason that keeps auto away from a backend which still runs the input when asked by name.

    Triton's CPU interpreter is the example: correct, and the way to test GPU code without a GPU,
    but far too slow to be anyone's automatic choice. Auto skips the backend with this reason; an
    explicit ``backend=`` (or FASTDIFF_BACKEND) runs it.
    """


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the inputs; ``reasons`` lists why."""

    def __init__(self, message: str, reasons: Sequence[str]) -> None:
        super().__init__(message)
        self.reasons = list(reasons)


@dataclass(frozen=True)
class OpSupport:
    """What each backend can run for one op.

    ``reasons`` has an entry for every one of :data:`BACKENDS` and for each extra backend of this
    op. ``priority`` is auto's order; empty means :data:`PRIORITY` with the extra backends (in
    ``reasons``' order) inserted just before the reference.
    """

    op: str
    reasons: Mapping[str, ReasonsFn]
    priority: tuple[str, ...] = ()
    # Given, a successful decision is remembered per input signature (each input's device and dtype,
    # which inputs are given, and the global state select_backend keys on: FASTDIFF_BACKEND,
    # TRITON_INTERPRET, the loaded fastdiff._C) plus ``cache_key(inputs)``, which must hold whatever
    # else the reasons functions look at (a size limit, grad mode, say): :data:`DEVICES_AND_DTYPES`
    # when nothing else. This takes dispatch off the hot path of modules called at every step.
    # None: decided afresh on every call.
    cache_key: CacheKeyFn | None = None

    def __post_init__(self) -> None:
        missing = [b for b in BACKENDS if b not in self.reasons]
        if missing:
            raise ValueError(f"OpSupport({self.op!r}): no reasons function for backends {missing}")
        extras = tuple(b for b in self.reasons if b not in BACKENDS)
        for name in extras:
            if not isinstance(name, str) or not name.isidentifier() or name == AUTO:
                raise ValueError(f"OpSupport({self.op!r}): backend names must be identifiers other than "
                                 f"{AUTO!r}, got {name!r}")
        priority = tuple(self.priority) or (*PRIORITY[:-1], *extras, PRIORITY[-1])
        if sorted(priority) != sorted(self.reasons):
            raise ValueError(
                f"OpSupport({self.op!r}): priority {priority} must order exactly the backends {tuple(self.reasons)}"
            )
        object.__setattr__(self, "priority", priority)

    @property
    def backends(self) -> tuple[str, ...]:
        """This op's backend names, in auto's order."""
        return self.priority

    def why_not(self, backend: str, inputs: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        return list(self.reasons[backend](inputs))


_REGISTRY: dict[str, OpSupport] = {}
# resolve_backend's (every name, names this op accepts) per op (None: any op), until an op registers.
_ACCEPTED: dict[str | None, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def register_op(support: OpSupport) -> OpSupport:
    """Add (or replace, on module reload) an op's support declaration."""
    _REGISTRY[support.op] = support
    _ACCEPTED.clear()
    forget_decisions()
    return support


def unregister_op(op: str) -> None:
    """Remove an op's support declaration (a throwaway op of a test or an experiment); unknown names
    are ignored."""
    _REGISTRY.pop(op, None)
    _ACCEPTED.clear()
    forget_decisions()


def registered_ops() -> dict[str, OpSupport]:
    """Every op's support declaration, after importing fastdiff.ops so all ops have registered."""
    importlib.import_module("fastdiff.ops")
    return dict(_REGISTRY)


def known_backends() -> tuple[str, ...]:
    """Every backend name some registered op has: :data:`BACKENDS`, then the ops' extra backends.
    Reads the registry as it is (no import), so torch.compile traces through it."""
    names = list(BACKENDS)
    for support in _REGISTRY.values():
        names += [b for b in support.backends if b not in names]
    return tuple(names)


def resolve_backend(backend: str, op: str | None = None) -> str:
    """The backend name to use: ``FASTDIFF_BACKEND`` if set, else ``backend``; validated.

    With ``op``, ``backend`` must be "auto" or one of that op's backends; an override naming a
    backend this op lacks (FASTDIFF_BACKEND=sdpa for cfg_combine) resolves to "auto". Without
    ``op``, any name some op has is accepted.
    """
    names = _ACCEPTED.get(op)
    if names is None:
        everywhere = (AUTO, *known_backends())
        if op is not None:
            accepted = (AUTO, *BACKENDS, *(b for b in _REGISTRY[op].backends if b not in BACKENDS))
        else:
            accepted = everywhere
        names = (everywhere, accepted)
        if not torch.compiler.is_compiling():  # a traced call only reads
            _ACCEPTED[op] = names
    everywhere, accepted = names
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        name = override.lower()
        if name not in everywhere:
            raise ValueError(f"{ENV_VAR} must be one of {everywhere}, got {override!r}")
        return name if name in accepted else AUTO
    if not isinstance(backend, str) or backend not in accepted:
        where = f"{op}: " if op is not None else ""
        raise ValueError(f"{where}backend must be one of {accepted}, got {backend!r}")
    return backend


_DECISIONS: dict[tuple, str] = {}
_DECISIONS_MAX = 4096


def _decision_key(support: OpSupport, backend: str, inputs: Mapping[str, torch.Tensor]) -> tuple:
    signature = tuple((name, t.device, t.dtype) for name, t in inputs.items())
    return (support.op, backend, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"), _native.generation,
            signature, support.cache_key(inputs))


def select_backend(op: str, backend: str, inputs: Mapping[str, torch.Tensor]) -> str:
    """The backend that will run ``op`` on ``inputs``: resolved, then checked.

    ``inputs`` maps argument names to the tensors the backends must accept (names appear in the
    reasons). With "auto", the first backend of the op's priority with no reasons wins; an explicit
    backend with reasons raises :class:`BackendUnavailableError` listing all of them. For an op
    with a ``cache_key`` a successful decision is remembered per input signature (see OpSupport).
    """
    support = _REGISTRY[op]
    if support.cache_key is None or torch.compiler.is_compiling():  # traced once; no need to remember
        return _select(support, backend, inputs)
    key = _decision_key(support, backend, inputs)
    chosen = _DECISIONS.get(key)
    if chosen is None:
        chosen = _select(support, backend, inputs)
        if len(_DECISIONS) >= _DECISIONS_MAX:
            _DECISIONS.clear()
        _DECISIONS[key] = chosen
    return chosen


def forget_decisions() -> None:
    """Drop every remembered dispatch decision (after changing what a reasons function sees)."""
    _DECISIONS.clear()
    _NATIVE_CPU_AUTO.clear()


_NATIVE_CPU_AUTO: dict[str, tuple[int, bool]] = {}


def auto_runs_native_cpu(op: str) -> bool:
    """Whether ``backend="auto"`` sends ``op``'s float32 CPU inputs to its native cpu kernel whatever
    else they are: fastdiff._C has the op and FASTDIFF_BACKEND is unset. For an op whose cpu reasons
    look at nothing but devices and dtypes (and whose GPU backends refuse CPU tensors, as auto's
    priority has them first), this is auto's decision, so the op can call its kernel straight away
    on that path (the per-call dispatch costs more than a small kernel). Remembered per load of _C."""
    if os.environ.get(ENV_VAR):
        return False
    known = _NATIVE_CPU_AUTO.get(op)
    if known is None or known[0] != _native.generation:
        known = (_native.generation, not native_reasons(op, "cpu", (torch.float32,), None))
        _NATIVE_CPU_AUTO[op] = known
    return known[1]


# Excludes the autograd dispatch keys for a block, as inference mode does, without making inference
# tensors (torch's own redispatch from a Python autograd kernel uses it).
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def call_native(overload: Any, *args: Any) -> Any:
    """``overload(*args)`` for a native op whose autograd formula is registered from Python. With
    grad mode off, the call skips that Python autograd kernel (about 8 us per call, which would only
    pass the call on): the result is the same tensor without a graph, as under ``torch.no_grad()``."""
    if torch.is_grad_enabled() or _BELOW_AUTOGRAD is None:
        return overload(*args)
    with _BELOW_AUTOGRAD():
        return overload(*args)


def needs_grad(inputs: Mapping[str, torch.Tensor]) -> bool:
    """Whether a call on ``inputs`` must record a graph: grad mode is on and some input requires
    grad. Forward-only kernels refuse such inputs (their output's backward would be wrong)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs.values())


NOT_RUN = object()  # what run_native_cpu returns when the caller must take its checked path


def run_native_cpu(op: str, *args: Any) -> Any:
    """An op's float32 CPU fast path under ``backend="auto"``: ``torch.ops.fastdiff.<op>(*args)``
    through :func:`call_native` when
    every tensor among ``args`` is a float32 CPU tensor, :func:`auto_runs_native_cpu` holds (so the
    native kernel is auto's decision) and no torch.compile trace is running (Dynamo sees the full
    dispatch); else, or when the kernel's own checks reject the arguments, :data:`NOT_RUN`, and the
    caller runs its checked path (which raises the Python error). Written as a plain loop: it runs
    before every small kernel, where each microsecond shows."""
    if torch.compiler.is_compiling():
        return NOT_RUN
    for a in args:
        if isinstance(a, torch.Tensor) and not (a.dtype is torch.float32 and a.is_cpu):
            return NOT_RUN
    if not auto_runs_native_cpu(op):
        return NOT_RUN
    try:  # the op exists: auto_runs_native_cpu found it in the loaded _C
        return call_native(getattr(torch.ops.fastdiff, op).default, *args)
    except (RuntimeError, TypeError, ValueError):
        return NOT_RUN


def _select(support: OpSupport, backend: str, inputs: Mapping[str, torch.Tensor]) -> str:
    op = support.op
    name = resolve_backend(backend, op)
    if name == AUTO:
        refusals: list[str] = []
        for candidate in support.priority:
            reasons = support.why_not(candidate, inputs)
            if not reasons:
                return candidate
            refusals.append(f"{candidate}: {'; '.join(reasons)}")
        raise BackendUnavailableError(f"{op}: no backend can run these inputs ({' | '.join(refusals)})", refusals)
    reasons = [r for r in support.why_not(name, inputs) if not isinstance(r, ExplicitOnly)]
    if reasons:
        source = f"{ENV_VAR}={name}" if os.environ.get(ENV_VAR, "").strip() else f"backend={name!r}"
        raise BackendUnavailableError(
            f"{op}: {source} cannot run these inputs: " + "; ".join(reasons) + " (backend='auto' picks one that can)",
            reasons,
        )
    return name


def support_table() -> dict[str, dict[str, str | list[str]]]:
    """op -> backend (in auto's order) -> "available", or the static reasons it is not (no inputs)."""
    table: dict[str, dict[str, str | list[str]]] = {}
    for op, support in sorted(registered_ops().items()):
        table[op] = {}
        for backend in support.priority:
            reasons = support.why_not(backend, None)
            table[op][backend] = reasons if reasons else AVAILABLE
    return table


# ---- reasons shared by the ops -------------------------------------------------------------------


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _compiled_for(capability: tuple[int, int], archs: Sequence[str]) -> bool:
    """Whether a GPU of this compute capability can run code compiled for ``archs``.

    A cubin for sm_XY runs on sm_XZ with Z >= Y (same major); "+PTX" is JIT-compiled for any newer
    GPU; arch-specific targets ("9.0a") run only on exactly that capability.
    """
    for arch in archs:
        core = arch.removesuffix("+PTX")
        try:
            built = tuple(int(p) for p in core.rstrip("af").split("."))
        except ValueError:
            continue
        if core.endswith("a"):
            if built == capability:
                return True
        elif (built[0] == capability[0] and built <= capability) or (arch.endswith("+PTX") and built <= capability):
            return True
    return False


def native_reasons(
    op: str, device_type: str, dtypes: Sequence[torch.dtype], inputs: Mapping[str, torch.Tensor] | None
) -> list[str]:
    """Why the native (fastdiff._C) kernel of ``op`` for ``device_type`` ("cpu"/"cuda") cannot run."""
    status = _native.status()
    if not status["built"]:
        return [f"fastdiff._C not built ({status['reason']})"]
    reasons: list[str] = []
    if not hasattr(torch.ops.fastdiff, op):
        reasons.append(f"fastdiff._C has no {op} kernel (built from older sources; rebuild it)")
    if device_type == "cuda":
        if not status["cuda_compiled"]:
            why = status["cuda_skipped_reason"] or "not in this build"
            reasons.append(f"CUDA not compiled into fastdiff._C ({why})")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    if inputs is None:
        return reasons
    for arg, tensor in inputs.items():
        if tensor.device.type != device_type:
            where = "CPU" if device_type == "cpu" else "CUDA"
            reasons.append(f"{arg} is on {tensor.device}, {device_type} backend needs {where} tensors")
        if tensor.dtype not in dtypes:
            reasons.append(f"{arg} dtype {tensor.dtype} not supported (supported: {_dtype_names(dtypes)})")
        if device_type == "cuda" and tensor.is_cuda and status["cuda_compiled"]:
            capability = torch.cuda.get_device_capability(tensor.device)
            if not _compiled_for(capability, status["cuda_archs"]):
                reasons.append(
                    f"{arg} is on a GPU of compute capability {capability[0]}.{capability[1]}, but fastdiff._C "
                    f"was compiled for {status['cuda_archs']} (set TORCH_CUDA_ARCH_LIST and rebuild)"
                )
    return reasons


def part_dtype_reasons(inputs: Mapping[str, torch.Tensor], parts: Sequence[str]) -> list[str]:
    """The rule for the optional parts of the norm ops (weight, bias, scale, ...): each given part
    is in x's dtype or float32."""
    x = inputs["x"]
    return [
        f"{name} dtype {inputs[name].dtype} must be x's dtype ({x.dtype}) or float32"
        for name in parts
        if name in inputs and inputs[name].dtype not in (x.dtype, torch.float32)
    ]


def native_support(op: str, device_type: str, dtypes: Sequence[torch.dtype], parts: Sequence[str] = ()) -> ReasonsFn:
    """The reasons function of an op's native (fastdiff._C) backend on ``device_type``. With
    ``parts`` (the names of optional inputs beside ``x``): the parts share x's device (validated
    before dispatch), so only x goes through the device/dtype checks, and the parts follow
    :func:`part_dtype_reasons`."""

    def reasons(inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
        if inputs is None or not parts:
            return native_reasons(op, device_type, dtypes, inputs)
        return native_reasons(op, device_type, dtypes, {"x": inputs["x"]}) + part_dtype_reasons(inputs, parts)

    return reasons


_triton_found: list[str] = []


def triton_reasons(
    inputs: Mapping[str, torch.Tensor] | None, dtypes: Sequence[torch.dtype], dtype_checked: Sequence[str] | None = None
) -> list[str]:
    """The reasons every Triton backend shares: Triton missing, TRITON_INTERPRET flipped after the
    import, no GPU, and per input its device and (for the names in ``dtype_checked``, default all)
    its dtype against ``dtypes``. CPU tensors run in Triton's interpreter under TRITON_INTERPRET=1,
    only when asked for by name: auto never picks the interpreter (an :class:`ExplicitOnly`
    reason, last), it is a test tool. Never imports Triton."""
    if not _triton_found:  # find_spec costs ~0.2 ms; auto asks on every call
        _triton_found.append("" if importlib.util.find_spec("triton") is not None else "triton is not installed")
    reasons = [r for r in _triton_found if r]
    interpreted = interpreting()
    if interpreted and (why := interpreter_mismatch()) is not None:
        reasons.append(why)
    if inputs is None:
        if not interpreted and not torch.cuda.is_available():
            reasons.append("no CUDA device (torch.cuda.is_available() is False; TRITON_INTERPRET=1 runs the "
                           "kernel in Triton's CPU interpreter)")
        return reasons
    on_cpu = []
    for name, t in inputs.items():
        if t.device.type == "cpu" and interpreted:
            on_cpu.append(name)
        elif t.device.type != "cuda":
            reasons.append(f"{name} is on {t.device}, the triton backend needs CUDA tensors (or CPU tensors "
                           "under TRITON_INTERPRET=1)")
        if (dtype_checked is None or name in dtype_checked) and t.dtype not in dtypes:
            reasons.append(f"{name} dtype {t.dtype} not supported (supported: {_dtype_names(dtypes)})")
    if on_cpu:
        reasons.append(ExplicitOnly(f"{', '.join(on_cpu)} on the CPU run in Triton's interpreter "
                                    "(TRITON_INTERPRET=1): only with backend='triton', never picked by auto"))
    return reasons


def not_implemented(backend: str, op: str) -> ReasonsFn:
    """Reasons function of a backend that has no kernel for ``op`` yet."""

    found: list[str] = []

    def reasons(inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
        # Computed once: auto-dispatch asks on every call, and find_spec costs ~0.2 ms.
        if not found:
            found.append(f"not implemented for this op yet (no {backend} kernel for {op})")
            if backend == "triton" and importlib.util.find_spec("triton") is None:
                found.append("triton is not installed")
        return list(found)

    return reasons


def always_available(inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    """The reference backend: plain PyTorch runs every input the op's validation accepts."""
    return []
