"""The command line: `fastdiff sample` writes a PNG grid and reports; errors are clean."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from fastdiff import tuning
from fastdiff._png import write_png
from fastdiff.cli import main


def _read_png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def _read_png_pixels(path):
    """The RGB pixels of a PNG written by fastdiff._png (one IDAT, filter 0 on every row)."""
    data = path.read_bytes()
    w, h = _read_png_size(path)
    idat = data[data.index(b"IDAT") + 4 :]
    rows = np.frombuffer(zlib.decompressobj().decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def test_png_writer_roundtrip(tmp_path):
    img = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    write_png(tmp_path / "a.png", img)
    data = (tmp_path / "a.png").read_bytes()
    assert _read_png_size(tmp_path / "a.png") == (5, 6)
    idat = data[data.index(b"IDAT") + 4 :]
    raw = zlib.decompressobj().decompress(idat)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(6, 1 + 15)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:].reshape(6, 5, 3), img)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "b.png", img.astype(np.float32))


def test_sample_command_writes_grid_and_reports(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert (
        main(["sample", "--model", "glyphs", "--steps", "20", "--cfg", "4", "--per-class", "3", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "images nearest to the requested digit: 100.0%" in text
    assert "backend auto" in text and "backend reference" in text and "ms/image" in text
    w, h = _read_png_size(out)
    assert h == 10 * 34 + 2 and w == 4 * 34 + 4


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_sample_command_runs_the_euler_and_dpm_samplers(tmp_path, capsys, sampler):
    assert (
        main(
            [
                "sample",
                "--model",
                "glyphs",
                "--sampler",
                sampler,
                "--steps",
                "20",
                "--cfg",
                "4",
                "--per-class",
                "2",
                "--rounds",
                "1",
                "--out",
                str(tmp_path / "e.png"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert f"{sampler} 20 steps" in text and "images nearest to the requested digit: 100.0%" in text


def test_sample_command_digits_is_the_default(tmp_path, capsys):
    pytest.importorskip("safetensors", reason="safetensors is not installed (a dependency of fastdiff)")
    out = tmp_path / "d.png"
    assert main(["sample", "--steps", "3", "--cfg", "4", "--per-class", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("model digits: 10 images, ddim 3 steps, cfg=4.0")
    assert "backend auto" in text and "backend reference" in text and "ms/image" in text
    assert "speed-up of auto over the reference: " in text
    from fastdiff.info import cpu_line

    assert f"  machine: {cpu_line()}, torch {torch.__version__}" in text  # every number with its CPU and ISA
    if tuning.run_queue_seconds() is not None:  # and how much other processes held the CPU meanwhile
        assert re.search(r"the timed runs waited for a CPU \d+% of the time", text), text
    w, h = _read_png_size(out)
    assert h == 10 * 34 + 2 and w == 2 * 34 + 4


def test_sample_says_when_the_machine_was_busy(tmp_path, capsys, monkeypatch):
    """Timings taken while other processes held the cores are flagged beside the speed-up."""
    waits = iter([0.0, 1e6])  # before and after the timed rounds: waited a million seconds
    monkeypatch.setattr(tuning, "run_queue_seconds", lambda: next(waits, 1e6))
    assert (
        main(
            [
                "sample",
                "--model",
                "glyphs",
                "--steps",
                "2",
                "--per-class",
                "1",
                "--rounds",
                "1",
                "--out",
                str(tmp_path / "b.png"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert re.search(r"waited for a CPU \d+% of the time \(busy machine: these timings are not the kernels' own", text)


def test_sample_command_compiles_the_fused_model_on_request(tmp_path, capsys):
    """--compile samples a torch.compile'd copy of the U-Net on the fused backend (the reference
    run stays eager), reports the compile time apart, and gives the eager run's images."""
    pytest.importorskip("safetensors", reason="safetensors is not installed (a dependency of fastdiff)")
    args = ["sample", "--steps", "2", "--cfg", "4", "--per-class", "1", "--backend", "auto"]
    assert main([*args, "--out", str(tmp_path / "eager.png")]) == 0
    capsys.readouterr()
    assert main([*args, "--compile", "--out", str(tmp_path / "compiled.png")]) == 0
    text = capsys.readouterr().out
    assert "backend auto" in text and "(channels_last, torch.compile)" in text
    assert "backend reference" in text and "(NCHW)" in text
    assert "torch.compile: " in text and "not in the ms/image" in text
    eager, compiled = _read_png_pixels(tmp_path / "eager.png"), _read_png_pixels(tmp_path / "compiled.png")
    # The same images; Inductor may round the glue differently, which can move a pixel by one level.
    assert eager.shape == compiled.shape and np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1


