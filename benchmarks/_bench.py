"""Helpers shared by the benchmark modules (kept out of conftest.py so they can be imported)."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS_ENV = "FASTDIFF_BENCH_STEPS"
ROUNDS_ENV = "FASTDIFF_BENCH_ROUNDS"

# Set by conftest.py's pytest_configure from the --full option, before any benchmark module is
# imported: the end-to-end groups then run at full length (their module docstrings give both settings).
FULL = False


def set_full(full: bool) -> None:
    global FULL
    FULL = bool(full)


def end_to_end_steps(default: int, full: int = 50) -> int:
    """Sampler steps of an end-to-end benchmark: FASTDIFF_BENCH_STEPS if set, else ``full`` with
    ``--full``, else the module's shortened ``default``."""
    return int(os.environ.get(STEPS_ENV, full if FULL else default))


def end_to_end_rounds(default: int, full: int | None = None) -> int:
    """Timed rounds of an end-to-end benchmark: FASTDIFF_BENCH_ROUNDS if set, else ``full`` with
    ``--full`` (``default`` when not given), else the module's ``default``."""
    return int(os.environ.get(ROUNDS_ENV, full if FULL and full is not None else default))


def run_kind() -> str:
    """How long the end-to-end groups of this run are, for the summary and the CSV."""
    overrides = [f"{name}={os.environ[name]}" for name in (STEPS_ENV, ROUNDS_ENV) if name in os.environ]
    return ", ".join(["full" if FULL else "default", *overrides])


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# Where the current benchmark's busy-share window starts (see conftest.py's _busy_share): a
# fastdiff.tuning.busy_mark taken when the test started, or when it called busy_window_starts_now().
_busy_window: list = [(None, 0.0)]


def busy_window_starts_now() -> None:
    """Count the busy share from here on: call it after a warm-up (torch.compile's worker processes
    compete for the cores while compiling, which says nothing about the timed rounds)."""
    from fastdiff.tuning import busy_mark

    _busy_window[0] = busy_mark()


def timed(fn):
    """Wrap ``fn`` so each timed call waits for the device (otherwise only launches are timed)."""

    def run():
        out = fn()
        synchronize()
        return out

    return run


def machine_line() -> str:
    """The CPU model, ATen's CPU capability (the ISA its kernels run) and the thread count: printed
    with every number, since kernels rank differently on other CPUs."""
    from fastdiff.info import cpu_line

    return cpu_line()


def machine() -> dict[str, str]:
    """The machine as columns: CPU model, ISA (ATen's CPU capability), threads, GPU (if used), torch
    and fastdiff versions."""
    import fastdiff
    from fastdiff.info import cpu_model

    isa = torch.backends.cpu.get_cpu_capability()
    model = cpu_model()
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else ""
    return {
        "cpu": model,
        "isa": isa,
        "threads": str(torch.get_num_threads()),
        "gpu": gpu,
        "torch": torch.__version__,
        "fastdiff": getattr(fastdiff, "__version__", "?"),
    }
