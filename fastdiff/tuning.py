"""The tuner: how choices are measured, and the cache file that keeps them across processes, per machine.

Where auto measures which implementation is faster (``fastdiff.nn.conv``: the Winograd kernel or
oneDNN, per convolution shape) or which memory format runs a model faster
(:func:`choose_memory_format`, for ``fastdiff sample --memory-format auto``), the candidates run in
alternating order (:func:`alternating_seconds`), the default stays unless the other wins by
``TUNE_MARGIN``, and the winner is written here, like Triton's autotune cache, so a later process on
the same machine reuses it instead of measuring again (``fastdiff tune`` fills it ahead of time,
``fastdiff info`` lists it). Entries are grouped by a
machine key: the CPU model, ATen's CPU capability, the thread count, and the torch and fastdiff
versions; a change in any of them measures afresh. The file is
``$FASTDIFF_CACHE_DIR/tuning.json`` (default ``$XDG_CACHE_HOME/fastdiff``, else ``~/.cache/fastdiff``),
written atomically (temp file + rename, merged with what other processes wrote meanwhile). A file
that cannot be read or written is reported once and otherwise ignored: tuning then lasts for the
process only. ``FASTDIFF_TUNE=0`` neither reads nor writes it.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_DIR_ENV",
    "TUNE_ENV",
    "TUNE_MARGIN",
    "MEMORY_FORMATS",
    "cache_path",
    "machine_key",
    "enabled",
    "pick",
    "alternating_seconds",
    "measure",
    "Measurement",
    "keep",
    "run_queue_seconds",
    "busy_mark",
    "busy_share",
    "BUSY_LIMIT",
    "load",
    "store",
    "forget",
    "describe",
    "choices",
    "format_choice",
    "summary",
    "memory_format_signature",
    "choose_memory_format",
    "clear_memory_formats",
]

CACHE_DIR_ENV = "FASTDIFF_CACHE_DIR"
TUNE_ENV = "FASTDIFF_TUNE"
# How much faster the candidate that is not the default must be to replace it (every measured choice).
TUNE_MARGIN = 0.10
# A measurement is trusted (cached) when this process waited for a CPU no more than this fraction of
# its wall time (other processes held the cores: timings then swing by up to the scheduler's time
# slice, milliseconds, on kernels of microseconds). On a quiet machine the wait stays near 0.
BUSY_LIMIT = 0.10
# How many rounds a measurement may take in all, as a multiple of its minimum, while the machine is busy.
BUSY_ROUNDS_FACTOR = 4
_warned: set[str] = set()


def enabled() -> bool:
    """Whether auto measures (``FASTDIFF_TUNE=1``, the default) or keeps the static rules (``0``)."""
    value = os.environ.get(TUNE_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(
            f"{TUNE_ENV} must be 1 (measure which implementation or memory format is faster, the "
            f"default) or 0 (static rules), got {value!r}"
        )
    return value == "1"


def alternating_seconds(
    fns: Mapping[str, Callable[[], Any]], repeats: int, min_seconds: float = 0.0, max_repeats: int | None = None
) -> dict[str, list[float]]:
    """Wall times of each callable, run in alternating order, one call each per round and the order
    reversed every other round (a slow spell of a shared machine hits them alike): ``repeats``
    rounds, then more while the rounds took under ``min_seconds`` in all, up to ``max_repeats``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    limit = max(repeats, max_repeats or repeats)
    begin = time.perf_counter()
    r = 0
    while r < repeats or (r < limit and time.perf_counter() - begin < min_seconds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        r += 1
    return times


def run_queue_seconds() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux's
    ``/proc/self/task/*/schedstat``, second field), or None where the kernel does not report it."""
    total, seen = 0, False
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile, or no schedstat
            continue
    return total * 1e-9 if seen else None


def busy_mark() -> tuple[float | None, float]:
    """Where to measure a busy share from (:func:`busy_share`): the run-queue wait and the clock now."""
    return run_queue_seconds(), time.perf_counter()


def busy_share(mark: tuple[float | None, float]) -> float | None:
    """How long this process waited for a CPU since ``mark``, as a share of the wall time since (other
    processes held the cores); None where the OS does not report it."""
    waited, start = mark
    after = run_queue_seconds()
    if waited is None or after is None:
        return None
    return max(0.0, after - waited) / max(time.perf_counter() - start, 1e-9)


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` found: ``seconds``, each candidate's median; ``rounds``; ``busy``, the
    time this process's threads waited for a CPU while it measured, as a fraction of the wall time
    (other processes held the cores), or None where the OS does not say; and ``steady``: whether
    ``busy`` stayed at or under ``BUSY_LIMIT`` (unknown counts as steady). A choice from an unsteady
    measurement is used by this process but not written to the cache file."""

    seconds: dict[str, float]
    rounds: int
    busy: float | None

    @property
    def steady(self) -> bool:
        return self.busy is None or self.busy <= BUSY_LIMIT

    def record(self) -> dict[str, Any]:
        """The fields a decision keeps: each candidate's median in microseconds, rounds, busy."""
        return {
            **{f"{name}_us": s * 1e6 for name, s in self.seconds.items()},
            "rounds": self.rounds,
            **({"busy": round(self.busy, 3)} if self.busy is not None else {}),
        }


def measure(
    fns: Mapping[str, Callable[[], Any]], repeats: int, min_seconds: float = 0.0, max_repeats: int | None = None
) -> Measurement:
    """Time the candidates with :func:`alternating_seconds` (``repeats`` rounds, more while under
    ``min_seconds``) and watch how long this process waited for a CPU meanwhile
    (:func:`run_queue_seconds`); while that was more than ``BUSY_LIMIT`` of the wall time (the machine
    is busy: the timings are not the candidates' own), start over with ``repeats`` fresh rounds, up to
    ``max_repeats`` (default ``BUSY_ROUNDS_FACTOR * repeats``) rounds in all, and keep the calmest."""
    limit = max(repeats, max_repeats or BUSY_ROUNDS_FACTOR * repeats)
    best: Measurement | None = None
    spent = 0
    while True:
        mark = busy_mark()
        times = alternating_seconds(fns, repeats, min_seconds, limit - spent)
        busy = busy_share(mark)
        rounds = min(len(v) for v in times.values())
        spent += rounds
        m = Measurement({name: statistics.median(v) for name, v in times.items()}, rounds, busy)
        if best is None or (m.busy or 0.0) < (best.busy or 0.0):
            best = m
        if best.steady or spent + repeats > limit:
            return best


def keep(kind: str, signature: str, decision: dict[str, Any], measurement: Measurement) -> None:
    """Write a measured decision to the cache file if its measurement was steady; else warn (once per
    process) that the machine was busy and leave the file alone, so a later process measures again."""
    if measurement.steady:
        store(kind, signature, decision)
    else:
        _warn_once(
            f"fastdiff: the machine was busy while tuning (this process waited for a CPU "
            f"{measurement.busy:.0%} of the time); {kind} choices measured now hold for this process only "
            "and are not cached (run `fastdiff tune --again` on a quiet machine)"
        )


def pick(times: Mapping[str, float], default: str) -> str:
    """The candidate to take: the fastest, when it beats ``default`` by ``TUNE_MARGIN``, else
    ``default`` (so noise does not flip a choice)."""
    best = min(times, key=times.__getitem__)
    return best if times[best] * (1 + TUNE_MARGIN) < times[default] else default


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
        _write(path, data)
    except OSError as exc:
        _warn_once(f"fastdiff: cannot write the tuning cache {path} ({exc}); choices last for this process only")


def _write(path: Path, data: dict) -> None:
    """Replace the file atomically (a temp file, then a rename): a reader never sees half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def forget() -> bool:
    """Remove this machine's decisions from the cache file (``fastdiff tune --again``); other
    machines' entries stay. Whether there were any."""
    path = cache_path()
    data = _read(path)
    if machine_key() not in data:
        return False
    del data[machine_key()]
    try:
        _write(path, data)
    except OSError as exc:
        _warn_once(f"fastdiff: cannot write the tuning cache {path} ({exc}); choices last for this process only")
    return True


def _conv3x3_text(signature: str) -> str:
    """``fastdiff.nn.conv``'s signature (shape, layout, channels out, bias, residual, threads, ISA),
    readable; threads and ISA are in the machine key already."""
    try:
        shape, layout, out_channels, bias, residual, *_ = ast.literal_eval(signature)
    except (ValueError, SyntaxError, TypeError):
        return signature
    extras = "".join((", bias" if bias else "", ", + residual" if residual else ""))
    return f"x {tuple(shape)} {layout} -> {out_channels} channels{extras}"


def describe(kind: str, signature: str, decision: Mapping[str, Any]) -> dict[str, Any]:
    """One cached decision as ``fastdiff info`` and ``fastdiff tune`` show it: op, signature (as
    keyed) and a readable form of it, the choice, the static rule's, each candidate's time in
    microseconds (its median), and the measurement's rounds and how busy the machine was, where recorded."""
    if kind == "conv3x3":

        def name(takes: Any) -> str | None:
            return None if takes is None else ("fastdiff" if takes else "onednn")

        choice, static, text = name(decision.get("fastdiff")), name(decision.get("static")), _conv3x3_text(signature)
    else:
        choice, static, text = decision.get("choice"), decision.get("static"), signature
    times = {
        key[: -len("_us")]: value
        for key, value in sorted(decision.items())  # one order, measured or read
        if key.endswith("_us") and isinstance(value, (int, float))
    }
    # conv3x3: which of the kernel's Winograd paths it takes (absent from decisions made before the
    # paths were measured).
    path = decision.get("path") if kind == "conv3x3" and decision.get("fastdiff") else None
    extra = {k: decision[k] for k in ("rounds", "busy") if isinstance(decision.get(k), (int, float))}
    return {
        "op": kind,
        "signature": signature,
        "description": text,
        "choice": choice,
        "static": static,
        "times_us": times,
        **({"path": path} if path else {}),
        **extra,
    }


def _natural(text: str) -> list:
    """Sort key: numbers by value ("batch 80" before "batch 160")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def choices() -> list[dict[str, Any]]:
    """Every decision cached for this machine, described (:func:`describe`), by op and signature."""
    entries = _read(cache_path()).get(machine_key(), {})
    return [
        describe(kind, signature, decision)
        for kind, by_signature in sorted(entries.items())
        if isinstance(by_signature, dict)
        for signature, decision in sorted(by_signature.items(), key=lambda item: _natural(item[0]))
        if isinstance(decision, dict)
    ]


def _duration(us: float) -> str:
    return f"{us / 1e3:.1f} ms" if us >= 1e4 else f"{us:.0f} us"


def format_choice(choice: Mapping[str, Any], width: int = 0) -> str:
    """One described decision (:func:`describe`) on one line: op, signature, the choice (and the
    static rule's where the measurement overturned it), each candidate's median time, and the
    measurement's rounds and busy share (how long the process waited for a CPU) where recorded."""
    static = choice["static"]
    overturned = f" (static rule: {static})" if static is not None and static != choice["choice"] else ""
    times = ", ".join(f"{name} {_duration(us)}" for name, us in choice["times_us"].items())
    path = f" ({choice['path']} path)" if choice.get("path") else ""
    return (
        f"{choice['op']:<13} {choice['description']:<{width}}  -> {choice['choice']}{path}{overturned}"
        + (f"; medians {times}" if times else "")
        + (
            f" ({choice['rounds']} rounds" + (f", busy {choice['busy']:.0%})" if "busy" in choice else ")")
            if "rounds" in choice
            else ""
        )
    )


def summary() -> dict[str, Any]:
    """For ``fastdiff info``: the file, this machine's key, how many decisions of each kind the file
    holds for it, and each of them (:func:`choices`)."""
    entries = _read(cache_path()).get(machine_key(), {})
    return {
        "path": str(cache_path()),
        "machine": machine_key(),
        "decisions": {kind: len(v) for kind, v in entries.items() if isinstance(v, dict)},
        "choices": choices(),
    }


# ---- the model's memory format -------------------------------------------------------------------
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
MEMORY_FORMAT_KIND = "memory_format"
# The static rule and the default a measurement must beat by TUNE_MARGIN: channels_last, the layout
# fastdiff's CPU kernels are written for.
STATIC_MEMORY_FORMAT = "channels_last"
# One forward per format per round: at least MEMORY_FORMAT_REPEATS rounds, and more (up to
# MEMORY_FORMAT_MAX_REPEATS) while the rounds took under MEMORY_FORMAT_SECONDS, so a fast forward is
# timed often enough that a slow spell of a shared machine does not decide.
MEMORY_FORMAT_REPEATS = 7
MEMORY_FORMAT_MAX_REPEATS = 31
MEMORY_FORMAT_SECONDS = 2.0
_memory_formats: dict[tuple[str, str, str], dict[str, Any]] = {}


def memory_format_signature(model: str, batch: int, dtype: torch.dtype, device: torch.device | str) -> str:
    """The cache key of a model's memory-format choice: the model's name, the batch the model sees
    (doubled by guidance), dtype and device type; e.g. ``"digits batch 160 float32 cpu"``."""
    return f"{model} batch {batch} {str(dtype).removeprefix('torch.')} {torch.device(device).type}"


def clear_memory_formats() -> None:
    """Forget this process's memory-format choices (the cache file keeps them)."""
    _memory_formats.clear()


def choose_memory_format(
    model: torch.nn.Module,
    signature: str,
    args: tuple,
    kwargs: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Which memory format, "channels_last" or "contiguous" (NCHW), runs ``model(*args, **kwargs)``
    faster: this process's or the cache file's decision for ``signature``
    (:func:`memory_format_signature`), else measured: a copy of the model in each format runs one
    untimed forward (where its convolutions measure their own choices), then forwards alternating
    (:data:`MEMORY_FORMAT_REPEATS` rounds or more, see there); channels_last stays unless NCHW's
    median is faster by ``TUNE_MARGIN``. The winner is remembered for the process and in the cache file.
    With ``FASTDIFF_TUNE=0``: channels_last, nothing measured, the file neither read nor written.
    ``model`` is not changed. Returns the decision: ``choice``, ``static``, each format's median in
    microseconds (``channels_last_us``, ``contiguous_us``) and ``repeats`` when measured, and
    ``source``: "measured", "cache" or "static"; ``progress`` is told before a measurement starts."""
    if not enabled():
        return {"choice": STATIC_MEMORY_FORMAT, "static": STATIC_MEMORY_FORMAT, "source": "static"}
    key = (str(cache_path()), machine_key(), signature)
    if key in _memory_formats:
        return _memory_formats[key] | {"source": "cache"}
    cached = load(MEMORY_FORMAT_KIND).get(signature)
    if isinstance(cached, dict) and cached.get("choice") in MEMORY_FORMATS:
        _memory_formats[key] = cached
        return cached | {"source": "cache"}
    if progress is not None:
        progress(signature)
    kwargs = dict(kwargs or {})
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    sync = torch.cuda.synchronize if any(t.is_cuda for t in tensors) else (lambda: None)
    copies = {name: copy.deepcopy(model).to(memory_format=fmt) for name, fmt in MEMORY_FORMATS.items()}

    def forward(name: str) -> Callable[[], None]:
        def run() -> None:
            copies[name](*args, **kwargs)
            sync()

        return run

    fns = {name: forward(name) for name in MEMORY_FORMATS}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # first calls: the convolutions' own measurements, allocations
        m = measure(fns, MEMORY_FORMAT_REPEATS, MEMORY_FORMAT_SECONDS, MEMORY_FORMAT_MAX_REPEATS)
    decision = {"choice": pick(m.seconds, STATIC_MEMORY_FORMAT), "static": STATIC_MEMORY_FORMAT, **m.record()}
    _memory_formats[key] = decision
    keep(MEMORY_FORMAT_KIND, signature, decision, m)
    return decision | {"source": "measured"}
