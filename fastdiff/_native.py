"""Soft loading of the native extension ``fastdiff._C``.

fastdiff must import and run (on the reference backend) when ``_C`` is missing, was skipped at
install time, or was built against another torch. Loading a .so built for another torch can fail
with "undefined symbol" or, worse, crash later on an ABI change, so the versions recorded by the
build (``fastdiff/_build_info.json``, written by setup.py) are compared with the running torch
*before* the .so is imported. Anything unexpected warns once (RuntimeWarning) and falls back.
"""

from __future__ import annotations

import importlib
import json
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = ["load", "preload", "status", "on_load"]

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")
_REBUILD = "reinstall with `pip install -e . --no-build-isolation` (after torch) to rebuild it"

_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str = ""
_build_info: dict[str, Any] = {}
# Bumped by _reset(): dispatch decisions cached under an older generation are stale.
generation = 0
_loaded = False  # load() has run (successfully or not); the result is cached until _reset()
_callbacks: list[Callable[[ModuleType], None]] = []


def _read_build_info() -> dict[str, Any] | None:
    """The build record, or None if there is none (never built, or built by other means)."""
    try:
        return json.loads(_BUILD_INFO_PATH.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"native": False, "native_skipped_reason": f"unreadable {_BUILD_INFO_PATH.name}: {exc}"}


def _running_versions() -> dict[str, str | None]:
    return {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "torch_git_version": getattr(torch.version, "git_version", None),
    }


def _version_mismatch(info: dict[str, Any]) -> str:
    """Why the recorded build does not fit the running torch, or "" if it does."""
    running = _running_versions()
    labels = {"torch_version": "torch", "torch_cuda_version": "torch CUDA", "torch_git_version": "torch commit"}
    for key, label in labels.items():
        built = info.get(key)
        # Older or hand-made records may lack the commit; the version pair still has to match.
        if key == "torch_git_version" and (built is None or running[key] is None):
            continue
        if built != running[key]:
            return f"fastdiff._C was built for {label} {built}, but {label} {running[key]} is running"
    return ""


def _try_load() -> tuple[ModuleType | None, str, dict[str, Any], bool]:
    """(module, reason, build_info, warn): warn is False only for a deliberate pure-Python install."""
    info = _read_build_info()
    if info is None:
        return None, f"fastdiff._C is not built (no {_BUILD_INFO_PATH.name} build record)", {}, True
    if not info.get("native", False):
        reason = f"fastdiff._C was not built: {info.get('native_skipped_reason') or 'no reason recorded'}"
        return None, reason, info, not info.get("native_skip_requested", False)
    mismatch = _version_mismatch(info)
    if mismatch:
        return None, mismatch, info, True
    try:
        module = importlib.import_module("fastdiff._C")
    except (ImportError, OSError) as exc:
        return None, f"importing fastdiff._C failed: {exc}", info, True
    return module, "", info, False


def _load(keep_failure: bool) -> ModuleType | None:
    """Import ``_C`` once; with ``keep_failure`` a failure is cached and warned about, else it is
    left for a later call to find (and report) again."""
    global _module, _reason, _build_info, _loaded
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        module, reason, info, warn = _try_load()
        if module is None and not keep_failure:
            return None
        _module, _reason, _build_info, _loaded = module, reason, info, True
        callbacks = list(_callbacks)
    if warn:
        warnings.warn(
            f"fastdiff: native extension unavailable ({reason}); falling back to the backends that "
            f"need no native code (reference). To fix it, {_REBUILD}.",
            RuntimeWarning,
            stacklevel=3,
        )
    if module is not None:
        for callback in callbacks:
            callback(module)
    return module


def load() -> ModuleType | None:
    """Import ``fastdiff._C`` if it fits the running torch; the module, or None. Cached.

    The first failure warns once with the reason and what to do; later calls return the cached
    result silently.
    """
    return _load(keep_failure=True)


