"""Machine-independent cost counts: aten ops dispatched and host syncs, per call of a function.

Times on a shared machine are noisy; the number of aten ops a sampler step dispatches and the
number of times it waits for the device (a host sync) are not. Counted with a TorchDispatchMode,
so only ops that reach the dispatcher are seen (Python-level arithmetic is free here).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops", "HOST_SYNC_OPS"]

# Ops whose result the host must read (a device→host copy and wait on CUDA): .item() / bool() /
# int() on a tensor, and ops whose output shape depends on the data.
HOST_SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.is_nonzero",
        "aten.nonzero",
        "aten.equal",
        "aten.masked_select",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.repeat_interleave",
        "aten._assert_async",
    }
)


@dataclass
class OpCount:
    ops: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        return sum(n for name, n in self.ops.items() if name in HOST_SYNC_OPS)

    def __str__(self) -> str:
        listing = ", ".join(f"{name.removeprefix('aten.')}×{n}" for name, n in sorted(self.ops.items()))
        return f"{self.total} aten ops, {self.syncs} host syncs ({listing})"


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count.ops[f"{func.namespace}.{func._opname}"] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, OpCount]:
    """Run ``fn(*args, **kwargs)`` once and return (its result, the ops it dispatched)."""
    count = OpCount()
    with _Counter(count):
        result = fn(*args, **kwargs)
    return result, count
