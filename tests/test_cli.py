"""The command line: `fastdiff sample` writes a PNG grid and reports; errors are clean."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

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
    assert main(["sample", "--model", "glyphs", "--steps", "20", "--cfg", "4", "--per-class", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "images nearest to the requested digit: 100.0%" in text
    assert "backend auto" in text and "backend reference" in text and "ms/image" in text
    w, h = _read_png_size(out)
    assert h == 10 * 34 + 2 and w == 4 * 34 + 4


def test_sample_command_digits_is_the_default(tmp_path, capsys):
    pytest.importorskip("safetensors", reason="safetensors is not installed (a dependency of fastdiff)")
    out = tmp_path / "d.png"
    assert main(["sample", "--steps", "3", "--cfg", "4", "--per-class", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("model digits: 10 images, ddim 3 steps, cfg=4.0")
    assert "backend auto" in text and "backend reference" in text and "ms/image" in text
    assert "speed-up of auto over the reference: " in text
    w, h = _read_png_size(out)
    assert h == 10 * 34 + 2 and w == 2 * 34 + 4


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
    per_round = {b: sorted(float(line.split(f" {b} ")[1].split(",")[0].split()[0]) for line in rounds)
                 for b in ("auto", "reference")}
    for b, times in per_round.items():
        reported = float(next(line for line in text.splitlines() if line.startswith(f"  backend {b}")).split()[2])
        assert reported == pytest.approx((times[1] + times[2]) / 2, abs=0.051)  # median of 4, shown to 0.1
    assert main([*args, "--rounds", "1", "--out", str(tmp_path / "one.png")]) == 0
    text = capsys.readouterr().out
    assert "round 1/1" not in text and "(one round)" in text
    assert np.array_equal(_read_png_pixels(tmp_path / "four.png"), _read_png_pixels(tmp_path / "one.png"))


def test_sample_command_rejects_bad_arguments(tmp_path, capsys):
    assert main(["sample", "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "steps must be an int in [1, num_train_timesteps=1000]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--model", "sdxl"])
    with pytest.raises(SystemExit):
        main(["sample", "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err



def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "sample" in proc.stdout and "info" in proc.stdout
