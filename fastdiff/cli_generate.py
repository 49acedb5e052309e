"""``fastdiff generate`` (many images for evaluation, on torch.distributed when run under torchrun) and
``fastdiff pack`` (the images of a generate DIR as one npz). See fastdiff.generation."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import generation
from .sampling.samplers import SAMPLERS

NUM_CLASSES = 10  # the shipped models' classes (digits 0-9); 10 is their null class


def add_parsers(sub, auto: str, backends: tuple[str, ...], dtypes: dict, cuda_graph: dict) -> tuple:
    g = sub.add_parser(
        "generate",
        help="generate N images of a shipped model into DIR, one PNG each, resumable; runs on every "
        "process of torchrun",
        description="Image i depends on (seed, i) alone, so the set is the same at any --batch-size and any number "
        "of processes (torchrun --nproc_per_node K [--nnodes ...] -m fastdiff generate ...). Running the "
        "same command again generates only the images still missing. The convolutions take the static "
        "rules (FASTDIFF_TUNE=0): every process makes the same choices.",
    )
    g.add_argument("--model", choices=("digits", "glyphs"), default="digits")
    g.add_argument("--num-images", type=int, required=True)
    g.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default 64)")
    g.add_argument("--out", required=True, help="the directory (made if absent; DIR/000000/000123.png)")
    g.add_argument(
        "--labels",
        default=None,
        help="comma-separated class labels, image i taking labels[i %% len] (default: balanced, i %% 10)",
    )
    g.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    g.add_argument("--karras", action="store_true")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 + w)")
    g.add_argument("--eta", type=float, default=0.0)
    g.add_argument("--schedule", default=None, help="noise schedule (default: the model's; glyphs: linear)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=tuple(dtypes), default="float32")
    g.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)")
    g.add_argument("--backend", choices=(auto, *backends), default=auto)
    g.add_argument("--cuda-graph", choices=tuple(cuda_graph), default="auto")
    p = sub.add_parser(
        "pack",
        help="write a generate DIR's images to one npz (uint8 NHWC arr_0, labels arr_1), "
        "as the ADM evaluator, torch-fidelity and clean-fid read it",
    )
    p.add_argument("dir")
    p.add_argument("--npz", required=True)
    return g, p


def _dist() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _labels(g: argparse.ArgumentParser, text: str | None) -> list[int]:
    if text is None:
        return list(range(NUM_CLASSES))
    try:
        labels = [int(v) for v in text.split(",")]
    except ValueError:
        g.error(f"argument --labels: comma-separated ints in [0, {NUM_CLASSES}), got {text!r}")
    bad = [v for v in labels if not 0 <= v < NUM_CLASSES]
    if not labels or bad:
        g.error(f"argument --labels: comma-separated ints in [0, {NUM_CLASSES}), got {text!r}")
    return labels


def generate_command(g: argparse.ArgumentParser, args: argparse.Namespace, dtypes: dict, cuda_graph: dict) -> int:
    import fastdiff

    from . import tuning
    from .cli import _check_device, _make_demo, _sample_options
    from .info import cpu_line

    rank, world, local_rank = _dist()
    # The static rules pick each convolution's implementation: measured choices depend on the process
    # (its threads, a busy moment) and would let image bits depend on which process sampled them.
    os.environ[tuning.TUNE_ENV] = "0"
    if args.num_images < 1:
        g.error(f"argument --num-images: must be an int >= 1, got {args.num_images}")
    if args.batch_size < 1:
        g.error(f"argument --batch-size: must be an int >= 1, got {args.batch_size}")
    if args.num_images > 2**32:
        g.error(f"argument --num-images: at most 2**32 (image indices are 32-bit), got {args.num_images}")
    if args.cfg is not None and not math.isfinite(args.cfg):
        g.error(f"argument --cfg: the guidance scale must be a finite number, got {args.cfg}")
    if not 0 <= args.seed < 2**63:
        g.error(f"argument --seed: must be an int in [0, 2**63), got {args.seed}")
    labels = _labels(g, args.labels)
    device = args.device
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
    why = _check_device(device)
    if why:
        g.error(why)
    demo = _make_demo(g, args.model, args.schedule)
    dtype = dtypes[args.dtype]
    if isinstance(demo.model, torch.nn.Module):
        demo.model.to(device=device, dtype=dtype)
    options = dict(
        _sample_options(args, demo, dtype, device), backend=args.backend, cuda_graph=cuda_graph[args.cuda_graph]
    )
    label_table = torch.tensor(labels, device=device)

    def block_call(first: int, batch: int) -> tuple[tuple[int, ...], dict]:
        """``fastdiff.sample``'s shape and keyword arguments for images first .. first + batch - 1."""
        y = label_table[torch.arange(first, first + batch, device=device) % len(labels)]
        kw = dict(options, cond={"y": y}, first_image=first)
        if args.cfg is not None:
            kw.update(cfg=args.cfg, uncond={"y": torch.full_like(y, NUM_CLASSES)})
        return (batch, *demo.image_shape), kw

    def sample_block(first: int, batch: int) -> torch.Tensor:
        shape, kw = block_call(first, batch)
        with torch.no_grad():
            return fastdiff.sample(demo.model, shape, **kw)

    try:  # every option checked by sample()'s own rules before anything is written
        from .sampling import SamplingConfig

        shape, kw = block_call(0, args.batch_size)
        SamplingConfig.build(demo.model, shape, **kw)
        demo.schedule.check_prediction(demo.prediction, demo.schedule.timesteps(args.steps))
    except (ValueError, TypeError) as exc:
        g.error(str(exc))
    manifest = {
        "format": generation.FORMAT,
        "model": args.model,
        "weights_sha256": generation.weights_hash(demo.model) if isinstance(demo.model, torch.nn.Module) else None,
        "image_shape": list(demo.image_shape),
        "num_images": args.num_images,
        "labels": labels,
        "seed": args.seed,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "eta": args.eta,
        "karras_sigmas": args.karras,
        "schedule": args.schedule or "the model's",
        "prediction": demo.prediction,
        "dtype": args.dtype,
        "device_type": torch.device(device).type,
        "backend": args.backend,
        "fastdiff": fastdiff.__version__,
        "torch": torch.__version__,
    }
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        total_missing = None
        if rank == 0:
            generation.prepare_dir(args.out, manifest, rank=0)
            # counted before the other ranks start writing
            total_missing = len(generation.missing_indices(args.out, range(args.num_images)))
        if world > 1:
            dist.barrier()  # rank 0 has written (or checked) the manifest; no collective after this until the end
        if rank != 0:
            generation.prepare_dir(args.out, manifest, rank=rank)
        if rank == 0:
            print(
                f"fastdiff generate: {args.model}, {args.num_images} images into {args.out} "
                f"({args.num_images - total_missing} there already), {world} process(es), batch {args.batch_size}, "
                f"{args.sampler} {args.steps} steps, cfg {args.cfg}; {cpu_line()}",
                flush=True,
            )
        start = time.perf_counter()
        totals = generation.generate_images(
            args.out,
            args.num_images,
            args.batch_size,
            sample_block,
            rank=rank,
            world=world,
            progress=generation.print_progress,
            total_missing=total_missing,
        )
        seconds = time.perf_counter() - start
        counts = torch.tensor([totals.written, totals.sample_seconds, totals.write_seconds], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)  # the end: every rank's totals
        if rank == 0:
            generation.finish_dir(args.out)
            written, sampling, writing = counts.tolist()
            per_image = (
                f"{1e3 * writing / written:.2f} ms/image writing vs {1e3 * sampling / written:.2f} sampling"
                if written
                else "nothing to write"
            )
            print(
                f"\nfastdiff generate: wrote {int(written)} images in {seconds:.1f} s "
                f"({written / seconds if seconds > 0 else 0:.1f} images/s over {world} process(es); {per_image})",
                flush=True,
            )
    except generation.GenerationError as exc:
        # Under torchrun this process's non-zero exit makes torchrun stop the others: the job ends with
        # this error, without waiting in a collective.
        print(f"fastdiff generate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def pack_command(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        n, shape = generation.pack(args.dir, args.npz, progress=generation.print_progress)
    except (generation.GenerationError, OSError, ValueError) as exc:
        print(f"fastdiff pack: error: {exc}", file=sys.stderr)
        return 2
    print(f"fastdiff pack: {n} images {shape} uint8 (arr_0) and their labels (arr_1) -> {args.npz}")
    return 0