def preload() -> None:
    """Load ``_C`` at ``import fastdiff`` when it fits the running torch, so that every native op
    (``torch.ops.fastdiff.cfg_combine``, ...) exists from the start rather than after the first op
    that happens to ask for the library; importing the .so costs a few milliseconds. Silent: when
    ``_C`` is missing or stale nothing is cached, and the first :func:`load` warns with the reason
    as before. Never raises."""
    try:
        _load(keep_failure=False)
    except Exception as exc:  # an import-time helper: `import fastdiff` must not fail because of it
        warnings.warn(
            f"fastdiff: preparing the native extension at import failed ({exc!r})", RuntimeWarning, stacklevel=2
        )


def on_load(callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback(_C)`` once ``_C`` is loaded (now, if it already is).

    Ops use it for Python-side registrations on their native op (autograd formulas) without
    importing ``_C`` at ``import fastdiff`` time. Callbacks must be idempotent: tests reload.
    """
    with _lock:
        _callbacks.append(callback)
        module = _module if _loaded else None
    if module is not None:
        callback(module)


def _load_outside_tracing() -> bool:
    """load(), run for real even while torch.compile traces a caller (Dynamo calls a function marked
    assume_constant_result and keeps its result): the first load takes a lock and imports, neither of
    which Dynamo can trace, so a model compiled before anything loaded ``_C`` would otherwise break
    its graph at every fastdiff op."""
    return load() is not None


# What torch.compiler.assume_constant_result does, without its `import torch._dynamo` (which
# imports Triton and costs ~1 s at `import fastdiff`); tests/test_compile.py checks the two agree.
_load_outside_tracing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def status() -> dict[str, Any]:
    """What was built and whether it is usable, for backends and ``fastdiff info``.

    Keys: built (a usable ``_C`` is loaded), cuda_compiled (that ``_C`` has CUDA kernels),
    cuda_archs (the archs they were compiled for), cuda_skipped_reason (why not, from the build),
    reason (why ``_C`` is not loaded, or ""), build_info (the build record, {} if none), path.
    """
    _load_outside_tracing()
    module = load()  # cached by now: no lock, no import
    built = module is not None
    # The .so itself says whether it holds CUDA kernels; the record only says what was intended.
    cuda_compiled = built and bool(getattr(module, "cuda_compiled", False))
    return {
        "built": built,
        "cuda_compiled": cuda_compiled,
        "cuda_archs": list(_build_info.get("cuda_archs", [])) if cuda_compiled else [],
        "cuda_skipped_reason": "" if cuda_compiled else _build_info.get("cuda_skipped_reason", ""),
        "reason": _reason,
        "build_info": dict(_build_info),
        "path": getattr(module, "__file__", None) if built else None,
    }


_companions: list[torch.library.Library] = []  # kept alive: dropping a Library removes its ops


def register_autograd_on_load(op: str, backward: Callable, setup_context: Callable) -> None:
    """Register the autograd formula of the native op ``fastdiff::<op>`` once ``_C`` is loaded (and
    only once, however often the ops module is reloaded or ``_C`` re-announced).

    The formula goes on a companion op ``fastdiff::<op>_autograd`` with the native op's schema,
    which runs the native op: the native op's own Autograd kernel (C++, csrc/torch_bindings.cpp; each
    differentiable op registers it in its csrc/cpu/<op>.cpp) sends a call there only when it must
    record a graph, so calls without grad never enter Python.
    """
    registered: list[bool] = []

    def register(_c: ModuleType) -> None:
        if registered or not hasattr(torch.ops.fastdiff, op):
            return
        companion = f"{op}_autograd"
        if not hasattr(torch.ops.fastdiff, companion):
            native = getattr(torch.ops.fastdiff, op).default
            schema = str(native._schema).removeprefix("fastdiff::")
            library = torch.library.Library("fastdiff", "FRAGMENT")
            library.define(companion + schema[len(op) :])

            def forward(*args: Any) -> Any:
                return native(*args)  # the autograd keys are already excluded here

            library.impl(companion, forward, "CompositeExplicitAutograd")
            _companions.append(library)
            torch.library.register_autograd(f"fastdiff::{companion}", backward, setup_context=setup_context)
        registered.append(True)

    on_load(register)


def _reset() -> None:
    """Forget the cached load result (tests). An imported .so stays registered with torch."""
    global _module, _reason, _build_info, _loaded, generation
    with _lock:
        _module, _reason, _build_info, _loaded = None, "", {}, False
        generation += 1
