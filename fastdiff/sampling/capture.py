"""``capture_check``: prove on any device, the CPU included, that a sampling loop can be captured.

A CUDA graph records the kernels of one step and replays them with no Python and no host in the
loop. That is sound only if a step (the model call plus fastdiff's update) never reads a device
value on the host, never copies between host and device, allocates nothing outside the model,
never branches in Python on a tensor's value, and dispatches exactly the same ops on the same
memory with the same scalars at every step (a scalar that changes per step would be baked into the
graph at its capture-time value, and every replay would reuse it). ``capture_check`` runs the
planned loop of ``fastdiff.sample`` under a TorchFunctionMode and a TorchDispatchMode, watches
every op, tells the model's ops from the loop's, and raises ``CaptureCheckError`` naming the kind
of failure, the op, the step and whether it was in the model. It needs no GPU: CI runs it on CPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..profiling import HOST_SYNC_OPS
from .config import SamplingConfig
from .plan import SamplingPlan

__all__ = ["capture_check", "CaptureCheckError", "CaptureReport", "FAILURE_KINDS"]

FAILURE_KINDS = (
    "not capturable",
    "host sync",
    "copy across devices",
    "allocation outside the model",
    "branch on a tensor value",
    "steps differ",
)

# Tensor methods that hand a device value to Python (a device-to-host copy and a wait on CUDA).
_HOST_READS = {"item", "tolist", "numpy", "__int__", "__float__", "__index__", "__complex__"}
_BRANCHES = {"__bool__"}
# Functions that make a tensor from host data (a synchronous host-to-device copy on CUDA, which a
# capture refuses) or move one to the host.
_FROM_HOST = {"tensor", "as_tensor", "asarray", "from_numpy"}
_TO_HOST = {"cpu"}


class CaptureCheckError(AssertionError):
    """A step of the loop cannot be captured in a CUDA graph; ``kind`` is one of ``FAILURE_KINDS``."""

    def __init__(
        self, kind: str, message: str, *, step: int | None = None, op: str | None = None, in_model: bool | None = None
    ) -> None:
        super().__init__(message)
        self.kind, self.step, self.op, self.in_model = kind, step, op, in_model


@dataclass
class CaptureReport:
    """What one step dispatches (identical at every step, or the check would have failed)."""

    steps: int
    loop_ops: Counter = field(default_factory=Counter)  # per step, outside the model
    model_ops: int = 0  # per step, inside the model
    syncs: int = 0
    allocations_outside_model: int = 0

    def __str__(self) -> str:
        loop = ", ".join(f"{k}×{v}" for k, v in sorted(self.loop_ops.items()))
        return (
            f"capturable: {self.steps} steps with identical op traces; per step {self.model_ops} ops in the "
            f"model and {sum(self.loop_ops.values())} outside it ({loop}); {self.syncs} host syncs; "
            f"{self.allocations_outside_model} allocations outside the model"
        )


def _op_name(func: Any) -> str:
    return f"{func.namespace}.{func._opname}" if hasattr(func, "namespace") else getattr(func, "__name__", str(func))


def _allocates(func: Any) -> bool:
    """Whether the op returns a new tensor (not a view, not an in-place or out= result)."""
    schema = func._schema
    return any(r.alias_info is None and "Tensor" in str(r.type) for r in schema.returns)


class _Watcher:
    """The state shared by the two modes: the current step, whether the model is running, the trace."""

    def __init__(self, plan: SamplingPlan, known: dict[int, str]) -> None:
        self.plan = plan
        self.known = known  # storage address -> name of a buffer or weight made before the loop
        self.step = -1
        self.in_model = False
        self.trace: list[tuple] = []
        self.local: dict[int, int] = {}  # storage address -> index of the op that made it in this step
        self.loop_ops: Counter = Counter()
        self.model_ops = 0

    @contextlib.contextmanager
    def model_region(self):
        self.in_model = True
        try:
            yield
        finally:
            self.in_model = False

    def where(self) -> str:
        return "in the model" if self.in_model else "in fastdiff's loop"

    def fail(self, kind: str, op: str, advice: str) -> None:
        raise CaptureCheckError(
            kind,
            f"capture_check: {kind} at step {self.step}: {op} {self.where()}. {advice}",
            step=self.step,
            op=op,
            in_model=self.in_model,
        )

    def describe(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            addr = value.untyped_storage().data_ptr() if value.device.type != "meta" else 0
            base = ("local", self.local[addr]) if addr in self.local else ("buffer", self.known.get(addr, addr))
            return base + (
                value.storage_offset(),
                tuple(value.shape),
                tuple(value.stride()),
                value.dtype,
                value.device.type,
            )
        if isinstance(value, (list, tuple)):
            return tuple(self.describe(v) for v in value)
        if isinstance(
            value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
        ):
            return value
        return type(value).__name__


class _FunctionWatch(TorchFunctionMode):
    def __init__(self, watcher: _Watcher) -> None:
        super().__init__()
        self.w = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        w = self.w
        if name in _BRANCHES:
            w.fail(
                "branch on a tensor value",
                f"Tensor.{name}",
                "A Python `if` on a tensor reads it on the host and takes one path at capture; compute both "
                "sides with torch.where, or decide from shapes or Python values before the loop.",
            )
        if name in _HOST_READS:
            w.fail(
                "host sync",
                f"Tensor.{name}",
                "Reading a device value on the host waits for the device and is refused during capture; keep "
                "the value on the device (index with tensors, use torch.where/clamp) or read it before the loop.",
            )
        if name in _FROM_HOST and not (args and isinstance(args[0], torch.Tensor)):
            w.fail(
                "copy across devices",
                f"torch.{name}",
                "A tensor made from host data is a synchronous host-to-device copy on CUDA, refused during "
                "capture; make it once before the loop (a buffer or a registered module buffer).",
            )
        if name in _TO_HOST or (name == "to" and _names_host(args[1:], kwargs)):
            w.fail(
                "copy across devices",
                f"Tensor.{name}",
                "Moving a tensor to the host inside the loop is a device-to-host copy and a sync; keep it on the "
                "loop's device.",
            )
        return func(*args, **kwargs)


def _names_host(args: tuple, kwargs: dict) -> bool:
    for value in list(args) + [kwargs.get("device")]:
        if isinstance(value, (str, torch.device)) and torch.device(value).type == "cpu":
            return True
    return False


class _DispatchWatch(TorchDispatchMode):
    def __init__(self, watcher: _Watcher, device: torch.device) -> None:
        super().__init__()
        self.w = watcher
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w, name = self.w, _op_name(func)
        if name in HOST_SYNC_OPS:
            w.fail(
                "host sync",
                name,
                "This op reads a device value on the host (or has a data-dependent output shape) and waits for "
                "the device; CUDA graph capture refuses it.",
            )
        if name in ("aten.lift_fresh", "aten.lift_fresh_copy"):
            w.fail(
                "copy across devices",
                name,
                "A tensor made from host data inside the loop is a synchronous "
                "host-to-device copy on CUDA; make it once before the loop.",
            )
        flat = [a for a in _flatten(args) + _flatten(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        # A 0-d CPU tensor beside CUDA ones is passed to the kernel as a scalar (PyTorch allows the mix);
        # one made in the loop from host data is caught above, one kept from before is in the trace.
        devices = {t.device for t in flat if not (t.dim() == 0 and t.device.type == "cpu")} or {self.device}
        if len(devices) > 1:
            w.fail("copy across devices", name, f"It mixes tensors on {sorted(map(str, devices))}.")
        target = kwargs.get("device")
        if name == "aten._to_copy" and target is not None and flat and torch.device(target) != flat[0].device:
            w.fail("copy across devices", name, f"It copies a tensor from {flat[0].device} to {target}.")
        if not w.in_model:
            w.loop_ops[name] += 1
            if _allocates(func):
                w.fail(
                    "allocation outside the model",
                    name,
                    "Every tensor the loop touches outside the model must be a buffer of the plan, made once; "
                    "a per-step allocation also means a per-step copy.",
                )
        else:
            w.model_ops += 1
        record = (name, w.in_model, w.describe(args), w.describe(kwargs))
        out = func(*args, **kwargs)
        index = len(w.trace)
        w.trace.append(record)
        for t in _flatten([out]):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                addr = t.untyped_storage().data_ptr()
                if addr not in w.known:  # the latest op to return this memory names it (addresses get reused)
                    w.local[addr] = index
        return out


def _flatten(values: Any) -> list:
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _known_storages(plan: SamplingPlan) -> dict[int, str]:
    known: dict[int, str] = {}

    def add(name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            known.setdefault(t.untyped_storage().data_ptr(), name)

    for name in ("x_in", "t_in", "timesteps", "coefs", "counter", "seed", "cfg"):
        add(name, getattr(plan, name))
    for key, value in plan.kwargs.items():
        add(f"kwargs[{key!r}]", value)
    model = plan.config.model
    if isinstance(model, torch.nn.Module):
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            add(name, t)
    return known


def _first_difference(a: list[tuple], b: list[tuple]) -> tuple[int, tuple | None, tuple | None]:
    for k in range(max(len(a), len(b))):
        ra = a[k] if k < len(a) else None
        rb = b[k] if k < len(b) else None
        if ra != rb:
            return k, ra, rb
    return -1, None, None


def capture_check(
    model: Callable[..., Any], shape: tuple[int, ...] | None = None, **sample_kwargs: Any
) -> CaptureReport:
    """Run ``fastdiff.sample(model, shape, **sample_kwargs)``'s planned loop and prove every step
    capturable in a CUDA graph, or raise ``CaptureCheckError`` naming the failure, op and step.

    Fails on: arguments that make the loop uncapturable (classifier guidance, a callback,
    check_finite, dynamic thresholding, the reference backend); a host sync (``.item()``,
    ``.tolist()``, ``nonzero`` and other data-dependent ops); a copy across devices (``.cpu()``,
    ``torch.tensor(...)`` inside the loop, ops mixing devices); an allocation outside the model; a
    Python branch on a tensor's value; and a step whose traced ops, memory or scalars differ from
    step 0's (a value that a graph would bake in). Like the graph path, it first runs one warm-up
    step untraced. Runs on the device the arguments give (CPU by default). Returns a report of what
    one step dispatches.
    """
    sample_kwargs = dict(sample_kwargs)
    sample_kwargs["cuda_graph"] = False
    config = SamplingConfig.build(model, shape, **sample_kwargs)
    reasons = [r for r in config.capture_reasons() if "not on a CUDA device" not in r]
    if reasons:
        raise CaptureCheckError("not capturable", "capture_check: not capturable: " + "; ".join(reasons))
    plan = SamplingPlan(config)
    plan.step(0)  # the warm-up the graph path runs before capturing
    plan.load(config)
    watcher = _Watcher(plan, _known_storages(plan))
    plan.model_region = watcher.model_region
    report = CaptureReport(plan.num_steps)
    first: list[tuple] | None = None
    try:
        for i in range(plan.num_steps):
            watcher.step, watcher.trace, watcher.local = i, [], {}
            watcher.loop_ops, watcher.model_ops = Counter(), 0
            with _FunctionWatch(watcher), _DispatchWatch(watcher, config.device):
                plan.step(i)
            if first is None:
                first = watcher.trace
                report.loop_ops, report.model_ops = watcher.loop_ops, watcher.model_ops
                continue
            k, ra, rb = _first_difference(first, watcher.trace)
            if k >= 0:
                op = (rb or ra)[0]
                raise CaptureCheckError(
                    "steps differ",
                    f"capture_check: steps differ at step {i}: op #{k} ({op}) differs from step 0's "
                    f"(step 0: {_short(ra)}; step {i}: {_short(rb)}). A graph captured at one step would replay "
                    "that step's ops, memory and scalars at every step: keep per-step values in device tensors "
                    "indexed on the device, and run the same ops every step.",
                    step=i,
                    op=op,
                    in_model=(rb or ra)[1],
                )
    finally:
        plan.model_region = contextlib.nullcontext
    return report


def _short(record: tuple | None, limit: int = 300) -> str:
    if record is None:
        return "no op"
    text = f"{record[0]}{' in the model' if record[1] else ''} with args {record[2]!r}"
    return text if len(text) <= limit else text[:limit] + "..."
