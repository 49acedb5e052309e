"""Triton kernels, one module per op (``attention``, ``group_norm_adagn``), plus ``_compat`` for version
differences.

Importing this package does not import Triton; the kernel modules do, on first use. The ahead-of-
time resource report (registers, spills, shared memory, tensor-core instructions per build for
sm_80 and sm_90) lives in :mod:`fastdiff.triton.aot`.

Triton's interpreter (``TRITON_INTERPRET=1``) runs kernels on CPU tensors. Whether a ``@triton.jit``
function, Triton's own ``tl.sum``/``tl.max`` included, is compiled or interpreted is fixed when it
is decorated, i.e. when ``triton.language`` is imported: the variable must be set before that, and
:func:`interpreter_mismatch` says when it was not.
"""

from __future__ import annotations

import os
import sys

__all__ = ["interpreting", "interpreter_mismatch"]

_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (read now)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def interpreter_mismatch() -> str | None:
    """Why Triton cannot run in the mode TRITON_INTERPRET asks for now, or None when it can.

    Triton's language functions were decorated when ``triton.language`` was imported, in the mode
    of that moment; if the variable changed since, kernels cannot run. Never imports Triton.
    """
    language = sys.modules.get("triton.language")
    if language is None:
        return None  # the import to come will follow TRITON_INTERPRET as it is now
    imported_interpreted = type(getattr(language, "sum", None)).__name__ == "InterpretedFunction"
    if imported_interpreted == interpreting():
        return None
    if interpreting():
        return (
            "TRITON_INTERPRET=1 was set after triton was imported: Triton's own functions are compiled "
            "ones (set TRITON_INTERPRET=1 before importing triton)"
        )
    return "triton was imported under TRITON_INTERPRET=1, which is off now: its functions are interpreted ones"
