"""fastdiff generate / fastdiff pack: the same images at any number of processes (torchrun, gloo) and any
batch size, resumable after SIGKILL with no partial files, refusals named, the npz equal to the PNGs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastdiff import generation

ROOT = Path(__file__).resolve().parent.parent
# DDPM: every step draws noise, so a wrong image index in the step noise shows; 6 steps keep it quick.
JOB = ["--model", "digits", "--num-images", "14", "--sampler", "ddpm", "--steps", "6", "--cfg", "3", "--seed", "5"]


def _env() -> dict:
    # The one-process runs keep torch's default threads (torchrun gives each process one): the images
    # must not depend on it.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMP_NUM_THREADS"):
        env.pop(name, None)
    return env


def _run(args: list[str], *, nproc: int | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastdiff", *args]
    if nproc is not None:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000 + nproc),
            "-m",
            "fastdiff",
            *args,
        ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, **kw)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.fixture(scope="module")
def reference_set(tmp_path_factory) -> Path:
    """The job in one process, batch 4."""
    out = tmp_path_factory.mktemp("one") / "out"
    _run(["generate", *JOB, "--batch-size", "4", "--out", str(out)])
    return out


def test_layout_manifest_and_no_leftovers(reference_set):
    names = sorted(p.relative_to(reference_set).as_posix() for p in reference_set.rglob("*") if p.is_file())
    assert names == ["000000/" + f"{i:06d}.png" for i in range(14)] + ["manifest.json"]
    manifest = json.loads((reference_set / "manifest.json").read_text())
    assert manifest["num_images"] == 14 and manifest["sampler"] == "ddpm" and manifest["seed"] == 5
    assert len(manifest["weights_sha256"]) == 64 and manifest["torch"] and manifest["fastdiff"]


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_any_number_of_gloo_processes_writes_the_same_images(tmp_path, reference_set, nproc):
    pytest.importorskip("torch.distributed", reason="torch.distributed is not available")
    out = tmp_path / "out"
    done = _run(["generate", *JOB, "--batch-size", "4", "--out", str(out)], nproc=nproc)
    assert f"{nproc} process(es)" in done.stdout
    assert _images(out) == _images(reference_set)
    assert (out / "manifest.json").read_text() == (reference_set / "manifest.json").read_text()


def test_another_batch_size_gives_the_same_images(tmp_path, reference_set):
    """Batches of 5 (the last padded) instead of 4: the same noise for every image; the model's batch
    differs, which may round a float differently, so at most one level in a few pixels."""
    out = tmp_path / "out"
    _run(["generate", *JOB, "--batch-size", "5", "--out", str(out)])
    ours, theirs = _images(out), _images(reference_set)
    assert ours.keys() == theirs.keys()
    for name in ours:
        a = generation.read_png(out / name).astype(int)
        b = generation.read_png(reference_set / name).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.02, name


def test_sigkill_then_the_same_command_on_two_processes_completes_the_set(tmp_path):
    """SIGKILL a one-process job after its fourth image, run the same command on two processes: the set
    equals an uninterrupted run's, with no temporary file left. (40 steps a batch, so the kill lands
    mid-job however fast the machine.)"""
    slow = [a if a != "6" else "40" for a in JOB]
    whole = tmp_path / "whole"
    _run(["generate", *slow, "--batch-size", "2", "--out", str(whole)])
    out = tmp_path / "out"
    args = [sys.executable, "-m", "fastdiff", "generate", *slow, "--batch-size", "2", "--out", str(out)]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list(out.rglob("*.png"))) < 4:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = len(list(out.rglob("*.png")))
    assert 4 <= written < 14, f"{written} images before the kill"
    # resumed by two processes: which process wrote an image does not matter
    done = _run(["generate", *slow, "--batch-size", "2", "--out", str(out)], nproc=2)
    assert f"({written} there already), 2 process(es)" in done.stdout
    assert _images(out) == _images(whole)
    assert not list(out.rglob(f"*{generation._TMP_SUFFIX}")) and not (out / ".progress").exists()


def test_a_failing_process_ends_the_job_with_its_error(tmp_path):
    """Rank 1's writer fails on its second image (tests/generate_failing_rank.py): torchrun ends the job
    with rank 1's message instead of rank 0 waiting for it, and the images written are whole."""
    pytest.importorskip("torch.distributed", reason="torch.distributed is not available")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000 + 7),
        str(ROOT / "tests" / "generate_failing_rank.py"),
        "generate",
        "--model",
        "digits",
        "--num-images",
        "40",
        "--batch-size",
        "4",
        "--steps",
        "6",
        "--out",
        str(out),
    ]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode != 0 and time.monotonic() - start < 120
    assert "fastdiff generate: error: rank 1: cannot write" in done.stderr
    assert "No space left on device (injected into rank 1)" in done.stderr
    for png in out.rglob("*.png"):
        generation.read_png(png)  # whole


