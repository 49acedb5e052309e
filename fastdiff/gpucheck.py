"""``python -m fastdiff.gpucheck``: every GPU test and benchmark in one command, with one report.

Made for a GPU lent for a few minutes: run it from the repository root and it

1. prints the machine (GPU, CUDA, torch, Triton, what fastdiff._C was built with);
2. runs the CPU parts that need no GPU: ``capture_check`` on fastdiff's UNet and DiT;
3. on a GPU: runs the GPU tests — first the CUDA-graph and loop-step ones (replay equal to eager
   bit for bit, in-place weight updates, flat memory), then the rest of ``pytest -m gpu tests``
   (every test that needs a GPU or runs a CUDA or Triton kernel on one) and ``tests/triton`` on the
   device — then the sampling-loop benchmark (CUDA graph on vs off, one-step vs unrolled graphs,
   and diffusers' loop when diffusers is installed), then ``pytest benchmarks --benchmark-only``
   in the time left;
4. writes ``report.md`` and ``report.json`` into ``--out`` (default ``$OUT`` if set, else
   ``gpucheck-report``).

Each phase has a time limit so the whole run fits ``--budget`` seconds (default 480: 8 minutes on
one H100). Without a GPU it says so, runs the CPU parts and exits 0. Exit status 1 when a test or
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]


def _machine() -> dict[str, Any]:
    from .info import collect

    info = {k: v for k, v in collect().items() if k not in ("backends", "priority")}
    native = info.pop("native")
    info["fastdiff_C"] = {k: native.get(k) for k in ("built", "reason", "cuda_compiled", "cuda_archs")}
    return info


def _capture_checks() -> list[dict[str, Any]]:
    """capture_check on fastdiff's own models, on the CPU (the proof CI also runs)."""
    from .models import DiT, UNet
    from .sampling import CaptureCheckError, capture_check

    unet = UNet(
        in_channels=3,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=8,
        num_classes=10,
        num_groups=8,
    ).eval()
    dit = DiT(
        input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3, num_classes=5, learn_sigma=True
    ).eval()
    cases = [
        (
            "fastdiff UNet, DDIM eta 0.5, cfg 2",
            unet,
            (2, 3, 8, 8),
            dict(eta=0.5, cfg=2.0, cond={"y": torch.tensor([1, 2])}, uncond={"y": torch.tensor([10, 10])}),
        ),
        (
            "fastdiff DiT, DDPM learned variance, cfg 4",
            dit,
            (2, 3, 8, 8),
            dict(
                sampler="ddpm",
                variance="learned_range",
                cfg=4.0,
                cond={"y": torch.tensor([0, 1])},
                uncond={"y": torch.tensor([5, 5])},
            ),
        ),
    ]
    results = []
    for name, model, shape, kw in cases:
        try:
            report = capture_check(model, shape, steps=4, generator=0, **kw)
            results.append({"check": name, "ok": True, "detail": str(report)})
        except CaptureCheckError as exc:
            results.append({"check": name, "ok": False, "detail": str(exc)})
    return results


