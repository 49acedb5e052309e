"""Triton version differences and the interpreter switch, kept in one place.

:func:`launchable` checks that a kernel can launch in the mode TRITON_INTERPRET asks for, or says
clearly why not (the variable was flipped after triton was imported); :func:`as_jit` insists on the
compiled variant the ahead-of-time builds need; :func:`interpreter_traffic` counts the bytes an
interpreted kernel loads and stores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import triton
from triton.runtime.jit import JITFunction

from . import interpreter_mismatch, interpreting

try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # pragma: no cover - triton < 3.0
    GPUTarget = None

__all__ = [
    "GPUTarget",
    "TRITON_VERSION",
    "interpreting",
    "as_jit",
    "launchable",
    "sm_arch",
    "interpreter_traffic",
    "InterpreterTraffic",
]

TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


def as_jit(kernel) -> JITFunction:
    """The kernel as a compiled-mode JITFunction, what ``triton.compile`` needs."""
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{kernel.__name__} was decorated under TRITON_INTERPRET=1: compile it in a process "
            "without that variable (fastdiff.triton.aot runs its builds in one)"
        )
    return kernel


def launchable(kernel):
    """The kernel, ready to launch in the mode TRITON_INTERPRET asks for, or a clear error why not."""
    if (why := interpreter_mismatch()) is not None:
        raise RuntimeError(f"cannot launch {kernel.__name__}: {why}")
    return kernel


def sm_arch(capability: int) -> str:
    """The ptxas --gpu-name Triton compiles for: sm_90 and newer get the arch-specific "a" target
    (wgmma and TMA need it), as in triton/backends/nvidia/compiler.py."""
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability
    except ImportError:  # pragma: no cover - the same rule, for a triton that moved it
        return f"sm_{capability}{'a' if capability >= 90 else ''}"
    return sm_arch_from_capability(capability)


class InterpreterTraffic:
    """Memory traffic of kernels run in Triton's interpreter: every active lane of every load and
    store, as byte addresses (one array per access) and the element size."""

    def __init__(self) -> None:
        self.loads: list[tuple[np.ndarray, int]] = []
        self.stores: list[tuple[np.ndarray, int]] = []

    @staticmethod
    def _in(addresses: np.ndarray, tensor: torch.Tensor | None) -> np.ndarray:
        if tensor is None:
            return addresses
        start = tensor.untyped_storage().data_ptr()
        end = start + tensor.untyped_storage().nbytes()
        return addresses[(addresses >= start) & (addresses < end)]

    def bytes(self, kind: str, tensor: torch.Tensor | None = None) -> int:
        """Bytes loaded (kind="load") or stored ("store"), all of them or those in ``tensor``'s storage."""
        events = self.loads if kind == "load" else self.stores
        return sum(self._in(a, tensor).size * size for a, size in events)

    def unique_bytes(self, kind: str, tensor: torch.Tensor | None = None) -> int:
        """Like :meth:`bytes`, but each address counted once: the footprint, not the traffic.
        Accesses of different element sizes (a float32 workspace beside 16-bit data) are kept apart."""
        events = self.loads if kind == "load" else self.stores
        total = 0
        for size in {s for _, s in events}:  # kernels mix element sizes (an int64 index, fp16 data)
            addresses = np.concatenate([self._in(a, tensor) for a, s in events if s == size])
            total += int(np.unique(addresses).size) * size
        return total


@contextlib.contextmanager
def interpreter_traffic() -> Iterator[InterpreterTraffic]:
    """Record the loads and stores of interpreted kernels launched inside the block.

    Wraps the interpreter's masked load and store (every tl.load/tl.store goes through them; the
    unmasked forms call the masked ones with an all-true mask), counting only lanes the mask lets
    through: what a GPU would move, up to cache-line granularity.
    """
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    traffic = InterpreterTraffic()

    def record(events: list, ptrs, mask) -> None:
        # A mask combined with a scalar condition (`(offs < D) & (row < N)`) reaches the interpreter
        # as int32 0/1, not bool: indexing with it would pick elements 0 and 1, not the active lanes.
        active = np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)
        events.append((ptrs.data[active].astype(np.uint64), ptrs.get_element_ty().primitive_bitwidth // 8))

    load, store = builder.create_masked_load, builder.create_masked_store

    def masked_load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        record(traffic.loads, ptrs, mask)
        return load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def masked_store(ptrs, value, mask, cache_modifier, eviction_policy):
        record(traffic.stores, ptrs, mask)
        return store(ptrs, value, mask, cache_modifier, eviction_policy)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    try:
        yield traffic
    finally:
        del builder.create_masked_load, builder.create_masked_store  # the class's methods again