def test_other_options_into_the_same_directory_are_refused_by_name(tmp_path, reference_set):
    out = tmp_path / "out"
    _run(["generate", *JOB, "--batch-size", "4", "--out", str(out)])
    changed = [a if a != "6" else "7" for a in JOB]  # --steps 7
    done = _run(["generate", *changed, "--batch-size", "4", "--out", str(out)], check=False)
    assert done.returncode == 2
    assert "holds images generated with other options" in done.stderr
    assert "steps: 6 in the directory, 7 in this run" in done.stderr
    assert _images(out) == _images(reference_set)  # nothing touched


def test_unwritable_directory_and_bad_arguments_exit_with_a_named_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _run(["generate", *JOB, "--out", str(blocker / "sub")], check=False)
    assert done.returncode == 2 and "argument --out: cannot write into" in done.stderr
    for extra, match in [
        (["--num-images", "0"], "argument --num-images: must be an int >= 1"),
        (["--batch-size", "0"], "argument --batch-size: must be an int >= 1"),
        (["--labels", "3,x"], "argument --labels"),
        (["--labels", "10"], "argument --labels"),
        (["--karras"], "karras"),
    ]:
        done = _run(["generate", *JOB, *extra, "--out", str(tmp_path / "x")], check=False)
        assert done.returncode == 2 and match in done.stderr, (extra, done.stderr)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_pack_writes_what_the_evaluators_read(tmp_path, reference_set):
    npz = tmp_path / "set.npz"
    done = _run(["pack", str(reference_set), "--npz", str(npz)])
    assert "14 images (16, 16, 3)" in done.stdout
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (14, 16, 16, 3)
    assert labels.tolist() == [i % 10 for i in range(14)]
    for i in range(14):
        gray = generation.read_png(generation.image_path(reference_set, i))
        assert np.array_equal(images[i], np.repeat(gray[:, :, None], 3, axis=2))
    # an incomplete set is refused, naming what is missing
    generation.image_path(reference_set, 9).rename(tmp_path / "moved.png")
    try:
        done = _run(["pack", str(reference_set), "--npz", str(tmp_path / "b.npz")], check=False)
        assert done.returncode == 2 and "lacks 1 of its 14 images (the first: 9)" in done.stderr
    finally:
        (tmp_path / "moved.png").rename(generation.image_path(reference_set, 9))


def test_read_png_reads_every_row_filter(tmp_path):
    """Pillow's encoder picks a filter per row (Sub, Up, Average, Paeth): read_png undoes each."""
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (the test's PNG encoder)")
    import io

    rng = np.random.default_rng(0)
    for shape in ((9, 13), (7, 5, 3)):
        smooth = np.cumsum(rng.integers(0, 9, shape), axis=1).astype(np.uint8)  # invites Sub/Paeth filters
        buf = io.BytesIO()
        Image.fromarray(smooth).save(buf, format="PNG", optimize=True)
        path = tmp_path / f"pillow-{len(shape)}.png"
        path.write_bytes(buf.getvalue())
        assert np.array_equal(generation.read_png(path), smooth)


def test_blocks_are_dealt_round_robin_and_cover_every_index():
    for n, b, world in [(14, 4, 3), (1, 8, 2), (100, 7, 4)]:
        starts = sorted(s for r in range(world) for s in generation.owned_blocks(n, b, r, world))
        assert starts == list(range(0, n, b))
    assert generation.image_path("d", 123) == Path("d/000000/000123.png")
    assert generation.image_path("d", 1234567) == Path("d/001234/1234567.png")