def _pytest(args: list[str], timeout: float, out: Path, name: str) -> dict[str, Any]:
    xml = out / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", f"--junitxml={xml}", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text += f"\n(stopped after {timeout:.0f} s, the phase's time limit)"
    (out / f"{name}.log").write_text(text)
    summary = next(
        (
            line
            for line in reversed(text.splitlines())
            if " in " in line and ("passed" in line or "failed" in line or "skipped" in line or "error" in line)
        ),
        text.splitlines()[-1] if text else "",
    )
    return {
        "phase": name,
        "command": " ".join(cmd),
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary.strip("= "),
    }


def _time_cuda(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _loop_benchmark(deadline: float) -> list[dict[str, Any]]:
    """Graph on vs off (one-step and unrolled graphs) vs diffusers' loop, UNet at batch 1 and 8, 4 and 50 steps."""
    from . import sample
    from .models import UNet
    from .sampling import graphs

    torch.manual_seed(0)
    # The design's comparison model (a UNet2DModel of 9.6M parameters, 32x32, AdaGN), built from
    # fastdiff's UNet at a similar size; diffusers' own UNet2DModel below when diffusers is present.
    model = (
        UNet(
            in_channels=3,
            model_channels=64,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(4,),
            num_head_channels=32,
            num_classes=10,
            num_groups=32,
        )
        .cuda()
        .eval()
    )
    rows = []
    diffusers_model = None
    try:
        import diffusers

        diffusers_model = (
            diffusers.UNet2DModel(
                sample_size=32,
                in_channels=3,
                out_channels=3,
                layers_per_block=2,
                block_out_channels=(64, 128, 128, 128),
                down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                num_class_embeds=11,
                resnet_time_scale_shift="scale_shift",
            )
            .cuda()
            .eval()
        )
    except ImportError as exc:
        rows.append({"case": "diffusers loop", "skipped": f"diffusers is not installed ({exc})"})
    for batch in (1, 8):
        for steps in (4, 50):
            if time.monotonic() > deadline:
                rows.append({"case": f"batch {batch}, {steps} steps", "skipped": "out of time"})
                continue
            y = torch.arange(batch, device="cuda") % 10
            kw = dict(steps=steps, cfg=4.0, cond={"y": y}, uncond={"y": torch.full_like(y, 10)}, generator=0)
            row: dict[str, Any] = {"case": f"fastdiff UNet, batch {batch}, DDIM {steps} steps, cfg 4"}
            shape = (batch, 3, 32, 32)
            row["eager_ms"] = _time_cuda(lambda kw=kw, shape=shape: sample(model, shape, cuda_graph=False, **kw), 5)
            for mode in graphs.MODES:
                os.environ[graphs.MODE_ENV] = mode
                graphs.clear()
                row[f"graph_{mode}_ms"] = _time_cuda(
                    lambda kw=kw, shape=shape: sample(model, shape, cuda_graph=True, **kw), 5
                )
                row[f"graph_{mode}_speedup"] = row["eager_ms"] / row[f"graph_{mode}_ms"]
            os.environ.pop(graphs.MODE_ENV, None)
            graphs.clear()
            if diffusers_model is not None:
                row["diffusers_loop_ms"] = _time_cuda(
                    lambda batch=batch, steps=steps: _diffusers_loop(diffusers_model, batch, steps), 5
                )
            rows.append(row)
    return rows


def _diffusers_loop(model, batch: int, steps: int) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    y = torch.cat([torch.full((batch,), 10, device="cuda"), torch.arange(batch, device="cuda") % 10])
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(torch.cat([x, x]), t, class_labels=y).sample
            u, c = out.chunk(2)
            x = sched.step(u + 4.0 * (c - u), t, x).prev_sample
    return x


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# fastdiff GPU check", "", f"- date: {report['date']}"]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()]
    lines += ["", "## capture_check (CPU)", ""]
    lines += [f"- {'ok' if c['ok'] else 'FAILED'}: {c['check']}: {c['detail']}" for c in report["capture_checks"]]
    lines += ["", "## GPU phases", ""]
    if report.get("no_gpu"):
        lines.append(f"- skipped: {report['no_gpu']}")
    for phase in report["phases"]:
        lines.append(f"- {phase['phase']}: rc {phase['rc']}, {phase['seconds']} s: {phase['summary']}")
    if report["loop_benchmark"]:
        lines += ["", "## Sampling loop (ms per sample() call, median of 5, CUDA events)", ""]
        for row in report["loop_benchmark"]:
            lines.append(
                "- " + ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items())
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or "gpucheck-report",
        help="folder for report.md, report.json and the pytest logs",
    )
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    parser.add_argument("--skip-benchmarks", action="store_true", help="run the tests only")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    start = time.monotonic()
    deadline = start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(),
        "phases": [],
        "loop_benchmark": [],
    }
    print("fastdiff gpucheck:", json.dumps(report["machine"]), flush=True)
    report["capture_checks"] = _capture_checks()
    for c in report["capture_checks"]:
        print(f"capture_check {'ok' if c['ok'] else 'FAILED'}: {c['check']}", flush=True)
    failed = not all(c["ok"] for c in report["capture_checks"])

    if not torch.cuda.is_available():
        report["no_gpu"] = "no CUDA GPU here (torch.cuda.is_available() is False): GPU tests and benchmarks not run"
        print(report["no_gpu"], flush=True)
    else:
        repo = Path(__file__).resolve().parent.parent
        if not (repo / "tests").is_dir():
            report["no_gpu"] = f"the tests are not beside the package ({repo}): run from a clone of the repository"
            failed = True
        else:
            os.chdir(repo)
            # The CUDA-graph and loop-step tests first (this check's reason to exist), then the rest of the
            # GPU tier (every test marked gpu, by hand or by tests/conftest.py), then the Triton tier.
            first = [
                "tests/test_cuda_graphs.py",
                "tests/test_ops_sampler_loop_step_native.py",
                "tests/triton/test_sampler_loop_step_triton.py",
            ]
            phases = [
                ("graph-tests", ["-m", "gpu", *first], 0.15),
                ("gpu-tests", ["-m", "gpu", "tests", "--ignore=tests/triton", *(f"--ignore={f}" for f in first)], 0.3),
                ("triton-tests", ["tests/triton", f"--ignore={first[2]}"], 0.2),
            ]
            for name, pytest_args, share in phases:
                left = deadline - time.monotonic()
                phase = _pytest(pytest_args, min(left, args.budget * share), out, name)
                report["phases"].append(phase)
                print(f"{name}: {phase['summary']} ({phase['seconds']} s)", flush=True)
                failed |= phase["rc"] not in (0, 5)
            if not args.skip_benchmarks:
                bench_deadline = time.monotonic() + 0.5 * max(deadline - time.monotonic(), 0)
                report["loop_benchmark"] = _loop_benchmark(bench_deadline)
                left = deadline - time.monotonic() - 10
                if left > 30:
                    phase = _pytest(["benchmarks", "--benchmark-only"], left, out, "benchmarks")
                    report["phases"].append(phase)
                    failed |= phase["rc"] not in (0, 5, 124)
    report["seconds"] = round(time.monotonic() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report))
    print(f"report: {out / 'report.md'} ({report['seconds']} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
