"""Shared benchmark plumbing: device choice, synchronized timing, provider axis, run length, summary.

Every benchmark records ``provider`` and ``baseline`` in extra_info (plus a derived metric); at the
end of the run the summary opens with the machine (CPU model, ISA, threads, torch and fastdiff
versions), the run's length (default or ``--full``: steps and rounds of each end-to-end group),
the conv3x3 tuner's choices made during the run and the benchmarks that ran on a busy machine
(each records ``busy``, the share of its time it waited for a CPU), then prints the ratios against
each group's baseline, from this same run. ``--csv-dir DIR`` (or FASTDIFF_BENCH_CSV_DIR) also appends the rows to
``DIR/<machine>.csv``, one file per machine; nothing is written unless asked.
"""

from __future__ import annotations

import csv
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # baselines live with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402
from _bench import DEVICE  # noqa: E402

CSV_DIR_ENV = "FASTDIFF_BENCH_CSV_DIR"
CSV_COLUMNS = [
    "timestamp",
    "run",
    "group",
    "provider",
    "median_ms",
    "min_ms",
    "rounds",
    "baseline",
    "ratio_vs_baseline",
    "steps",
    "extra",
    "device",
    "cpu",
    "isa",
    "threads",
    "gpu",
    "torch",
    "fastdiff",
]


def pytest_addoption(parser):
    group = parser.getgroup("fastdiff benchmarks")
    group.addoption(
        "--full",
        action="store_true",
        default=False,
        help="run the end-to-end benchmarks at full length (50 sampler steps, more rounds); by "
        "default they are shortened so the whole run takes minutes. FASTDIFF_BENCH_STEPS and "
        "FASTDIFF_BENCH_ROUNDS override either.",
    )
    group.addoption(
        "--csv-dir",
        default=os.environ.get(CSV_DIR_ENV),
        metavar="DIR",
        help=f"append this run's medians and ratios to DIR/<machine>.csv, one file per machine "
        f"(default: {CSV_DIR_ENV}, else no file)",
    )


def pytest_configure(config):
    _bench.set_full(config.getoption("full"))


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _busy_share(request):
    """How long each benchmark (warm-up included) waited for a CPU, as a share of its wall time, in
    its extra_info as ``busy``: with other processes on the cores a multi-threaded CPU kernel runs
    many times slower, so a number taken then is flagged in the summary instead of trusted."""
    from fastdiff.tuning import busy_share

    # set up before this fixture's timing starts, so it is torn down after this fixture records
    bench = request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    _bench.busy_window_starts_now()  # a test that warms up first starts the window again after it
    yield
    share = busy_share(_bench._busy_window[0])
    if bench is not None and share is not None:
        bench.extra_info["busy"] = f"{share:.0%}"


def _machine_lines() -> list[str]:
    m = _bench.machine()
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    return [
        f"machine: {_bench.machine_line()}{gpu} (device {DEVICE.type})",
        f"versions: torch {m['torch']}, fastdiff {m['fastdiff']}, python {sys.version.split()[0]}",
    ]


def _run_lines(groups: dict[str, list]) -> list[str]:
    kind = _bench.run_kind()
    how = ("full length" if _bench.FULL else "end-to-end groups shortened; --full for full length") + (
        f"; {_bench.STEPS_ENV} / {_bench.ROUNDS_ENV} override both"
    )
    lines = [f"run: {kind} ({how})"]
    for group, items in groups.items():
        steps = items[0].extra_info.get("steps")
        if steps is not None:
            rounds = sorted({b.stats.rounds for b in items})
            lines.append(f"  {group}: {steps} steps, {'/'.join(map(str, rounds))} round(s)")
    return lines


