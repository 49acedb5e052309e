"""Triton version differences and the interpreter switch, kept in one place.

:func:`launchable` checks that a kernel can launch in the mode TRITON_INTERPRET asks for, or says
clearly why not (the variable was flipped after triton was imported); :func:`as_jit` insists on the
compiled variant the ahead-of-time builds need.
"""

from __future__ import annotations

import triton
from triton.runtime.jit import JITFunction

from . import interpreter_mismatch, interpreting

try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # pragma: no cover - triton < 3.0
    GPUTarget = None

__all__ = ["GPUTarget", "TRITON_VERSION", "interpreting", "as_jit", "launchable", "sm_arch"]

TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


def as_jit(kernel) -> JITFunction:
    """The kernel as a compiled-mode JITFunction, what ``triton.compile`` needs."""
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel.__name__} was decorated under TRITON_INTERPRET=1: compile it in a process "
                           "without that variable (fastdiff.triton.aot runs its builds in one)")
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

