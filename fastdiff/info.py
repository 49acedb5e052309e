"""``fastdiff info``: versions, what was built, every op x backend, the tuner's cached decisions.

Each op x backend is available, or says why not; the decisions are this machine's (fastdiff.tuning).

Runnable as ``python -m fastdiff.info``; ``fastdiff info`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import sys
from collections.abc import Sequence
from importlib import metadata

import torch

from . import _native
from .backends import AVAILABLE, ENV_VAR, registered_ops, support_table
from .kernel_report import format_kernels, native_kernels

__all__ = ["main", "collect", "cpu_line", "cpu_model"]


def _dist_version(name: str) -> str | None:
    # importlib.metadata rather than `import triton`: the version without paying triton's import.
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def cpu_line() -> str:
    """The CPU model, ATen's CPU capability (the ISA its kernels run) and the thread count: printed
    with every number, since kernels rank differently on other CPUs (the tuner keys its cache by it)."""
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()}, ATen CPU capability {isa}, {torch.get_num_threads()} thread(s)"


def collect() -> dict:
    """Everything ``fastdiff info`` prints, as a JSON-able dict."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (compute capability {major}.{minor})")
    return {
        "fastdiff": _dist_version("fastdiff"),
        "python": platform.python_version(),
        "cpu": cpu_line(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_devices": devices,
        "triton": _dist_version("triton"),
        "native": _native.status(),
        "backends": support_table(),
        "priority": {op: list(support.priority) for op, support in sorted(registered_ops().items())},
        # What each backend accepts, from the op's declaration (the rules behind "backends").
        "declared": {op: support.describe() for op, support in sorted(registered_ops().items())},
        "tuning": _tuning_summary(),
    }


def _tuning_summary() -> dict:
    from . import tuning

    return tuning.summary()


def _native_lines(status: dict) -> list[str]:
    info = status["build_info"]
    if not status["built"]:
        return [f"  fastdiff._C: not loaded: {status['reason']}"]
    lines = [f"  fastdiff._C: {status['path']}", "  CPU kernels: compiled"]
    if status["cuda_compiled"]:
        archs = ", ".join(status["cuda_archs"])
        lines.append(f"  CUDA kernels: compiled for {archs} with nvcc {info.get('nvcc_version')}")
        if info.get("ptxas_report"):
            lines.append("  ptxas report: `fastdiff info --kernels` lists registers and spills per kernel")
    else:
        lines.append(f"  CUDA kernels: not compiled: {status['cuda_skipped_reason'] or 'no reason recorded'}")
    lines.append(
        f"  built by {info.get('builder', 'setup.py')} with torch {info.get('torch_version')} "
        f"(CUDA {info.get('torch_cuda_version')}), {info.get('cxx_version') or info.get('cxx')}, "
        f"at {info.get('built_at')}"
    )
    return lines


def _table_lines(table: dict[str, dict[str, str | list[str]]]) -> list[str]:
    width = max(len(b) for backends in table.values() for b in backends)
    lines = []
    for op, backends in table.items():
        lines.append(f"  {op}")
        for backend, verdict in backends.items():
            text = AVAILABLE if verdict == AVAILABLE else "unavailable: " + "; ".join(verdict)
            lines.append(f"    {backend:<{width}}  {text}")
    return lines


def _tuning_lines(summary: dict) -> list[str]:
    """The cached measured choices of this machine: a count per op, then one line per decision (op,
    signature, choice, the static rule's where the measurement overturned it, the medians)."""
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(summary["decisions"].items())) or "none yet"
    lines = [f"tuning   measured choices cached for this machine: {counts} ({summary['path']}; fastdiff tune fills it)"]
    from .tuning import format_choice

    choices = summary.get("choices", [])
    width = max((len(c["description"]) for c in choices), default=0)
    return lines + [f"  {format_choice(c, width)}" for c in choices]


def format_report(report: dict) -> str:
    devices = report["cuda_devices"] or ["none visible"]
    lines = [
        f"fastdiff {report['fastdiff'] or '(not installed as a distribution)'}",
        f"python   {report['python']}",
        f"CPU      {report['cpu']}",
        f"torch    {report['torch']} (CUDA {report['torch_cuda'] or 'none: CPU-only build'})",
        f"GPUs     {'; '.join(devices)}",
        f"triton   {report['triton'] or 'not installed'}",
        "native extension:",
        *_native_lines(report["native"]),
        *_tuning_lines(report["tuning"]),
        f"ops x backends (auto tries them in the order listed; {ENV_VAR} overrides):",
        *_table_lines(report["backends"]),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; ``--json`` prints it as JSON. Returns the exit status (0)."""
    parser = argparse.ArgumentParser(prog="fastdiff info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="also list every compiled GPU kernel: registers, spills, stack, shared memory",
    )
    args = parser.parse_args(argv)
    report = collect()
    kernels = native_kernels() if args.kernels else None
    triton_kernels, triton_reason = _triton_kernels() if args.kernels else ([], None)
    if args.json:
        if kernels is not None:
            report["kernels"] = [dataclasses.asdict(k) for k in kernels]
            report["triton_kernels"] = [dataclasses.asdict(k) for k in triton_kernels]
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report))
        if kernels is not None:
            print("GPU kernels (from nvcc -Xptxas -v at build time):")
            print(format_kernels(kernels))
            print("Triton kernels (compiled ahead of time for sm_80 and sm_90 by fastdiff.triton.aot; no GPU needed):")
            if triton_reason:
                print(f"  none: {triton_reason}")
            else:
                from .triton.aot import format_triton_kernels

                print(format_triton_kernels(triton_kernels))
    sys.stdout.flush()
    return 0


def _triton_kernels() -> tuple[list, str | None]:
    """The Triton AOT report (compiled on first use, about a minute; cached), or why there is none."""
    if _dist_version("triton") is None:
        return [], "triton is not installed"
    from .triton import aot

    if not all(aot.cache_path(op=op).exists() for op in aot.FAMILIES):
        print(
            "fastdiff info: compiling the Triton builds for sm_80 and sm_90 (once; cached after)...",
            file=sys.stderr,
            flush=True,
        )
    try:
        return aot.report(), None
    except Exception as e:  # a broken toolchain must not take `fastdiff info` down with it
        return [], f"the ahead-of-time build failed: {str(e).strip().splitlines()[-1]}"


if __name__ == "__main__":
    raise SystemExit(main())
