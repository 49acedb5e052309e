"""Each op's declaration: its backends, what each can run, and which one runs a call.

An op declares itself once, in its own module (``fastdiff/ops/<op>.py``), as an :class:`OpSupport`
holding a :class:`Kernel` per backend: the callable that runs it and what it accepts (devices,
dtypes, the dtype rule of optional parts, limits beyond those, whether it records a graph, a module
it needs). Everything else is derived from that declaration: the reasons a backend refuses an input
(the errors of an explicit ``backend=``, ``fastdiff info``'s table, the tests' skip messages), the
Triton modules' own argument checks (they read the limits from the declaration), and the choice.
``backend="auto"`` takes the first backend of the op's priority with no reasons; an explicit backend
that cannot run raises :class:`BackendUnavailableError` with all of them. ``FASTDIFF_BACKEND``
overrides the argument everywhere.

Calling the declaration (``SUPPORT(backend, *args)``, what each public op does) resolves the backend
once per call signature (each tensor's device and dtype, whether it is given, and whatever the
declared limits and grad rules read) and keeps the resolved :class:`Binding`; ``SUPPORT.bind(backend,
*args)`` returns that binding for a caller whose inputs keep their signature (the sampling loop's
buffers), which then runs the kernel with no dispatch at all.

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
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _native
from ..triton import interpreter_mismatch, interpreting

__all__ = [
    "AUTO",
    "BACKENDS",
    "PRIORITY",
    "ENV_VAR",
    "BackendUnavailableError",
    "Binding",
    "ExplicitOnly",
    "Kernel",
    "Limit",
    "OpSupport",
    "register_op",
    "unregister_op",
    "registered_ops",
    "known_backends",
    "resolve_backend",
    "select_backend",
    "forget_decisions",
    "support_table",
    "native_reasons",
    "part_dtype_reasons",
    "triton_reasons",
    "torch_op",
]

AUTO = "auto"
BACKENDS = ("reference", "cpu", "cuda", "triton")
# Fastest first; the reference accepts everything, so auto always finds a backend.
PRIORITY = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "FASTDIFF_BACKEND"
AVAILABLE = "available"

# reasons(inputs) -> list of reasons the backend cannot run them; inputs=None: static reasons only.
ReasonsFn = Callable[[Mapping[str, torch.Tensor] | None], list[str]]


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
class Limit:
    """A rule beyond devices and dtypes that a backend's inputs must meet.

    ``rule`` says it in words (``fastdiff info``, the docs); ``broken(inputs)`` returns the reason
    these inputs break it, or None. Its result is part of a call's signature, so it must read only
    the inputs (shapes, strides), and it runs on every call: keep it to a few comparisons.
    """

    rule: str
    broken: Callable[[Mapping[str, torch.Tensor]], str | None]


# What a Kernel's ``kind`` may be: the plain-PyTorch reference, a fastdiff._C op (the backend name
# "cpu"/"cuda" is its device), a Triton kernel, a library's function (sdpa, xformers), or none yet.
KINDS = ("reference", "native", "triton", "library", "missing")


@dataclass(frozen=True)
class Kernel:
    """One backend of one op: what runs it and what it accepts.

    ``run`` takes the op's kernel arguments (see :class:`OpSupport`) and returns its result.
    ``dtypes``: the dtypes it runs (empty: every dtype the op's validation accepts). ``checked``: the
    inputs whose device and dtype it checks (None: all). ``parts``: inputs that may be in x's dtype or
    float32. ``limits``: further rules. ``grad``: whether its output records a graph (False: it is
    forward-only and refuses inputs that need one; auto then takes a backend that records).
    ``devices``: for a library kernel, the device types it runs. ``requires``: a module a library
    kernel needs, and ``install`` how to get it. ``native_op``: the fastdiff._C op (default the op's
    name). ``checks_args``: the kernel checks the op's arguments itself with the same rules as the
    op's validation, so a resolved call skips the Python checks (they run only to word an error).
    ``layouts``: what it reads in place, in words.
    """

    kind: str
    run: Callable[..., Any] | None = None
    dtypes: tuple[torch.dtype, ...] = ()
    checked: tuple[str, ...] | None = None
    parts: tuple[str, ...] = ()
    limits: tuple[Limit, ...] = ()
    grad: bool = True
    devices: tuple[str, ...] = ()
    requires: str = ""
    install: str = ""
    native_op: str = ""
    checks_args: bool = False
    layouts: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Kernel: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.run is None) != (self.kind == "missing"):
            raise ValueError(f"Kernel({self.kind!r}): a run function is required, except for kind 'missing'")

    def broken_limits(self, inputs: Mapping[str, torch.Tensor]) -> list[str]:
        """The reasons these inputs break this kernel's limits (what its launcher refuses)."""
        return _limit_reasons(self, inputs)

    def describe(self) -> dict[str, Any]:
        """What it accepts, in words: for ``fastdiff info --json`` and the docs."""
        return {
            "kind": self.kind,
            "dtypes": [_dtype_names((d,)) for d in self.dtypes] or "any the op accepts",
            "parts": list(self.parts),
            "limits": [limit.rule for limit in self.limits],
            "grad": self.grad,
            **({"devices": list(self.devices)} if self.devices else {}),
            **({"layouts": self.layouts} if self.layouts else {}),
        }


def _kernel_reasons(op: str, backend: str, kernel: Kernel, inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    """Why ``kernel`` (``op``'s ``backend``) cannot run ``inputs`` (None: the static reasons only)."""
    reasons = _base_reasons(op, backend, kernel, inputs)
    if inputs is not None:
        reasons += _limit_reasons(kernel, inputs)
    return reasons


def _base_reasons(op: str, backend: str, kernel: Kernel, inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    """The reasons that read the inputs' devices, dtypes and grad only (not the limits)."""
    if kernel.kind == "reference":
        return []
    if kernel.kind == "missing":
        return _missing_reasons(op, backend)
    checked = (
        inputs if inputs is None or kernel.checked is None else {k: t for k, t in inputs.items() if k in kernel.checked}
    )
    if kernel.kind == "native":
        reasons = native_reasons(kernel.native_op or op, backend, kernel.dtypes, checked)
    elif kernel.kind == "triton":
        reasons = triton_reasons(checked, kernel.dtypes)
    else:
        reasons = _library_reasons(backend, kernel, checked)
    if inputs is None:
        return reasons
    if kernel.parts:
        reasons += part_dtype_reasons(inputs, kernel.parts)
    if not kernel.grad and needs_grad(inputs):
        names = ", ".join(name for name, t in inputs.items() if t.requires_grad)
        reasons.append(f"inputs require grad ({names}): the {backend} kernel is forward-only (no backward)")
    return reasons


def _limit_reasons(kernel: Kernel, inputs: Mapping[str, torch.Tensor]) -> list[str]:
    return [why for limit in kernel.limits if (why := limit.broken(inputs)) is not None]


_found: dict[str, bool] = {}


def _importable(module: str) -> bool:
    if module not in _found:  # find_spec costs ~0.2 ms; asked on every miss
        _found[module] = importlib.util.find_spec(module) is not None
    return _found[module]


def _library_reasons(backend: str, kernel: Kernel, inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    reasons = []
    if kernel.requires and not _importable(kernel.requires):
        reasons.append(f"{kernel.requires} is not installed ({kernel.install or 'pip install ' + kernel.requires})")
    if inputs is None:
        if kernel.devices == ("cuda",) and not torch.cuda.is_available():
            reasons.append("no CUDA device (torch.cuda.is_available() is False)")
        return reasons
    for name, t in inputs.items():
        if kernel.devices and t.device.type not in kernel.devices:
            reasons.append(
                f"{name} is on {t.device}, the {backend} backend needs {_device_names(kernel.devices)} tensors"
            )
        if kernel.dtypes and t.dtype not in kernel.dtypes:
            reasons.append(f"{name} dtype {t.dtype} not supported (supported: {_dtype_names(kernel.dtypes)})")
    return reasons


def _device_names(devices: Sequence[str]) -> str:
    return " or ".join("CUDA" if d == "cuda" else d.upper() for d in devices)


def _missing_reasons(op: str, backend: str) -> list[str]:
    reasons = [f"not implemented for this op yet (no {backend} kernel for {op})"]
    if backend == "triton" and not _importable("triton"):
        reasons.append("triton is not installed")
    return reasons


class Binding:
    """A resolved call of one op: the backend chosen for one call signature and its kernel.

    Calling it runs the kernel on the op's public arguments (as the op's function takes them,
    positionally, ``backend`` left out): converted to the kernel's arguments, after the op's Python
    checks unless the kernel checks the arguments itself (then the Python checks run only when the
    kernel raises, to word the error). It neither re-resolves nor re-checks the signature: keep it
    for inputs whose devices, dtypes, given parts and limits stay those it was bound with.
    """

    __slots__ = ("op", "backend", "kernel", "_run", "_prepare", "_validate")

    def __init__(self, support: OpSupport, backend: str) -> None:
        self.op = support.op
        self.backend = backend
        self.kernel = support.kernels[backend]
        self._run = getattr(self.kernel, "run", None)  # a reasons function (a test's op) runs nothing
        self._prepare = support.prepare
        self._validate = support.validate

    def __call__(self, *args: Any) -> Any:
        if self._run is None:
            raise TypeError(f"{self.op}: its {self.backend} backend is declared by a reasons function only")
        if not self.kernel.checks_args:
            return self._run(*self._prepare(*args, self.backend))
        try:
            return self._run(*self._prepare(*args, self.backend, checked=False))
        except (RuntimeError, TypeError, ValueError):
            self._validate(*args)  # raises the op's own error where its rules are broken
            raise

    def __repr__(self) -> str:
        return f"Binding({self.op!r}, backend={self.backend!r})"


def torch_op(name: str) -> Callable[..., Any]:
    """A Kernel's run function that calls ``torch.ops.fastdiff.<name>`` with the kernel arguments
    (looked up per call: a native op exists only once fastdiff._C has loaded)."""

    def run(*args: Any) -> Any:
        return getattr(torch.ops.fastdiff, name)(*args)

    run.__name__ = run.__qualname__ = f"torch.ops.fastdiff.{name}"
    return run


def _no_prepare(*args: Any, **kwargs: Any) -> tuple:
    raise TypeError("this op declares no prepare function: it cannot be called through its declaration")


@dataclass(frozen=True, eq=False)
class OpSupport:
    """One op's declaration: per backend a :class:`Kernel` (or, for a throwaway test op, a plain
    reasons function), auto's ``priority``, and how a call is checked and converted.

    ``priority`` empty means :data:`PRIORITY` with the extra backends (in ``kernels``' order)
    inserted just before the reference. ``inputs(*args)`` names the tensors among the op's public
    arguments (the ones the kernels' rules read; the op's validation must put them all on the first
    one's device, which the call signature keys on); ``validate(*args)`` raises the op's clear error
    for bad arguments; ``prepare(*args, backend, checked=True)`` returns the kernel arguments of
    ``backend`` (validating first when ``checked``; unchecked, it must still refuse what it cannot
    convert faithfully, by validating).
    """

    op: str
    kernels: Mapping[str, Kernel | ReasonsFn]
    priority: tuple[str, ...] = ()
    inputs: Callable[..., dict[str, torch.Tensor]] | None = None
    validate: Callable[..., None] = field(default=lambda *args: None)
    prepare: Callable[..., tuple] = field(default=_no_prepare)
    _bindings: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        missing = [b for b in BACKENDS if b not in self.kernels]
        if missing:
            raise ValueError(f"OpSupport({self.op!r}): no kernel for backends {missing}")
        extras = tuple(b for b in self.kernels if b not in BACKENDS)
        for name in extras:
            if not isinstance(name, str) or not name.isidentifier() or name == AUTO:
                raise ValueError(
                    f"OpSupport({self.op!r}): backend names must be identifiers other than {AUTO!r}, got {name!r}"
                )
        priority = tuple(self.priority) or (*PRIORITY[:-1], *extras, PRIORITY[-1])
        if sorted(priority) != sorted(self.kernels):
            raise ValueError(
                f"OpSupport({self.op!r}): priority {priority} must order exactly the backends {tuple(self.kernels)}"
            )
        object.__setattr__(self, "priority", priority)
        declared = [k for k in self.kernels.values() if isinstance(k, Kernel)]
        # A call's signature holds what the rules read: only a fully declared op has one.
        object.__setattr__(
            self,
            "_limits",
            tuple(lim for k in declared for lim in k.limits) if len(declared) == len(self.kernels) else None,
        )
        object.__setattr__(self, "_grad_matters", any(not k.grad for k in declared))

    @property
    def backends(self) -> tuple[str, ...]:
        """This op's backend names, in auto's order."""
        return self.priority

    def why_not(self, backend: str, inputs: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Why ``backend`` cannot run ``inputs`` (a name -> tensor mapping; None: the static reasons)."""
        kernel = self.kernels[backend]
        if isinstance(kernel, Kernel):
            return _kernel_reasons(self.op, backend, kernel, inputs)
        return list(kernel(inputs))

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per backend, what it accepts (declared kernels only)."""
        return {b: self.kernels[b].describe() for b in self.priority if isinstance(self.kernels[b], Kernel)}

    def signature(self, backend: str, inputs: Mapping[str, torch.Tensor]) -> tuple | None:
        """What the choice for these inputs depends on, the limits aside (see :meth:`binding`); None
        when the op cannot say (a throwaway op's reasons functions): then it is decided every call."""
        if self._limits is None:  # type: ignore[attr-defined]
            return None
        # TRITON_INTERPRET and the limits: see binding().
        # One device: every op's validation puts all its tensors on the first one's device.
        key = (
            backend if isinstance(backend, str) else None,
            os.environ.get(ENV_VAR),
            _native.generation,
            next(iter(inputs.values())).device,
            tuple(inputs),
            *[t.dtype for t in inputs.values()],
        )
        if self._grad_matters:  # type: ignore[attr-defined]
            key += (needs_grad(inputs),)
        return key

    def _limit_flags(self, inputs: Mapping[str, torch.Tensor]) -> tuple:
        """The rest of a signature, read only where it took part: TRITON_INTERPRET and the limits."""
        return (os.environ.get("TRITON_INTERPRET"), *[limit.broken(inputs) is None for limit in self._limits])  # type: ignore[attr-defined]

    def _lookup(self, key: tuple, inputs: Mapping[str, torch.Tensor]) -> Binding | None:
        found = self._bindings.get(key)
        if type(found) is dict:  # the limits took part in this choice: one binding per outcome
            found = found.get(self._limit_flags(inputs))
        return found

    def binding(self, backend: str, inputs: Mapping[str, torch.Tensor]) -> Binding:
        """The resolved binding for inputs of this signature, remembered per signature.

        The limits and TRITON_INTERPRET are read only where they took part in the choice: a backend
        before the chosen one (or the chosen one) that has limits or is a Triton kernel passed every
        other rule (or only kept auto away, see ExplicitOnly). Elsewhere (CPU tensors without the
        interpreter, where the Triton kernels never run) a call's signature is devices and dtypes.
        """
        key = None if torch.compiler.is_compiling() else self.signature(backend, inputs)
        found = self._lookup(key, inputs) if key is not None else None
        if found is not None:
            return found
        found = Binding(self, _select(self, backend, inputs))
        if key is None:
            return found
        if len(self._bindings) >= _BINDINGS_MAX:
            self._bindings.clear()
        if self._limits_took_part(backend, found.backend, inputs):
            per_outcome = self._bindings.get(key)
            if type(per_outcome) is not dict:
                per_outcome = self._bindings[key] = {}
            per_outcome[self._limit_flags(inputs)] = found
        else:
            self._bindings[key] = found
        return found

    def _limits_took_part(self, backend: str, chosen: str, inputs: Mapping[str, torch.Tensor]) -> bool:
        considered = (
            self.priority[: self.priority.index(chosen) + 1] if resolve_backend(backend, self.op) == AUTO else (chosen,)
        )
        for name in considered:
            kernel = self.kernels[name]
            if (kernel.limits or kernel.kind == "triton") and all(
                isinstance(r, ExplicitOnly) for r in _base_reasons(self.op, name, kernel, inputs)
            ):
                return True
        return False

    def __call__(self, backend: str, *args: Any) -> Any:
        """Run the op on its public arguments (what the op's function does)."""
        if self.inputs is None:
            raise TypeError(f"{self.op}: its declaration names no inputs, so it cannot be called through it")
        if torch.compiler.is_compiling():  # traced once: decided in the trace, nothing remembered
            self.validate(*args)
            name = _select(self, backend, self.inputs(*args))
            return self.kernels[name].run(*self.prepare(*args, name))
        try:  # the signature and the limits read shapes: a malformed input fails in them too
            inputs = self.inputs(*args)
            key = self.signature(backend, inputs)
            binding = self._lookup(key, inputs) if key is not None else None
        except (AttributeError, IndexError, TypeError, ValueError):
            self.validate(*args)  # a malformed argument: the op's own error
            raise
        if binding is None:
            self.validate(*args)  # before the choice: an explicit backend's refusal follows bad input's error
            binding = self.binding(backend, inputs)
        return binding(*args)

    def bind(self, backend: str, *args: Any) -> Binding:
        """Check these arguments and resolve their backend once; the :class:`Binding` runs the kernel
        on later arguments of the same signature with no dispatch (see Binding)."""
        if self.inputs is None:
            raise TypeError(f"{self.op}: its declaration names no inputs, so it cannot be bound")
        self.validate(*args)
        return self.binding(backend, self.inputs(*args))

    def forget(self) -> None:
        self._bindings.clear()


_BINDINGS_MAX = 1024
_REGISTRY: dict[str, OpSupport] = {}
# resolve_backend's (every name, names this op accepts) per op (None: any op); see _refresh_accepted.
_ACCEPTED: dict[str | None, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def register_op(support: OpSupport) -> OpSupport:
    """Add (or replace, on module reload) an op's declaration."""
    _REGISTRY[support.op] = support
    _refresh_accepted()
    forget_decisions()
    return support


def unregister_op(op: str) -> None:
    """Remove an op's declaration (a throwaway op of a test or an experiment); unknown names are
    ignored."""
    _REGISTRY.pop(op, None)
    _refresh_accepted()
    forget_decisions()


def _refresh_accepted() -> None:
    """resolve_backend's names, computed whenever the registry changes and never while ops run: a
    table that grew as ops were first called made torch.compile guard on its size and recompile."""
    everywhere = (AUTO, *known_backends())
    accepted = {
        op: (everywhere, (AUTO, *BACKENDS, *(b for b in support.backends if b not in BACKENDS)))
        for op, support in _REGISTRY.items()
    }
    _ACCEPTED.clear()
    _ACCEPTED.update(accepted)
    _ACCEPTED[None] = (everywhere, everywhere)


def registered_ops() -> dict[str, OpSupport]:
    """Every op's declaration, after importing fastdiff.ops so all ops have registered."""
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
        raise KeyError(f"no op named {op!r} is registered")
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


def select_backend(op: str, backend: str, inputs: Mapping[str, torch.Tensor]) -> str:
    """The backend that will run ``op`` on ``inputs``: resolved, then checked.

    ``inputs`` maps argument names to the tensors the backends must accept (names appear in the
    reasons). With "auto", the first backend of the op's priority with no reasons wins; an explicit
    backend with reasons raises :class:`BackendUnavailableError` listing all of them. Remembered
    per call signature for a declared op (see OpSupport.signature).
    """
    return _REGISTRY[op].binding(backend, inputs).backend


def forget_decisions() -> None:
    """Drop every resolved binding (after changing what a reasons function sees)."""
    for support in _REGISTRY.values():
        support.forget()


def needs_grad(inputs: Mapping[str, torch.Tensor]) -> bool:
    """Whether a call on ``inputs`` must record a graph: grad mode is on and some input requires
    grad. Forward-only kernels refuse such inputs (their output's backward would be wrong)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs.values())


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


def triton_reasons(inputs: Mapping[str, torch.Tensor] | None, dtypes: Sequence[torch.dtype]) -> list[str]:
    """The reasons every Triton backend shares: Triton missing, TRITON_INTERPRET flipped after the
    import, no GPU, and per input its device and its dtype against ``dtypes``. CPU tensors run in
    Triton's interpreter under TRITON_INTERPRET=1, only when asked for by name: auto never picks the
    interpreter (an :class:`ExplicitOnly` reason, last), it is a test tool. Never imports Triton."""
    reasons = [] if _importable("triton") else ["triton is not installed"]
    interpreted = interpreting()
    if interpreted and (why := interpreter_mismatch()) is not None:
        reasons.append(why)
    if inputs is None:
        if not interpreted and not torch.cuda.is_available():
            reasons.append(
                "no CUDA device (torch.cuda.is_available() is False; TRITON_INTERPRET=1 runs the "
                "kernel in Triton's CPU interpreter)"
            )
        return reasons
    on_cpu = []
    for name, t in inputs.items():
        if t.device.type == "cpu" and interpreted:
            on_cpu.append(name)
        elif t.device.type != "cuda":
            reasons.append(
                f"{name} is on {t.device}, the triton backend needs CUDA tensors (or CPU tensors "
                "under TRITON_INTERPRET=1)"
            )
        if t.dtype not in dtypes:
            reasons.append(f"{name} dtype {t.dtype} not supported (supported: {_dtype_names(dtypes)})")
    if on_cpu:
        reasons.append(
            ExplicitOnly(
                f"{', '.join(on_cpu)} on the CPU run in Triton's interpreter "
                "(TRITON_INTERPRET=1): only with backend='triton', never picked by auto"
            )
        )
    return reasons


def always_available(inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    """The reference backend: plain PyTorch runs every input the op's validation accepts."""
    return []


_refresh_accepted()  # the names before any op registers: the BACKENDS
