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


def _cached_decisions(monkeypatch, tmp_path):
    """Two decisions in a cache file of the test's own, as the tuner writes them."""
    from fastdiff import tuning

    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path))
    conv_signature = repr(((8, 16, 16, 16), "channels_last", 32, True, False, 2, "AVX2"))
    tuning.store(
        "conv3x3",
        conv_signature,
        {"fastdiff": False, "static": True, "fastdiff_us": 510.0, "onednn_us": 230.0, "rounds": 5, "busy": 0.02},
    )
    tuning.store(
        "memory_format",
        "digits batch 160 float32 cpu",
        {"choice": "channels_last", "static": "channels_last", "channels_last_us": 61000.0, "contiguous_us": 64000.0},
    )
    return conv_signature


def test_the_cached_tuning_decisions_are_listed(monkeypatch, tmp_path, capsys):
    _cached_decisions(monkeypatch, tmp_path)
    assert info.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(out) if line.startswith("tuning "))
    assert "1 conv3x3, 1 memory_format" in out[head] and str(tmp_path / "tuning.json") in out[head]
    conv, fmt = out[head + 1], out[head + 2]
    assert conv.split()[:2] == ["conv3x3", "x"] and "(8, 16, 16, 16) channels_last -> 32 channels, bias" in conv
    assert "-> onednn (static rule: fastdiff); medians fastdiff 510 us, onednn 230 us (5 rounds, busy 2%)" in conv
    assert fmt.split()[:2] == ["memory_format", "digits"] and "digits batch 160 float32 cpu" in fmt
    assert fmt.endswith("-> channels_last; medians channels_last 61.0 ms, contiguous 64.0 ms")  # no rounds recorded


def test_the_cached_tuning_decisions_are_in_the_json(monkeypatch, tmp_path, capsys):
    conv_signature = _cached_decisions(monkeypatch, tmp_path)
    assert info.main(["--json"]) == 0
    tuning = json.loads(capsys.readouterr().out)["tuning"]
    assert tuning["decisions"] == {"conv3x3": 1, "memory_format": 1}
    assert tuning["path"] == str(tmp_path / "tuning.json")
    assert tuning["choices"] == [
        {
            "op": "conv3x3",
            "signature": conv_signature,
            "description": "x (8, 16, 16, 16) channels_last -> 32 channels, bias",
            "choice": "onednn",
            "static": "fastdiff",
            "times_us": {"fastdiff": 510.0, "onednn": 230.0},
            "rounds": 5,
            "busy": 0.02,
        },
        {
            "op": "memory_format",
            "signature": "digits batch 160 float32 cpu",
            "description": "digits batch 160 float32 cpu",
            "choice": "channels_last",
            "static": "channels_last",
            "times_us": {"channels_last": 61000.0, "contiguous": 64000.0},
        },
    ]


def test_no_cached_decisions_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path))
    assert info.main([]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tuning "))
    assert "none yet" in line and "fastdiff tune fills it" in line


def test_json_report_states_each_backends_declared_rules(capsys):
    """--json carries each op's declaration (dtypes, parts, limits, grad per backend): the rules the
    table's verdicts come from, read from the one place they are written."""
    assert info.main(["--json"]) == 0
    declared = json.loads(capsys.readouterr().out)["declared"]
    for op, support in registered_ops().items():
        assert declared[op] == json.loads(json.dumps(support.describe())), op
    assert "D <= 8192 features" in declared["layer_norm_modulate"]["triton"]["limits"]
    assert declared["attention"]["triton"]["grad"] is False
    assert declared["conv3x3"]["cpu"]["dtypes"] == ["float32"]