def _tuner_lines() -> list[str]:
    """The conv3x3 tuner's choices of this run (fastdiff.nn.conv.tuning_decisions): counts per choice,
    then one line per signature."""
    try:
        from fastdiff import tuning
        from fastdiff.nn.conv import tuning_decisions

        decisions = tuning_decisions()
    except Exception as exc:  # the tuner's API is not this file's: report, do not fail the run
        return [f"conv3x3 tuner: unavailable ({type(exc).__name__}: {exc})"]
    if not decisions:
        return ["conv3x3 tuner: no choices made in this run (no model convolution reached it, or FASTDIFF_TUNE=0)"]

    described = [(tuning.describe("conv3x3", d["signature"], d), d.get("source")) for d in decisions]
    counts = Counter(c["choice"] for c, _ in described)
    overturned = sum(1 for c, _ in described if c["static"] is not None and c["static"] != c["choice"])
    sources = Counter(source for _, source in described if source)  # measured now, or read from the cache file
    lines = [
        f"conv3x3 tuner: {len(decisions)} signature(s): "
        + ", ".join(f"{n} {choice}" for choice, n in counts.most_common())
        + f"; {overturned} overturning the static rule"
        + "".join(f"; {n} {source}" for source, n in sources.most_common())
    ]
    width = max(len(c["description"]) for c, _ in described)
    for choice, source in sorted(described, key=lambda item: item[0]["description"]):
        lines.append(f"  {tuning.format_choice(choice, width)}" + (f" [{source}]" if source else ""))
    return lines


def _baseline(items: list):
    baseline_name = items[0].extra_info.get("baseline")
    return baseline_name, next((b for b in items if b.extra_info.get("provider") == baseline_name), None)


def _extras(b) -> str:
    return ", ".join(f"{k}={v}" for k, v in b.extra_info.items() if k not in ("provider", "baseline", "steps"))


def _write_csv(directory: str, groups: dict[str, list]) -> str:
    m = _bench.machine()
    stem = "-".join(p for p in (m["cpu"], m["isa"], f"{m['threads']}t", m["gpu"]) if p)
    path = Path(directory) / (re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") + ".csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_COLUMNS:
            return f"csv: not written: {path} has other columns ({','.join(header)}); move it away"
    new = not path.exists() or not path.stat().st_size
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rows = 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        if new:
            writer.writeheader()
        for group, items in groups.items():
            baseline_name, base = _baseline(items)
            for b in items:
                ratio = base.stats.median / b.stats.median if base is not None else None
                writer.writerow(
                    {
                        "timestamp": stamp,
                        "run": _bench.run_kind(),
                        "group": group,
                        "provider": b.extra_info.get("provider", b.name),
                        "median_ms": f"{b.stats.median * 1e3:.6g}",
                        "min_ms": f"{b.stats.min * 1e3:.6g}",
                        "rounds": b.stats.rounds,
                        "baseline": baseline_name or "",
                        "ratio_vs_baseline": "" if ratio is None else f"{ratio:.4g}",
                        "steps": b.extra_info.get("steps", ""),
                        "extra": _extras(b).replace(", ", "; "),
                        "device": DEVICE.type,
                        **m,
                    }
                )
                rows += 1
    return f"csv: {rows} row(s) appended to {path}"


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's tables, so the run's summary opens with the machine
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) or [] if getattr(b, "stats", None)]
    if not benches:
        return
    groups: dict[str, list] = {}
    for b in benches:
        groups.setdefault(b.group or b.name, []).append(b)
    tr = terminalreporter
    tr.section("fastdiff benchmarks: machine, run, tuner")
    for line in _machine_lines() + _run_lines(groups) + _tuner_lines():
        tr.write_line(line)
    from fastdiff.tuning import BUSY_LIMIT

    busy = [b for b in benches if float(str(b.extra_info.get("busy", "0%")).rstrip("%")) / 100 > BUSY_LIMIT]
    if busy:
        tr.write_line(
            f"busy machine: {len(busy)} of {len(benches)} benchmark(s) waited for a CPU more than "
            f"{BUSY_LIMIT:.0%} of their time (extra_info busy=...): other processes held the cores, "
            "so their numbers are not the kernels' own; rerun them on a quiet machine"
        )
    tr.section("fastdiff: medians and ratios against each group's baseline (this run)")
    for group, items in groups.items():
        baseline_name, base = _baseline(items)
        tr.write_line(f"[{group}] device={DEVICE.type} baseline={baseline_name}")
        for b in sorted(items, key=lambda b: b.stats.median):
            med = b.stats.median
            ratio = f"{base.stats.median / med:6.2f}x vs baseline" if base is not None else ""
            tr.write_line(f"  {b.extra_info.get('provider', b.name):<28} {med * 1e3:9.3f} ms  {ratio}  {_extras(b)}")
    csv_dir = config.getoption("csv_dir")
    if csv_dir:
        tr.write_line(_write_csv(csv_dir, groups))
