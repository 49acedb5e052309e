"""Shared benchmark plumbing: device choice, synchronized timing, provider axis, ratio report.

Every benchmark records ``provider`` and ``baseline`` in extra_info (plus a derived metric); at the
end of the run the ratios against each group's baseline, from this same run, are printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # baselines live with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import DEVICE  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) or [] if getattr(b, "stats", None)]
    if not benches:
        return
    groups: dict[str, list] = {}
    for b in benches:
        groups.setdefault(b.group or b.name, []).append(b)
    tr = terminalreporter
    tr.section("fastdiff: medians and ratios against each group's baseline (this run)")
    for group, items in groups.items():
        baseline_name = items[0].extra_info.get("baseline")
        base = next((b for b in items if b.extra_info.get("provider") == baseline_name), None)
        tr.write_line(f"[{group}] device={DEVICE.type} baseline={baseline_name}")
        for b in sorted(items, key=lambda b: b.stats.median):
            med = b.stats.median
            ratio = f"{base.stats.median / med:6.2f}x vs baseline" if base is not None else ""
            extras = ", ".join(
                f"{k}={v}" for k, v in b.extra_info.items() if k not in ("provider", "baseline")
            )
            tr.write_line(f"  {b.extra_info.get('provider', b.name):<28} {med * 1e3:9.3f} ms  {ratio}  {extras}")
