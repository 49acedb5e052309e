"""End to end: the shipped digits U-Net (fastdiff.models.digits_unet) sampled with fastdiff.sample.

Batch 16 at 16x16, DDIM, cfg 4 (the model runs on the 32-row batch [uncond; cond]), the v-prediction
and schedule the weights were trained with. Baseline: the same weights on the reference path
(``set_backend("reference")`` and ``backend="reference"``: every norm, attention and sampler step in
plain PyTorch, NCHW). Also: torch.compile of that reference model (NCHW and channels_last; the
compile time of the untimed warm-up is reported as compile_s), fastdiff's fused path (auto) in
NCHW and channels_last, and that model under torch.compile (fastdiff's ops are custom ops Inductor
keeps, fusing the glue around them). The issue's targets: fused >= 1.5x the reference path and not slower than
torch.compile of the reference model.

Run length: by default 20 DDIM steps and 3 timed rounds per provider (and 3 interleaved rounds), so
``pytest benchmarks --benchmark-only`` takes minutes; with ``--full``, the issue's 50 steps and 5
rounds. FASTDIFF_BENCH_STEPS and FASTDIFF_BENCH_ROUNDS override either. Each provider's model is
built, compiled and warmed up (two untimed 2-step runs, so a recompile the first run triggers is not
timed either) once per process: the interleaved group reuses them rather than compiling again.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from _bench import DEVICE, busy_window_starts_now, end_to_end_rounds, end_to_end_steps, timed

import fastdiff
from fastdiff.models import digits_unet
from fastdiff.models.digits import NULL_CLASS, digits_sampling

BATCH = 16
SHAPE = (BATCH, 1, 16, 16)
CFG = 4.0
STEPS = end_to_end_steps(20, full=50)
ROUNDS = end_to_end_rounds(3, full=5)
PROVIDERS = [
    "reference",
    "torch.compile(reference)",
    "torch.compile(reference) channels_last",
    "fastdiff",
    "fastdiff channels_last",
    "torch.compile(fastdiff)",
    "torch.compile(fastdiff) channels_last",
]


@functools.cache
def _make(provider: str):
    """A function of the step count that samples the batch with this provider, and the seconds its
    untimed warm-up took (with torch.compile: the compilation). Made once per provider and kept, so
    the interleaved group below does not compile the same model again."""
    reference = "reference" in provider
    backend = "reference" if reference else "auto"
    model = digits_unet(backend=backend, device=DEVICE)
    kwargs = digits_sampling(model)
    fmt = torch.channels_last if provider.endswith("channels_last") else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if provider.startswith("torch.compile"):
        model = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g).to(DEVICE).contiguous(memory_format=fmt)
    labels = (torch.arange(BATCH) % 10).to(DEVICE)

    def run(steps: int) -> torch.Tensor:
        return fastdiff.sample(
            model,
            noise=noise,
            sampler="ddim",
            steps=steps,
            cfg=CFG,
            cond={"y": labels},
            uncond={"y": torch.full_like(labels, NULL_CLASS)},
            backend=backend,
            **kwargs,
        )

    start = time.perf_counter()
    for _ in range(2):  # warm-up (compilation, the tuner's first-call measurements, recompiles), not timed
        run(2)
    return run, time.perf_counter() - start


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample_digits_unet(benchmark, provider):
    run, warmup_s = _make(provider)
    benchmark.group = f"digits U-Net DDIM cfg=4, batch {BATCH} 16x16, {STEPS} steps, fp32"
    benchmark.extra_info.update(provider=provider, baseline="reference", steps=STEPS)
    if provider.startswith("torch.compile"):
        benchmark.extra_info["compile_s"] = round(warmup_s, 1)
    busy_window_starts_now()  # after the warm-up (compilation)
    result = benchmark.pedantic(timed(lambda: run(STEPS)), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["ms/image"] = round(benchmark.stats.stats.median / BATCH * 1e3, 3)
    assert result.shape == SHAPE and bool(torch.isfinite(result).all())


INTERLEAVED = [
    "reference",
    "torch.compile(reference) channels_last",
    "fastdiff channels_last",
    "torch.compile(fastdiff) channels_last",
]


def test_sample_digits_unet_interleaved(benchmark):
    """The issue's comparisons again, with the providers taking turns within each round (reference,
    torch.compile(reference) channels_last, fastdiff channels_last, torch.compile(fastdiff)
    channels_last, then again), so a slow spell of this shared machine falls on all alike instead of
    on whichever provider was running. The timed function is one whole round; extra_info holds each
    provider's median and the ratios the issue asks about (compiled_fused_vs_fused above 1 means
    torch.compile of the fastdiff model beats it eager)."""
    runs = {provider: _make(provider)[0] for provider in INTERLEAVED}  # built and warmed up once (above)
    times: dict[str, list[float]] = {provider: [] for provider in INTERLEAVED}

    def one_round() -> None:
        for provider, run in runs.items():
            start = time.perf_counter()
            timed(lambda run=run: run(STEPS))()
            times[provider].append(time.perf_counter() - start)

    benchmark.group = f"digits U-Net interleaved, batch {BATCH} 16x16, {STEPS} steps, fp32"
    busy_window_starts_now()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    median = {provider: sorted(ts)[len(ts) // 2] for provider, ts in times.items()}
    fused = median["fastdiff channels_last"]
    benchmark.extra_info.update(
        provider="round of " + ", ".join(INTERLEAVED),
        steps=STEPS,
        **{f"{provider} ms": round(t * 1e3, 1) for provider, t in median.items()},
        fused_vs_reference=round(median["reference"] / fused, 2),
        fused_vs_compiled_reference=round(median["torch.compile(reference) channels_last"] / fused, 2),
        compiled_fused_vs_fused=round(fused / median["torch.compile(fastdiff) channels_last"], 2),
    )


# ---- fewer model calls: the samplers at the step counts where they read as well as DDIM's 50 ----------

SAMPLERS = {
    "ddim 50": ("ddim", 50, {}),
    "dpmpp_2m 15": ("dpmpp_2m", 15, {}),
    "euler_a 30": ("euler_a", 30, {}),
    "dpmpp_2m_sde 15": ("dpmpp_2m_sde", 15, {}),
}


@functools.cache
def _judge():
    """The independent classifier of tests/test_digits_quality.py (an SVC on sklearn's 8x8 digits)."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is not installed")
    from sklearn.svm import SVC

    digits = datasets.load_digits()
    return SVC(gamma=0.001, C=10.0, random_state=0).fit(digits.data, digits.target)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_digits_unet_samplers(benchmark, name):
    """The fused path (channels_last) with each sampler at its step count, batch 16, cfg 4; extra_info has
    the share of samples the classifier reads as the requested digit. Baseline: DDIM at 50 steps."""
    from fastdiff.models.digits import images_to_digits

    sampler, steps, options = SAMPLERS[name]
    model = digits_unet(device=DEVICE).to(memory_format=torch.channels_last)
    kwargs = digits_sampling(model)
    labels = (torch.arange(BATCH) % 10).to(DEVICE)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def run() -> torch.Tensor:
        return fastdiff.sample(
            model,
            noise=noise,
            sampler=sampler,
            steps=steps,
            cfg=CFG,
            cond={"y": labels},
            uncond={"y": torch.full_like(labels, NULL_CLASS)},
            **options,
            **kwargs,
        )

    run()  # warm-up: the tuner's first-call measurements
    busy_window_starts_now()
    benchmark.group = f"digits U-Net samplers at equal quality, batch {BATCH} 16x16, cfg 4, fp32"
    benchmark.extra_info.update(provider=name, baseline="ddim 50", steps=steps)
    images = benchmark.pedantic(timed(run), rounds=ROUNDS, iterations=1)
    read = _judge().predict(images_to_digits(images.cpu()).reshape(BATCH, 64).numpy())
    benchmark.extra_info["read_as_requested"] = f"{float((read == labels.cpu().numpy()).mean()):.0%}"
