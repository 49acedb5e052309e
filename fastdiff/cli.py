"""The ``fastdiff`` command line: ``fastdiff sample`` and ``fastdiff info``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

_MODELS = ("glyphs",)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _grid(images: torch.Tensor, labels: torch.Tensor, per_row: int, zoom: int = 4) -> np.ndarray:
    """RGB grid: one row per class; the first cell (tinted) shows the class's clean glyph."""
    from .models import digit_glyphs

    glyphs = digit_glyphs()
    classes = sorted(set(labels.tolist()))
    cell, gap = 8 * zoom, 2
    h = len(classes) * (cell + gap) + gap
    w = (per_row + 1) * (cell + gap) + gap + gap
    canvas = np.full((h, w, 3), 40, dtype=np.uint8)

    def to_u8(img: torch.Tensor) -> np.ndarray:
        a = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return np.kron(a, np.ones((zoom, zoom), dtype=np.uint8))

    for r, c in enumerate(classes):
        y0 = gap + r * (cell + gap)
        label = to_u8(glyphs[c, 0])
        canvas[y0 : y0 + cell, gap : gap + cell] = np.stack([label // 3, label // 2, label], axis=-1)
        for j, img in enumerate(images[labels == c][:per_row]):
            x0 = 2 * gap + (j + 1) * (cell + gap)
            canvas[y0 : y0 + cell, x0 : x0 + cell] = to_u8(img[0])[..., None]
    return canvas


def _sample_command(args: argparse.Namespace) -> int:
    import fastdiff
    from fastdiff._png import write_png
    from fastdiff.models import digit_glyphs, glyph_mixture

    schedule = fastdiff.Schedule(args.schedule)
    model = glyph_mixture(schedule)
    n = 10 * args.per_class
    labels = torch.arange(10).repeat_interleave(args.per_class)
    kwargs = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, schedule=schedule,
                  generator=args.seed, dtype=_DTYPES[args.dtype], device=args.device)
    if args.cfg is not None:
        kwargs.update(cfg=args.cfg, cond={"y": labels}, uncond={"y": torch.full((n,), 10)})
    else:
        kwargs.update(cond={"y": labels})

    timings = {}
    backends = [args.backend, "reference"] if args.backend != "reference" else ["reference"]
    for backend in backends:  # warm up first, so neither timing pays one-time costs (loading _C)
        fastdiff.sample(model, (n, 1, 8, 8), backend=backend, **(kwargs | {"steps": 2}))
    for backend in backends:
        start = time.perf_counter()
        x = fastdiff.sample(model, (n, 1, 8, 8), backend=backend, progress=args.progress, **kwargs)
        if x.is_cuda:
            torch.cuda.synchronize()
        timings[backend] = (time.perf_counter() - start) / n
        if backend == args.backend:
            result = x
    write_png(args.out, _grid(result.cpu(), labels, args.per_class))

    flat = result.float().cpu().reshape(n, -1)
    nearest = torch.cdist(flat, digit_glyphs().reshape(10, -1)).argmin(1)
    accuracy = (nearest == labels).float().mean().item()
    cfg_text = f"cfg={args.cfg}" if args.cfg is not None else "no guidance"
    print(f"model {args.model}: {n} images, {args.sampler} {args.steps} steps, {cfg_text} -> {args.out}")
    print(f"images nearest to the requested digit: {accuracy:.1%}")
    for backend, seconds in timings.items():
        print(f"  backend {backend:<10} {seconds * 1e3:8.3f} ms/image")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["info"]:  # its own parser (fastdiff.info) takes the options
        from . import info

        return info.main(argv[1:])
    parser = argparse.ArgumentParser(prog="fastdiff", description="Fast diffusion sampling with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample a shipped model and write a labelled grid (one row per digit)")
    s.add_argument("--model", choices=_MODELS, default="glyphs",
                   help="glyphs: the exact denoiser of a 10-glyph Gaussian mixture (nothing trained)")
    s.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 + w)")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--schedule", default="linear")
    s.add_argument("--per-class", type=int, default=8, help="images per digit")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    s.add_argument("--device", default="cpu")
    s.add_argument("--backend", default="auto", help="auto, reference, cpu, cuda or triton")
    s.add_argument("--progress", action="store_true")
    s.add_argument("--out", default="samples.png")

    sub.add_parser("info", help="versions, what was built, every op x backend (--kernels, --json)")

    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be >= 1")
    try:
        return _sample_command(args)
    except (ValueError, TypeError) as exc:
        print(f"fastdiff sample: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