def test_sample_command_alternates_backends_over_rounds(tmp_path, capsys):
    """Each timed round samples once per backend, the backends taking turns; the reported time is
    each backend's median over the rounds, and the grid is the same whatever the round count."""
    args = ["sample", "--model", "glyphs", "--steps", "5", "--cfg", "4", "--per-class", "1"]
    assert main([*args, "--rounds", "4", "--out", str(tmp_path / "four.png")]) == 0
    text = capsys.readouterr().out
    rounds = [line for line in text.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == [f"round {r}/4" for r in range(1, 5)]
    assert all(" auto " in line and " reference " in line for line in rounds)
    assert "(medians of 4 alternating rounds)" in text
    per_round = {
        b: sorted(float(line.split(f" {b} ")[1].split(",")[0].split()[0]) for line in rounds)
        for b in ("auto", "reference")
    }
    for b, times in per_round.items():
        reported = float(next(line for line in text.splitlines() if line.startswith(f"  backend {b}")).split()[2])
        assert reported == pytest.approx((times[1] + times[2]) / 2, abs=0.051)  # median of 4, shown to 0.1
    assert main([*args, "--rounds", "1", "--out", str(tmp_path / "one.png")]) == 0
    text = capsys.readouterr().out
    assert "round 1/1" not in text and "(one round)" in text
    assert np.array_equal(_read_png_pixels(tmp_path / "four.png"), _read_png_pixels(tmp_path / "one.png"))


def test_sample_command_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--steps", "0", "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "steps must be an int in [1, num_train_timesteps=1000]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--model", "sdxl"])
    with pytest.raises(SystemExit):
        main(["sample", "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


def _no_sampling(monkeypatch):
    """Make any sampling fail the test: a bad argument must be reported before the first step."""
    import fastdiff

    def refuse(*args, **kwargs):
        raise AssertionError("fastdiff.sample ran although an argument was bad")

    monkeypatch.setattr(fastdiff, "sample", refuse)


def _bad_args_cases(tmp_path):
    (tmp_path / "somedir").mkdir()
    ok = str(tmp_path / "ok.png")
    cases = [
        (["--out", str(tmp_path / "somedir")], r"argument --out: '.*somedir' is a directory"),
        (["--out", str(tmp_path / "missing" / "x.png")], r"argument --out: the directory '.*missing' .* does not "),
        (["--device", "bogus", "--out", ok], r"argument --device: 'bogus' is not a device \(accepted: cpu, cuda"),
        (["--device", "meta", "--out", ok], r"argument --device: 'meta' is a meta device; accepted: cpu, cuda"),
        (["--model", "sdxl", "--out", ok], r"argument --model: invalid choice: 'sdxl'"),
        (["--backend", "fast", "--out", ok], r"argument --backend: invalid choice: 'fast'"),
        (
            ["--steps", "0", "--out", ok],
            r"argument --steps: steps must be an int in \[1, num_train_timesteps=1000\], "
            r"got 0",
        ),
        (["--steps", "1001", "--out", ok], r"argument --steps: steps must be an int in \[1, num_train_timesteps=1000"),
        (["--cfg", "nan", "--out", ok], r"argument --cfg: the guidance scale must be a finite number, got nan"),
        (["--cfg", "inf", "--out", ok], r"argument --cfg: the guidance scale must be a finite number, got inf"),
        (["--eta", "1.5", "--out", ok], r"argument --eta: must be a number in \[0, 1\], got 1\.5"),
        (["--eta", "nan", "--out", ok], r"argument --eta: must be a number in \[0, 1\], got nan"),
        (["--sampler", "ddpm", "--eta", "0.5", "--out", ok], r"argument --eta: eta applies to --sampler ddim only"),
        (
            ["--sampler", "euler_a", "--eta", "0.5", "--out", ok],
            r"argument --eta: eta applies to --sampler ddim only; "
            r"euler_a's noise is its own",
        ),
        (
            ["--sampler", "heun", "--out", ok],
            r"argument --sampler: invalid choice: 'heun' \(choose from 'ddim', "
            r"'ddpm', 'euler', 'euler_a', 'dpmpp_2m', 'dpmpp_2m_sde'\)",
        ),
        (
            ["--sampler", "ddim", "--karras", "--out", ok],
            r"argument --karras: karras_sigmas applies to sampler='euler', 'dpmpp_2m' and 'dpmpp_2m_sde', not 'ddim'",
        ),
        (
            ["--sampler", "dpmpp_2m", "--karras", "--schedule", "cosine", "--out", ok],
            r"argument --karras: karras_sigmas with the cosine schedule is not a configuration diffusers'",
        ),
        (["--seed", "-1", "--out", ok], r"argument --seed: must be an int in \[0, 2\*\*63\), got -1"),
        (["--schedule", "quadratic", "--out", ok], r"argument --schedule: schedule must be one of"),
        (["--per-class", "0", "--out", ok], r"--per-class must be >= 1"),
        (["--rounds", "0", "--out", ok], r"--rounds must be >= 1"),
        (
            ["--cuda-graph", "on", "--out", ok],
            r"argument --cuda-graph: 'on' needs a CUDA --device \(the loop runs "
            r"on 'cpu'\)",
        ),
        (["--cuda-graph", "always", "--out", ok], r"argument --cuda-graph: invalid choice: 'always'"),
        (
            ["--memory-format", "nhwc", "--out", ok],
            r"argument --memory-format: invalid choice: 'nhwc' \(choose from "
            r"'auto', 'channels_last', 'contiguous'\)",
        ),
    ]
    if not torch.cuda.is_available():
        cases += [
            (["--device", "cuda", "--out", ok], r"argument --device: 'cuda' needs a CUDA GPU, and none is available"),
            (
                ["--backend", "cuda", "--out", ok],
                r"argument --backend: sampler_step: backend='cuda' cannot run these "
                r"inputs: .*no CUDA device",
            ),
        ]
    return cases


def test_sample_command_reports_every_bad_argument_before_sampling(tmp_path, capsys, monkeypatch):
    """Issue 13: --out a directory or in a missing directory (which failed only after all the sampling
    and timing rounds), --device bogus, --backend cuda without a GPU and every other bad argument exit
    with status 2 and argparse's `fastdiff sample: error: ...`, with no traceback and nothing sampled."""
    _no_sampling(monkeypatch)
    for extra, match in _bad_args_cases(tmp_path):
        with pytest.raises(SystemExit) as exc:
            main(["sample", "--model", "glyphs", *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2, extra
        assert "usage: fastdiff sample" in err and "Traceback" not in err, (extra, err)
        line = err.strip().splitlines()[-1]
        assert line.startswith("fastdiff sample: error: "), (extra, err)
        assert re.search(match, line), (extra, line)
    assert not (tmp_path / "ok.png").exists()  # the write check leaves no file behind


def test_sample_command_refuses_an_unwritable_out_before_sampling(tmp_path, capsys, monkeypatch):
    """A directory without write permission (for root, who may write anywhere else: sysfs)."""
    _no_sampling(monkeypatch)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("running as root, which writes into read-only directories, and no sysfs to try instead")
        with pytest.raises(SystemExit) as exc:
            main(["sample", "--model", "glyphs", "--out", "/sys/fastdiff-x.png"])
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(SystemExit) as exc:
                main(["sample", "--model", "glyphs", "--out", str(locked / "fastdiff-x.png")])
        finally:
            locked.chmod(0o700)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(
        r"fastdiff sample: error: argument --out: cannot write '.*fastdiff-x\.png' \(Permission denied\)", err
    ), err


def test_sample_command_bad_argument_from_the_shell_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastdiff", "sample", "--model", "glyphs", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fastdiff sample: error: argument --out: ")


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and all(command in proc.stdout for command in ("sample", "tune", "info"))
