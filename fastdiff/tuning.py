"""The tuner's cache file: measured choices kept across processes, per machine.

Where auto measures which implementation is faster (``fastdiff.nn.conv``: the Winograd kernel or
oneDNN, per convolution shape), the winner is written here, like Triton's autotune cache, so a
later process on the same machine reuses it instead of measuring again. Entries are grouped by a
machine key: the CPU model, ATen's CPU capability, the thread count, and the torch and fastdiff
versions; a change in any of them measures afresh. The file is
``$FASTDIFF_CACHE_DIR/tuning.json`` (default ``$XDG_CACHE_HOME/fastdiff``, else ``~/.cache/fastdiff``),
written atomically (temp file + rename, merged with what other processes wrote meanwhile). A file
that cannot be read or written is reported once and otherwise ignored: tuning then lasts for the
process only. ``FASTDIFF_TUNE=0`` neither reads nor writes it.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["CACHE_DIR_ENV", "cache_path", "machine_key", "load", "store", "summary"]

CACHE_DIR_ENV = "FASTDIFF_CACHE_DIR"
_warned: set[str] = set()


def cache_path() -> Path:
    base = os.environ.get(CACHE_DIR_ENV)
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastdiff")
    return Path(base) / "tuning.json"


def machine_key() -> str:
    from .info import cpu_line

    try:
        version = metadata.version("fastdiff")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"{cpu_line()} | torch {torch.__version__} | fastdiff {version}"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):  # nothing cached there (yet)
        return {}
    except (OSError, ValueError) as exc:
        _warn_once(f"fastdiff: ignoring the tuning cache {path} ({exc}); choices are measured again")
        return {}
    return data if isinstance(data, dict) else {}


def load(kind: str) -> dict[str, Any]:
    """This machine's cached decisions of ``kind`` (e.g. "conv3x3"), by signature string."""
    entries = _read(cache_path()).get(machine_key(), {}).get(kind, {})
    return entries if isinstance(entries, dict) else {}


def store(kind: str, signature: str, decision: dict[str, Any]) -> None:
    """Add one decision to the cache file (merged with its current contents, written atomically)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data.setdefault(machine_key(), {}).setdefault(kind, {})[signature] = decision
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        _warn_once(f"fastdiff: cannot write the tuning cache {path} ({exc}); choices last for this process only")


def summary() -> dict[str, Any]:
    """For ``fastdiff info``: the file, and how many decisions of each kind it holds for this machine."""
    entries = _read(cache_path()).get(machine_key(), {})
    return {"path": str(cache_path()), "machine": machine_key(),
            "decisions": {kind: len(v) for kind, v in entries.items() if isinstance(v, dict)}}
