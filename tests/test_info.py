"""`fastdiff info` / `python -m fastdiff.info` tell the truth about versions, build and backends."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from fastdiff import _native, info
from fastdiff.backends import BACKENDS, registered_ops


def test_main_prints_versions_build_and_every_op_and_backend(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert "triton" in out and "python" in out
    for op in registered_ops():
        assert op in out, op
    for backend in BACKENDS:
        assert backend in out, backend
    status = _native.status()
    if status["built"]:
        assert "CPU kernels: compiled" in out
        if status["cuda_compiled"]:
            assert "CUDA kernels: compiled for " + ", ".join(status["cuda_archs"]) in out
        else:
            assert "CUDA kernels: not compiled: " in out
    else:
        assert status["reason"] in out


def test_json_report(capsys):
    assert info.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert set(report["backends"]) == set(registered_ops())
    assert report["native"]["built"] == _native.status()["built"]


def test_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "fastdiff.info"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "cfg_combine" in result.stdout
