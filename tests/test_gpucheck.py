"""``python -m fastdiff.gpucheck`` runs end to end here: the CPU parts, then 'no GPU', exit 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpucheck runs the whole GPU tier instead")
def test_gpucheck_without_a_gpu_runs_the_cpu_parts_and_exits_0(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastdiff.gpucheck", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU here" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["capture_checks"] and all(c["ok"] for c in report["capture_checks"]), report["capture_checks"]
    assert report["phases"] == [] and "ATen CPU capability" in report["machine"]["cpu"]
    assert "no CUDA GPU here" in (tmp_path / "report.md").read_text()


def test_gpucheck_rejects_a_bad_budget(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastdiff.gpucheck", "--out", str(tmp_path), "--budget", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--budget must be a positive number of seconds" in proc.stderr
