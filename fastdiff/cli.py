"""The ``fastdiff`` command line: ``fastdiff sample``, ``fastdiff tune``, ``fastdiff info``, and
``fastdiff generate`` / ``fastdiff pack`` (fastdiff.cli_generate)."""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import torch

from . import tuning
from .sampling.samplers import SAMPLERS

_MODELS = ("digits", "glyphs")
_TUNABLE_MODELS = ("digits",)  # the models with measured choices (fastdiff tune)
_CUDA_GRAPH = {"auto": "auto", "on": True, "off": False}
_MEMORY_FORMATS = tuning.MEMORY_FORMATS  # name -> torch.memory_format (what --memory-format names)
_MEMORY_FORMAT_NAMES = {"channels_last": "channels_last", "contiguous": "NCHW"}
_SOURCES = {"measured": "measured now", "cache": "from the cache", "static": "the static rule"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _grid(images: torch.Tensor, labels: torch.Tensor, per_row: int, cell: int = 32) -> np.ndarray:
    """RGB grid: one row per class; the first cell (tinted) shows the class's glyph. Images are
    (N, 1, S, S) in [-1, 1] with S dividing ``cell``, enlarged by pixel repetition."""
    from .models import digit_glyphs

    glyphs = digit_glyphs()
    classes = sorted(set(labels.tolist()))
    gap = 2
    h = len(classes) * (cell + gap) + gap
    w = (per_row + 1) * (cell + gap) + gap + gap
    canvas = np.full((h, w, 3), 40, dtype=np.uint8)

    def to_u8(img: torch.Tensor) -> np.ndarray:
        a = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        zoom = cell // a.shape[0]
        return np.kron(a, np.ones((zoom, zoom), dtype=np.uint8))

    for r, c in enumerate(classes):
        y0 = gap + r * (cell + gap)
        label = to_u8(glyphs[c, 0])
        canvas[y0 : y0 + cell, gap : gap + cell] = np.stack([label // 3, label // 2, label], axis=-1)
        for j, img in enumerate(images[labels == c][:per_row]):
            x0 = 2 * gap + (j + 1) * (cell + gap)
            canvas[y0 : y0 + cell, x0 : x0 + cell] = to_u8(img[0])[..., None]
    return canvas


class _Demo:
    """A shipped model, its sampling settings, how to switch its layers' backend, and how to score
    its samples against the requested digits."""

    def __init__(self, name: str, schedule: str | None) -> None:
        import fastdiff

        self.name = name
        if name == "glyphs":
            from .models import glyph_mixture

            self.schedule = fastdiff.Schedule(schedule or "linear")
            self.model = glyph_mixture(self.schedule)
            self.prediction = "eps"
            self.image_shape = (1, 8, 8)
        else:
            from .models import digits_unet
            from .models.digits import digits_sampling

            self.model = digits_unet()
            trained = digits_sampling(self.model)
            self.schedule = fastdiff.Schedule(schedule) if schedule else trained["schedule"]
            self.prediction = trained["prediction"]
            self.image_shape = (1, 16, 16)

    def set_backend(self, backend: str, memory_format: torch.memory_format) -> None:
        """The model's own layers follow the sampling backend where they can: the reference run is
        the reference end to end (plain PyTorch, NCHW); every fused backend runs the layers on auto,
        in ``memory_format``."""
        if hasattr(self.model, "set_backend"):
            self.model.set_backend("reference" if backend == "reference" else "auto")
            fmt = torch.contiguous_format if backend == "reference" else memory_format
            self.model.to(memory_format=fmt)

    def model_inputs(self, batch: int, dtype: torch.dtype, device: str) -> tuple[tuple, dict]:
        """The arguments of one model call at model batch ``batch`` (guidance's [uncond; cond] included),
        shaped as the sampler passes them: images, timesteps, class labels (the null class among them)."""
        x = torch.randn((batch, *self.image_shape), generator=torch.Generator().manual_seed(0))
        t = torch.full((batch,), self.schedule.num_train_timesteps // 2, dtype=torch.int64, device=device)
        y = torch.arange(batch, device=device) % 11  # the ten digits and the null class
        return (x.to(device=device, dtype=dtype), t), {"y": y}

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> str:
        if self.name == "glyphs":
            from .models import digit_glyphs

            flat = images.float().reshape(len(images), -1)
            nearest = torch.cdist(flat, digit_glyphs().reshape(10, -1)).argmin(1)
            return f"images nearest to the requested digit: {(nearest == labels).float().mean().item():.1%}"
        try:
            from sklearn.datasets import load_digits
            from sklearn.svm import SVC
        except ImportError:
            return "scoring the samples needs scikit-learn (pip install scikit-learn)"
        from .models.digits import images_to_digits

        digits = load_digits()
        judge = SVC(gamma=0.001, C=10.0, random_state=0).fit(digits.data, digits.target)
        predicted = torch.from_numpy(judge.predict(images_to_digits(images).reshape(len(images), 64).numpy()))
        accuracy = (predicted == labels).float().mean().item()
        return f"an SVC trained on sklearn's digits reads the requested digit in {accuracy:.1%}"


def _check_device(device: str) -> str | None:
    """Why ``--device`` cannot run the sampling, or None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"argument --device: {device!r} is not a device (accepted: cpu, cuda, cuda:N)"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"argument --device: {device!r} is a {dev.type} device; accepted: cpu, cuda, cuda:N"
    if not torch.cuda.is_available():
        return f"argument --device: {device!r} needs a CUDA GPU, and none is available (torch.cuda.is_available())"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"argument --device: {device!r} names GPU {dev.index}, but only {torch.cuda.device_count()} are visible"
    return None


def _check_out(path: str) -> str | None:
    """Why the grid cannot be written to ``--out``, or None: checked before sampling (an unwritable
    path used to fail only after every sampling and timing round). Opening the file is the only test
    every file system and user answers truthfully; a file made by the test is removed again."""
    if os.path.isdir(path):
        example = os.path.join(path, "samples.png")
        return f"argument --out: {path!r} is a directory; give a file name such as {example!r}"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"argument --out: the directory {parent!r} of {path!r} does not exist"
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return f"argument --out: cannot write {path!r} ({exc.strerror or exc})"
    if not existed:
        os.remove(path)
    return None


def _make_demo(parser: argparse.ArgumentParser, model: str, schedule: str | None) -> _Demo:
    """The shipped model and its settings, ``--schedule`` checked first (a bad one exits with status 2)."""
    import fastdiff

    if schedule is not None:
        try:
            fastdiff.Schedule(schedule)
        except ValueError as exc:
            parser.error(f"argument --schedule: {exc}")
    return _Demo(model, schedule)


def _check_args(s: argparse.ArgumentParser, args: argparse.Namespace) -> _Demo:
    """Every check of ``fastdiff sample``'s arguments, before anything is sampled: a bad argument
    exits with status 2 and ``fastdiff sample: error: ...`` (argparse's form), never a traceback
    after minutes of sampling. Returns the demo (model and schedule) the arguments describe."""
    from fastdiff.backends import BackendUnavailableError, select_backend

    if args.per_class < 1:
        s.error("--per-class must be >= 1")
    if args.rounds < 1:
        s.error("--rounds must be >= 1")
    if args.cfg is not None and not math.isfinite(args.cfg):
        s.error(f"argument --cfg: the guidance scale must be a finite number, got {args.cfg}")
    if not 0.0 <= args.eta <= 1.0:  # also refuses nan
        s.error(f"argument --eta: must be a number in [0, 1], got {args.eta}")
    if args.sampler != "ddim" and args.eta != 0:
        s.error(f"argument --eta: eta applies to --sampler ddim only; {args.sampler}'s noise is its own")
    if not 0 <= args.seed < 2**63:
        s.error(f"argument --seed: must be an int in [0, 2**63), got {args.seed}")
    try:  # read by --memory-format auto and the convolutions' auto
        tuning.enabled()
    except ValueError as exc:
        s.error(str(exc))
    if args.cuda_graph == "on" and not args.device.startswith("cuda"):
        s.error(
            f"argument --cuda-graph: 'on' needs a CUDA --device (the loop runs on {args.device!r}); use auto or off"
        )
    why = _check_device(args.device)
    if why:
        s.error(why)
    probe = torch.empty((1, 1, 1, 1), dtype=_DTYPES[args.dtype], device=args.device)
    try:  # the fused step's backend; the model's layers run on auto (see _Demo.set_backend)
        select_backend("sampler_step", args.backend, {"x": probe})
    except (BackendUnavailableError, ValueError) as exc:
        s.error(f"argument --backend: {exc}")
    why = _check_out(args.out)
    if why:
        s.error(why)
    demo = _make_demo(s, args.model, args.schedule)
    try:
        timesteps = demo.schedule.timesteps(args.steps)
        demo.schedule.check_prediction(demo.prediction, timesteps)
    except ValueError as exc:
        s.error(f"argument --steps: {exc}")
    if args.karras:  # the sampler's own refusals (which samplers take Karras sigmas, and on which schedules)
        from fastdiff.sampling import make_sampler

        try:
            make_sampler(args.sampler, demo.schedule, args.steps, prediction=demo.prediction, karras_sigmas=True)
        except ValueError as exc:
            s.error(f"argument --karras: {exc}")
    return demo


def _times_text(decision: dict) -> str:
    """A memory-format decision's medians, e.g. "channels_last 95.1 ms, NCHW 120.3 ms per forward"."""
    times = [
        f"{_MEMORY_FORMAT_NAMES[name]} {decision[f'{name}_us'] / 1e3:.1f} ms"
        for name in _MEMORY_FORMATS
        if isinstance(decision.get(f"{name}_us"), (int, float))
    ]
    return f"{', '.join(times)} per forward" if times else "no times recorded"


def _choose_memory_format(args: argparse.Namespace, demo: _Demo, batch: int) -> str:
    """``--memory-format``: the name given, or for auto the measured (or cached) choice at the model
    batch ``batch`` (fastdiff.tuning.choose_memory_format), printed with how it was made."""
    if args.memory_format != "auto":
        return args.memory_format
    if args.compile:
        print("memory format: channels_last (the static rule: with --compile, measuring would compile the model twice)")
        return tuning.STATIC_MEMORY_FORMAT
    dtype = _DTYPES[args.dtype]
    signature = tuning.memory_format_signature(args.model, batch, dtype, args.device)
    demo.set_backend("auto", torch.channels_last)
    inputs, kwargs = demo.model_inputs(batch, dtype, args.device)

    def progress(_: str) -> None:
        print(
            f"memory format: timing the model's forward at batch {batch} in channels_last and NCHW "
            "(once on this machine; then cached)...",
            flush=True,
        )

    decision = tuning.choose_memory_format(demo.model, signature, inputs, kwargs, progress=progress)
    choice = decision["choice"]
    if decision["source"] == "static":
        how = f"{tuning.TUNE_ENV}=0: the static rule"
    else:
        verb = "measured" if decision["source"] == "measured" else f"cached in {tuning.cache_path()}"
        busy = decision.get("busy")
        busy = f", busy {busy:.0%}" if isinstance(busy, (int, float)) else ""
        how = (
            f"{verb}: {_times_text(decision)}, medians of {decision.get('rounds', '?')} alternating rounds{busy}; "
            f"NCHW must win by {tuning.TUNE_MARGIN:.0%}"
        )
    print(f"memory format: {_MEMORY_FORMAT_NAMES[choice]} at batch {batch} ({how})")
    return choice


def _tune_batches(t: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[int, str]]:
    """The model batches ``fastdiff tune`` prepares, with what each is for: those ``fastdiff sample``
    runs with the same --per-class (and --cfg; without it, both the unguided and the guided batch),
    or --batch-size's. Bad values exit with status 2 and ``fastdiff tune: error: ...``."""
    if args.batch_size is not None:
        if args.per_class is not None or args.cfg is not None:
            t.error(
                "argument --batch-size: gives the model batches directly; leave out --per-class and --cfg "
                "(which derive them as fastdiff sample does)"
            )
        bad = [b for b in args.batch_size if b < 1]
        if bad:
            t.error(f"argument --batch-size: each batch must be an int >= 1, got {bad[0]}")
        return [(b, "--batch-size") for b in dict.fromkeys(args.batch_size)]
    per_class = 8 if args.per_class is None else args.per_class
    if per_class < 1:
        t.error(f"argument --per-class: must be an int >= 1 (images per digit, as in fastdiff sample), got {per_class}")
    if args.cfg is not None and not math.isfinite(args.cfg):
        t.error(f"argument --cfg: the guidance scale must be a finite number, got {args.cfg}")
    n = 10 * per_class
    unguided = (n, f"fastdiff sample --per-class {per_class}")
    guided = (2 * n, f"fastdiff sample --per-class {per_class} --cfg S (guidance doubles the batch)")
    if args.cfg is None:
        return [unguided, guided]
    return [guided] if args.cfg != 1 else [unguided]


def _tune_command(t: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``fastdiff tune``: make every measured choice ``fastdiff sample --model MODEL`` makes (each
    convolution's implementation, the model's memory format) at its batches now, and keep them in the
    cache file, so the sampling runs start tuned; a second run finds them there and measures nothing."""
    from fastdiff.info import cpu_line
    from fastdiff.nn.conv import clear_tuning, pointwise_decisions, tuning_decisions

    if args.model not in _TUNABLE_MODELS:
        why = (
            "has nothing to tune (the exact denoiser of a Gaussian mixture: no convolutions, no memory format)"
            if args.model in _MODELS
            else "is not a shipped model"
        )
        t.error(f"argument --model: {args.model!r} {why}; accepted: {', '.join(_TUNABLE_MODELS)}")
    batches = _tune_batches(t, args)
    try:
        on = tuning.enabled()
    except ValueError as exc:
        t.error(str(exc))
    if not on:
        t.error(
            f"{tuning.TUNE_ENV}=0 turns measuring off (the static rules decide, and the cache file is not "
            f"used); unset it or set {tuning.TUNE_ENV}=1 to tune"
        )
    print(f"machine: {cpu_line()}")
    print(f"cache:   {tuning.cache_path()} (entries of this machine: CPU, ISA, threads, torch and fastdiff versions)")
    if args.again and tuning.forget():
        print("--again: this machine's cached choices are forgotten; measuring them afresh")
    clear_tuning()  # this process's choices: everything below comes from the file or is measured now
    demo = _Demo(args.model, None)
    demo.model.to(device="cpu", dtype=torch.float32)
    demo.set_backend("auto", torch.channels_last)
    formats = []
    with torch.no_grad():
        for batch, purpose in batches:
            print(f"batch {batch} ({purpose}):", flush=True)
            inputs, kwargs = demo.model_inputs(batch, torch.float32, "cpu")
            for name, fmt in _MEMORY_FORMATS.items():
                before = len(tuning_decisions())
                start = time.perf_counter()
                demo.model.to(memory_format=fmt)
                demo.model(*inputs, **kwargs)  # each convolution's first call: measured, or read from the cache
                new = tuning_decisions()[before:]
                measured = sum(d["source"] == "measured" for d in new)
                shapes = (
                    f"{len(new)} new convolution shapes, {measured} measured now, {len(new) - measured} from the cache"
                    if new
                    else "no new convolution shapes (as above)"
                )
                print(
                    f"  a forward in {_MEMORY_FORMAT_NAMES[name]}: {shapes} ({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
            demo.model.to(memory_format=torch.channels_last)
            signature = tuning.memory_format_signature(args.model, batch, torch.float32, "cpu")
            start = time.perf_counter()

            def progress(_: str) -> None:
                print(
                    f"  memory format: timing forwards in channels_last and NCHW (up to "
                    f"{tuning.MEMORY_FORMAT_MAX_REPEATS} alternating rounds)...",
                    flush=True,
                )

            decision = tuning.choose_memory_format(demo.model, signature, inputs, kwargs, progress=progress)
            formats.append((signature, decision))
            print(
                f"  memory format: {_MEMORY_FORMAT_NAMES[decision['choice']]} ({_SOURCES[decision['source']]}, "
                f"{time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    conv = tuning_decisions()
    rows = [(tuning.describe("conv3x3", d["signature"], d), d["source"]) for d in conv]
    rows += [(tuning.describe("conv1x1", d["signature"], d), d["source"]) for d in pointwise_decisions()]
    rows += [(tuning.describe(tuning.MEMORY_FORMAT_KIND, sig, d), d["source"]) for sig, d in formats]
    print(f"decisions ({len(rows)}; a candidate replaces the default only when faster by {tuning.TUNE_MARGIN:.0%}):")
    print(_decision_lines(rows))
    if not conv:
        from fastdiff import _native

        status = _native.status()
        why = "fastdiff._C is not loaded" if not status["built"] else "no convolution could run fastdiff's kernel"
        print(f"  (no conv3x3 choices: {why}; the module's own convolution runs them)")
    measured = sum(source == "measured" for _, source in rows)
    if measured:
        print(
            f"measured {measured} choices now, {len(rows) - measured} were cached; written to "
            f"{tuning.cache_path()} (timings taken while other work loads the machine can mislead: "
            "fastdiff tune --again re-measures)"
        )
    else:
        print(
            f"all {len(rows)} choices were in the cache {tuning.cache_path()}: nothing measured again "
            "(fastdiff tune --again measures afresh)"
        )
    return 0


def _decision_lines(rows: list[tuple[dict, str]]) -> str:
    """One line per decision (fastdiff.tuning.format_choice) and where it came from."""
    width = max((len(d["description"]) for d, _ in rows), default=0)
    return "\n".join(f"  {tuning.format_choice(d, width)}; {_SOURCES[source]}" for d, source in rows)


def _sample_options(args: argparse.Namespace, demo: _Demo, dtype: torch.dtype, device: str) -> dict:
    """fastdiff.sample's options that `fastdiff sample` and `fastdiff generate` both take from their flags."""
    return dict(
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        karras_sigmas=args.karras,
        schedule=demo.schedule,
        prediction=demo.prediction,
        generator=args.seed,
        dtype=dtype,
        device=device,
    )


def _sample_command(args: argparse.Namespace, demo: _Demo) -> int:
    import fastdiff
    from fastdiff._png import write_png

    n = 10 * args.per_class
    shape = (n, *demo.image_shape)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    kwargs = _sample_options(args, demo, _DTYPES[args.dtype], args.device)
    if args.cfg is not None:
        kwargs.update(cfg=args.cfg, cond={"y": labels}, uncond={"y": torch.full((n,), 10)})
    else:
        kwargs.update(cond={"y": labels})
    if isinstance(demo.model, torch.nn.Module):
        demo.model.to(device=args.device, dtype=_DTYPES[args.dtype])

    cfg_text = f"cfg={args.cfg}" if args.cfg is not None else "no guidance"
    print(f"model {args.model}: {n} images, {args.sampler} {args.steps} steps, {cfg_text} -> {args.out}")
    backends = [args.backend, "reference"] if args.backend != "reference" else ["reference"]
    format_name = args.memory_format
    if hasattr(demo.model, "set_backend") and args.backend != "reference":
        batch = 2 * n if args.cfg is not None and args.cfg != 1 else n  # guidance: the model sees [uncond; cond]
        format_name = _choose_memory_format(args, demo, batch)
    memory_format = _MEMORY_FORMATS.get(format_name, torch.channels_last)
    models = {}  # what each backend samples: the demo's model, or (--compile) a compiled copy
    for backend in backends:
        demo.set_backend(backend, memory_format)
        compiled = args.compile and backend != "reference"
        models[backend] = torch.compile(copy.deepcopy(demo.model)) if compiled else demo.model
    # The reference backend cannot be captured (it reads the step on the host): it runs eagerly.
    graphs = {backend: (_CUDA_GRAPH[args.cuda_graph] if backend != "reference" else False) for backend in backends}
    compile_seconds = None
    with torch.no_grad():
        for backend in backends:  # warm up first, so neither timing pays one-time costs (loading _C, compiling)
            demo.set_backend(backend, memory_format)
            if models[backend] is not demo.model:
                # Eager steps first: they measure the convolutions' choices, which the compiled
                # model then reads (a trace cannot time anything).
                fastdiff.sample(demo.model, shape, backend=backend, cuda_graph=False, **(kwargs | {"steps": 2}))
            start = time.perf_counter()
            # A CUDA graph is captured per loop signature: on CUDA the warm-up runs the timed loop itself.
            warm = {} if graphs[backend] is not False and args.device.startswith("cuda") else {"steps": 2}
            fastdiff.sample(models[backend], shape, backend=backend, cuda_graph=graphs[backend], **(kwargs | warm))
            if models[backend] is not demo.model:
                compile_seconds = time.perf_counter() - start
        # The timed runs take turns, one per backend in each round, and each backend's time is its
        # median over the rounds: a shared machine's speed drifts by tens of percent from one
        # moment to the next, and alternating lets a slow spell fall on every backend alike.
        rounds = {backend: [] for backend in backends}
        busy_from = tuning.busy_mark()
        for r in range(args.rounds):
            for backend in backends:
                demo.set_backend(backend, memory_format)
                start = time.perf_counter()
                x = fastdiff.sample(
                    models[backend],
                    shape,
                    backend=backend,
                    cuda_graph=graphs[backend],
                    progress=args.progress and r == 0,
                    **kwargs,
                )
                if x.is_cuda:
                    torch.cuda.synchronize()
                rounds[backend].append((time.perf_counter() - start) / n)
                if backend == args.backend and r == 0:
                    result = x
            if args.rounds > 1:
                line = ", ".join(f"{backend} {rounds[backend][-1] * 1e3:.1f}" for backend in backends)
                print(f"round {r + 1}/{args.rounds}: {line} ms/image", flush=True)
        timings = {backend: float(np.median(times)) for backend, times in rounds.items()}
        busy = tuning.busy_share(busy_from)
    result = result.float().cpu()
    try:  # checked before sampling; this catches a path that went away meanwhile
        write_png(args.out, _grid(result, labels, args.per_class))
    except OSError as exc:
        print(
            f"fastdiff sample: error: argument --out: cannot write {args.out!r} ({exc.strerror or exc})",
            file=sys.stderr,
        )
        return 2

    print(demo.score(result, labels))
    from fastdiff.info import cpu_line

    print(f"  machine: {cpu_line()}, torch {torch.__version__}")  # kernels rank differently on other CPUs
    for backend, seconds in timings.items():
        how = []
        if hasattr(demo.model, "set_backend"):  # the U-Net: set_backend also set its layout
            how.append("NCHW" if backend == "reference" else _MEMORY_FORMAT_NAMES[format_name])
        if models[backend] is not demo.model:
            how.append("torch.compile")
        detail = f" ({', '.join(how)})" if how else ""
        print(f"  backend {backend:<10} {seconds * 1e3:8.3f} ms/image{detail}")
    from fastdiff.nn.conv import pointwise_decisions, tuning_decisions

    decisions = tuning_decisions()
    if decisions:
        fused = sum(d["fastdiff"] for d in decisions)
        paths = [d.get("path") for d in decisions if d["fastdiff"] and d.get("path") in ("fused", "blas")]
        by_path = f" (fused path {paths.count('fused')}, BLAS path {paths.count('blas')})" if paths else ""
        print(
            f"  conv3x3, measured on this machine: fastdiff's kernel for {fused} of {len(decisions)} convolution "
            f"shapes{by_path}, oneDNN for {len(decisions) - fused} ({tuning.TUNE_ENV}=0 uses the static rule)"
        )
    pointwise = pointwise_decisions()
    if pointwise:
        linear = sum(d["choice"] == "linear" for d in pointwise)
        print(
            f"  conv1x1, measured on this machine: F.linear for {linear} of {len(pointwise)} shapes, oneDNN for "
            f"{len(pointwise) - linear}"
        )
    if compile_seconds is not None:
        print(f"  torch.compile: {compile_seconds:.1f} s in the untimed warm-up (not in the ms/image)")
    if len(timings) == 2:
        how = f"medians of {args.rounds} alternating rounds" if args.rounds > 1 else "one round"
        ratio = timings["reference"] / timings[args.backend]
        print(f"  speed-up of {args.backend} over the reference: {ratio:.2f}x ({how})")
    if busy is not None:
        # Other processes on the cores slow multi-threaded kernels by up to the scheduler's time slice
        # per call (tens of times over on this project's 2-core machine): say so with the numbers.
        print(
            f"  the timed runs waited for a CPU {busy:.0%} of the time"
            + (
                " (busy machine: these timings are not the kernels' own; rerun on a quiet machine)"
                if busy > tuning.BUSY_LIMIT
                else ""
            )
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    from .backends import AUTO, BACKENDS

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["info"]:  # its own parser (fastdiff.info) takes the options
        from . import info

        return info.main(argv[1:])
    parser = argparse.ArgumentParser(prog="fastdiff", description="Fast diffusion sampling with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample a shipped model and write a labelled grid (one row per digit)")
    s.add_argument(
        "--model",
        choices=_MODELS,
        default="digits",
        help="digits: the shipped class-conditional U-Net trained on sklearn's handwritten digits; "
        "glyphs: the exact denoiser of a 10-glyph Gaussian mixture (nothing trained)",
    )
    s.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ddim",
        help="ddim, ddpm, euler, euler_a, dpmpp_2m or dpmpp_2m_sde (diffusers' DDIM/DDPM/"
        "EulerDiscrete/EulerAncestralDiscrete/DPMSolverMultistep schedulers, the last with "
        "dpmsolver++ or sde-dpmsolver++; default ddim)",
    )
    s.add_argument(
        "--karras",
        action="store_true",
        help="with euler, dpmpp_2m or dpmpp_2m_sde: Karras sigmas (diffusers' use_karras_sigmas=True)",
    )
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 + w)")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--schedule", default=None, help="noise schedule (default: the model's; glyphs: linear)")
    s.add_argument("--per-class", type=int, default=8, help="images per digit")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    s.add_argument("--device", default="cpu")
    s.add_argument(
        "--backend",
        choices=(AUTO, *BACKENDS),
        default=AUTO,
        help="the sampler step's backend; the model's layers run on auto (reference: all reference)",
    )
    s.add_argument(
        "--memory-format",
        choices=("auto", *_MEMORY_FORMATS),
        default="auto",
        help="layout of the U-Net's activations on the fused backends (the reference run is NCHW): "
        "auto times a forward in each at the run's batch once per machine (cached; channels_last "
        f"unless NCHW wins by {tuning.TUNE_MARGIN:.0%}; {tuning.TUNE_ENV}=0: channels_last)",
    )
    s.add_argument(
        "--compile",
        action="store_true",
        help="run the fused backend's model under torch.compile (compiled in the untimed warm-up)",
    )
    s.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed rounds; each samples the images once per backend, the backends taking turns, "
        "and the reported ms/image is each backend's median (the grid is the first round's)",
    )
    s.add_argument(
        "--cuda-graph",
        choices=tuple(_CUDA_GRAPH),
        default="auto",
        help="on a CUDA device, replay the sampling loop from a CUDA graph: auto (when it can be "
        "captured), on (raise when it cannot), off",
    )
    s.add_argument("--progress", action="store_true", help="a progress bar for the first timed round")
    s.add_argument("--out", default="samples.png")

    t = sub.add_parser(
        "tune",
        help="measure every choice fastdiff sample makes (convolutions, memory format) "
        "now and cache it for this machine",
        description="Fill the tuning cache ahead of time for a shipped model at the batches fastdiff "
        "sample uses: each 3x3 convolution's implementation (fastdiff's kernel or "
        "oneDNN) and the model's memory format. A second run reuses the cache.",
    )
    t.add_argument("--model", default="digits", help=f"the shipped model to tune: {', '.join(_TUNABLE_MODELS)}")
    t.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="images per digit, as fastdiff sample's (default 8): the model batch is 10 * this",
    )
    t.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="the guidance scale sample will use (not 1: the batch doubles); default: tune both the "
        "unguided and the guided batch",
    )
    t.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="model batches to tune instead (as the model sees them; guidance doubles sample's)",
    )
    t.add_argument("--again", action="store_true", help="forget this machine's cached choices and measure afresh")

    sub.add_parser(
        "info", help="versions, what was built, every op x backend, the cached tuning decisions (--kernels, --json)"
    )
    from . import cli_generate

    g, p = cli_generate.add_parsers(sub, AUTO, BACKENDS, _DTYPES, _CUDA_GRAPH)

    args = parser.parse_args(argv)
    if args.command == "tune":
        return _tune_command(t, args)
    if args.command == "generate":
        return cli_generate.generate_command(g, args, _DTYPES, _CUDA_GRAPH)
    if args.command == "pack":
        return cli_generate.pack_command(p, args)
    demo = _check_args(s, args)
    try:
        return _sample_command(args, demo)
    except (ValueError, TypeError) as exc:
        print(f"fastdiff sample: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
