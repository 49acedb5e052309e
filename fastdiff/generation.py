"""Many-image generation for evaluation (FID and the like): ``fastdiff generate`` and ``fastdiff pack``.

Image i of a job depends on (seed, i) alone: its x_T and step noise through ``fastdiff.sample``'s
``first_image`` (the per-image streams counted by the image's index in the set), its class label on
i (``labels[i % len(labels)]``). So the set of images is the same for any batch size and any number of
processes. The index space is cut into blocks of ``batch_size`` consecutive images; process ``rank`` of
``world`` takes blocks k with k % world == rank and samples each as one batch of the static shape
(the block past the last image padded, the padding dropped: one CUDA graph serves every batch).

One PNG per image, ``DIR/000000/000123.png`` (1000 per folder), written to a temporary name and
renamed, so a file that exists is complete. ``DIR/manifest.json``, written before any image, records
what the images depend on (the model and a hash of its weights, the sampling options, the seed, the
dtype, the labels, the fastdiff and torch versions); a run into a DIR with a manifest generates only
the images still missing, and refuses other options with an error naming each difference. Ranks
never wait on each other per batch: each writes its count to ``DIR/.progress/`` after every batch,
which rank 0 reads to show one progress line for the whole job.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._png import png_bytes

__all__ = [
    "GenerationError",
    "image_path",
    "owned_blocks",
    "missing_indices",
    "prepare_dir",
    "generate_images",
    "finish_dir",
    "pack",
    "read_png",
    "weights_hash",
    "MANIFEST",
    "FORMAT",
]

MANIFEST = "manifest.json"
FORMAT = "fastdiff-generate/1"
PER_FOLDER = 1000
_PROGRESS = ".progress"
_TMP_SUFFIX = ".tmp"


class GenerationError(RuntimeError):
    """A job that cannot run as asked (an unwritable DIR, a manifest of other options, ...): the message
    says what and how to go on."""


def image_path(out: str | Path, i: int) -> Path:
    """Where image ``i`` goes: ``out/{i // 1000:06d}/{i:06d}.png`` (wider names past a million)."""
    return Path(out) / f"{i // PER_FOLDER:06d}" / f"{i:06d}.png"


def owned_blocks(num_images: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The first index of each block of ``batch_size`` images that process ``rank`` of ``world`` samples."""
    blocks = (num_images + batch_size - 1) // batch_size
    return [k * batch_size for k in range(rank, blocks, world)]


def missing_indices(out: str | Path, indices: Iterable[int]) -> list[int]:
    """The indices among ``indices`` whose PNG is not in ``out`` yet (a file present is complete: they
    are renamed into place whole)."""
    return [i for i in indices if not image_path(out, i).exists()]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's state_dict (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes, tag: str) -> None:
    tmp = path.with_name(f"{path.name}.{tag}{_TMP_SUFFIX}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _manifest_differences(have: dict, want: dict) -> list[str]:
    keys = sorted(set(have) | set(want))
    return [
        f"{k}: {have.get(k, '(absent)')!r} in the directory, {want.get(k, '(absent)')!r} in this run"
        for k in keys
        if have.get(k) != want.get(k)
    ]


def prepare_dir(out: str | Path, manifest: dict, *, rank: int = 0) -> None:
    """Rank 0: make ``out`` (or check it), remove the temporary files of an interrupted run, write the
    manifest or check this run's against it. Other ranks: check the manifest rank 0 wrote (call after
    a barrier). Raises GenerationError naming the problem."""
    out = Path(out)
    path = out / MANIFEST
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test{_TMP_SUFFIX}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise GenerationError(f"argument --out: cannot write into {str(out)!r} ({exc.strerror or exc})") from exc
        for stale in out.rglob(f"*{_TMP_SUFFIX}"):  # an interrupted run's half-written files
            stale.unlink(missing_ok=True)
        (out / _PROGRESS).mkdir(exist_ok=True)
        for old in (out / _PROGRESS).iterdir():  # an earlier run's counts
            old.unlink(missing_ok=True)
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise GenerationError(f"{path} is not a readable manifest ({exc}); use another --out") from exc
        diffs = _manifest_differences(have, manifest)
        if diffs:
            listed = "\n  ".join(diffs)
            raise GenerationError(
                f"{str(out)!r} holds images generated with other options; use another --out, or "
                f"the same options:\n  {listed}"
            )
    elif rank == 0:
        _write_atomic(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), "rank0")
    else:
        raise GenerationError(f"{path} is missing: rank 0 writes it before the other ranks start")


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W) uint8 for one channel, (B, H, W, 3) for three."""
    a = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return a[:, 0].numpy() if a.shape[1] == 1 else a.permute(0, 2, 3, 1).numpy()


def _progress_file(out: Path, rank: int) -> Path:
    return out / _PROGRESS / f"rank{rank:05d}.json"


def _read_progress(out: Path) -> tuple[int, int]:
    """(images written, ranks done) over every rank's progress file."""
    written = done = 0
    for f in (out / _PROGRESS).glob("rank*.json"):
        try:
            p = json.loads(f.read_text())
        except (OSError, ValueError):  # being replaced this instant: counted next time
            continue
        written += int(p.get("written", 0))
        done += bool(p.get("done"))
    return written, done


@dataclass
class Totals:
    written: int
    sample_seconds: float
    write_seconds: float


def generate_images(
    out: str | Path,
    num_images: int,
    batch_size: int,
    sample_block: Callable[[int, int], torch.Tensor],
    *,
    rank: int = 0,
    world: int = 1,
    progress: Callable[[str], None] | None = None,
    total_missing: int | None = None,
) -> Totals:
    """Sample and write this rank's missing images. ``sample_block(first, batch_size)`` returns the
    images first .. first + batch_size - 1 (B, C, H, W) in [-1, 1]; only the missing ones of this rank's
    blocks below ``num_images`` are written. Rank 0 reports through ``progress`` after each of its
    batches, and then until every rank is done, from the ranks' progress files."""
    out = Path(out)
    todo = []
    for first in owned_blocks(num_images, batch_size, rank, world):
        wanted = missing_indices(out, range(first, min(first + batch_size, num_images)))
        if wanted:
            todo.append((first, wanted))
    totals = Totals(0, 0.0, 0.0)
    start = time.perf_counter()
    pfile = _progress_file(out, rank)

    def report(done: bool) -> None:
        _write_atomic(pfile, json.dumps({"written": totals.written, "done": done}).encode(), f"rank{rank}")
        if progress is not None and rank == 0:
            written, finished = _read_progress(out)
            elapsed = time.perf_counter() - start
            rate = written / elapsed if elapsed > 0 else 0.0
            target = total_missing if total_missing is not None else written
            eta = (target - written) / rate if rate > 0 else float("nan")
            progress(f"{written}/{target} images, {rate:.1f} images/s, ETA {eta:.0f} s ({finished}/{world} ranks done)")

    for first, wanted in todo:
        t0 = time.perf_counter()
        images = _to_uint8(sample_block(first, batch_size))
        t1 = time.perf_counter()
        for i in wanted:
            path = image_path(out, i)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(path, png_bytes(images[i - first]), f"rank{rank}")
            except OSError as exc:
                raise GenerationError(
                    f"rank {rank}: cannot write {path} ({exc.strerror or exc}); the images written "
                    "so far are kept: run the same command again to go on"
                ) from exc
        totals.sample_seconds += t1 - t0
        totals.write_seconds += time.perf_counter() - t1
        totals.written += len(wanted)
        report(False)
    report(True)
    if rank == 0 and progress is not None and world > 1:  # the other ranks' progress until they finish
        while _read_progress(out)[1] < world:
            time.sleep(0.5)
            report(True)
    return totals


# ---- PNG -------------------------------------------------------------------------------------------------


def read_png(path: str | Path) -> np.ndarray:
    """An 8-bit grayscale or RGB PNG without interlacing (what fastdiff writes, any row filter) as uint8
    (H, W) or (H, W, 3)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError(f"{path}: no IHDR chunk")
    w, h, depth, color, _, _, interlace = header
    if depth != 8 or color not in (0, 2) or interlace:
        raise ValueError(
            f"{path}: only 8-bit grayscale or RGB PNGs without interlacing are read (got depth {depth}, "
            f"color type {color}, interlace {interlace})"
        )
    channels = 1 if color == 0 else 3
    stride = w * channels
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, stride + 1)
    rows = np.zeros((h, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for r in range(h):
        kind, line = raw[r, 0], raw[r, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 0xFF
        else:  # Sub, Average, Paeth: left to right
            cur = np.zeros(stride, dtype=np.int32)
            for x in range(stride):
                left = cur[x - channels] if x >= channels else 0
                up, up_left = prev[x], prev[x - channels] if x >= channels else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up) // 2
                elif kind == 4:
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                else:
                    raise ValueError(f"{path}: unknown PNG row filter {kind}")
                cur[x] = (line[x] + pred) & 0xFF
        rows[r] = cur
        prev = cur
    image = rows.astype(np.uint8)
    return image if channels == 1 else image.reshape(h, w, 3)


# ---- pack --------------------------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def pack(
    out: str | Path,
    npz: str | Path,
    *,
    labels: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[int, tuple[int, ...]]:
    """Write the images of a generation DIR to ``npz`` as the ADM evaluator, torch-fidelity and clean-fid
    read them: ``arr_0`` uint8 (N, H, W, 3) (grayscale repeated to three channels), ``arr_1`` the int64
    labels, streamed into the zip one image at a time. Every index below the manifest's ``num_images``
    must be there. Returns (N, the image shape)."""
    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise GenerationError(
            f"{str(out)!r} has no readable {MANIFEST} (is it a fastdiff generate --out?): {exc}"
        ) from exc
    n = int(manifest["num_images"])
    absent = missing_indices(out, range(n))
    if absent:
        raise GenerationError(
            f"{str(out)!r} lacks {len(absent)} of its {n} images (the first: {absent[0]}); run the "
            "same fastdiff generate command again to finish it"
        )
    first = read_png(image_path(out, 0))
    h, w = first.shape[:2]
    label_list = manifest["labels"]
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((n, h, w, 3), np.uint8))
            for i in range(n):
                img = first if i == 0 else read_png(image_path(out, i))
                if img.shape[:2] != (h, w):
                    raise GenerationError(f"{image_path(out, i)} is {img.shape[:2]}, image 0 is {(h, w)}")
                if img.ndim == 2:
                    img = np.repeat(img[:, :, None], 3, axis=2)
                f.write(np.ascontiguousarray(img).tobytes())
                if progress is not None and (i + 1) % 1000 == 0:
                    progress(f"packed {i + 1}/{n} images")
        label_arr = np.array([label_list[i % len(label_list)] for i in range(n)], dtype=np.int64)
        with zf.open("arr_1.npy", "w") as f:
            f.write(_npy_header((n,), np.int64))
            f.write(label_arr.tobytes())
    return n, (h, w, 3)


def finish_dir(out: str | Path) -> None:
    """Rank 0, after every rank is done: remove the progress files (the DIR then holds the manifest and
    the images only)."""
    progress = Path(out) / _PROGRESS
    for f in progress.glob("*"):
        f.unlink(missing_ok=True)
    try:
        progress.rmdir()
    except OSError:
        pass


def print_progress(line: str) -> None:
    print(f"\r{line}", end="", file=sys.stderr, flush=True)
