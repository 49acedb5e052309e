"""CUDA graphs of the sampling loop: capture once per signature, replay with new values.

``fastdiff.sample(..., cuda_graph="auto" | True | False)`` on a CUDA device builds the loop's plan
(``fastdiff.sampling.plan``), runs one step eagerly on a side stream (lazy initialisation, Triton
autotuning and cuBLAS workspaces happen there, outside the capture), rewinds, and captures:

- ``"step"`` mode (the default): one step, replayed once per step. The step reads its index from
  the plan's device counter and advances it, so one graph serves every step, whatever their number.
- ``"loop"`` mode: the whole N-step loop unrolled into one graph, replayed once
  (``FASTDIFF_CUDA_GRAPH_MODE=loop``): one replay instead of N, at N times the capture time and
  graph size.

After capturing, the first steps are replayed and run eagerly from the same state, and the graph
is used only if the two agree (a safety net for what a capture cannot report: a value read at
capture time and baked into the graph).

Graphs are cached per ``SamplingConfig.signature()`` (model, shapes, dtypes, steps, sampler
settings, guidance on/off, kwargs shapes) in an LRU of ``FASTDIFF_CUDA_GRAPH_CACHE`` entries
(default 8), all allocating from one memory pool per device. A call with a cached signature writes
its values (x_T, seed, cfg, kwargs) into the plan's static buffers and replays: a new seed or cfg
never recaptures. The graph reads the model's weights where they are, so weights changed in place
(``.data.copy_``, ``load_state_dict``, an EMA update) are used by the next replay; a weight whose
storage was replaced (``param.data = other``) makes the entry recapture. The cache keeps its
models alive; ``clear()`` frees every graph.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from typing import Any

import torch

from .config import SamplingConfig
from .plan import SamplingPlan

__all__ = ["use_graph", "run", "clear", "cache_info", "CaptureError", "CACHE_ENV", "MODE_ENV", "MODES"]

CACHE_ENV = "FASTDIFF_CUDA_GRAPH_CACHE"
MODE_ENV = "FASTDIFF_CUDA_GRAPH_MODE"
MODES = ("step", "loop")


class CaptureError(RuntimeError):
    """The loop could not be captured in a CUDA graph (the message says why)."""


def _cache_size() -> int:
    raw = os.environ.get(CACHE_ENV, "8")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise ValueError(f"{CACHE_ENV} must be a positive int (the number of cached CUDA graphs), got {raw!r}")
    return value


def _mode() -> str:
    mode = os.environ.get(MODE_ENV, "step")
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {mode!r}")
    return mode


def _weights(model: Any) -> tuple:
    """Where the model's tensors live: a replay reads these addresses, so a change means recapture."""
    if not isinstance(model, torch.nn.Module):
        return ()
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors)


class CudaRuntime:
    """The CUDA calls of capture and replay, in one place (tests on the CPU swap in a recorder)."""

    def warm_up(self, device: torch.device, fn) -> None:
        """Run ``fn`` on a side stream (lazy init, autotuning, workspaces) and wait for it."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)

    def pool(self, device: torch.device) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(self, fn, pool: Any) -> Any:
        """A graph of what ``fn`` launches (not run by the capture)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
        return graph

    def after_failure(self, device: torch.device) -> None:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)


_runtime = CudaRuntime()


class _Entry:
    def __init__(self, plan: SamplingPlan, mode: str, pool: Any) -> None:
        self.plan, self.mode, self.pool = plan, mode, pool
        self.model = plan.config.model  # kept alive: the graph reads its weights' memory
        self.graph: torch.cuda.CUDAGraph | None = None
        self.weights: tuple = ()

    def capture(self, config: SamplingConfig) -> None:
        plan, device = self.plan, config.device
        _runtime.warm_up(device, lambda: plan.step(0))  # also binds the step's kernel before capture
        plan.load(config)  # rewind what the warm-up advanced

        def body() -> None:
            for i in range(plan.num_steps if self.mode == "loop" else 1):
                plan.step(i)

        try:
            graph = _runtime.capture(body, self.pool)
        except Exception as exc:  # the CUDA error says what broke the capture; say where to look
            _runtime.after_failure(device)
            raise CaptureError(
                f"capturing the sampling loop in a CUDA graph failed: {type(exc).__name__}: {exc}. "
                "fastdiff.sampling.capture_check(model, ...) on the CPU names the op and step that break it "
                "(a host sync such as .item(), a copy from the host, a branch on a tensor value)"
            ) from exc
        self.graph = graph
        self.weights = _weights(self.model)
        self.verify(config)
        plan.load(config)  # the capture recorded the step without running it; make x_T current again

    def verify(self, config: SamplingConfig) -> None:
        """Replay the first steps and run them eagerly from the same state: the loop's state (x, the
        counter, t) must agree, or the graph is not used. It catches what capture cannot report (a
        value read at capture time and baked in) at the cost of a few steps, once per signature."""
        plan = self.plan
        n = plan.num_steps if self.mode == "loop" else min(2, plan.num_steps)
        plan.load(config)
        for _ in range(1 if self.mode == "loop" else n):
            self.graph.replay()
        replayed = (plan.x_in.clone(), plan.counter.clone(), plan.t_in.clone())
        plan.load(config)
        for i in range(n):
            plan.step(i)
        eager = (plan.x_in, plan.counter, plan.t_in)
        tol = 1e-5 if config.dtype == torch.float64 else 1e-3 if config.dtype == torch.float32 else 2e-2
        same = (
            torch.equal(replayed[1], eager[1])
            and torch.equal(replayed[2], eager[2])
            and torch.allclose(replayed[0], eager[0], rtol=tol, atol=tol, equal_nan=True)
        )
        if not same:
            diff = (replayed[0].double() - eager[0].double()).abs().max().item()
            raise CaptureError(
                f"the captured graph's first {n} step(s) differ from the eager loop's (max |x difference| {diff:.3g}, "
                f"step counter {int(replayed[1])} vs {int(eager[1])}): something in a step was fixed at capture "
                "time; fastdiff.sampling.capture_check(model, ...) on the CPU names what"
            )

    def replay(self) -> None:
        plan, c = self.plan, self.plan.config
        replays = range(1 if self.mode == "loop" else plan.num_steps)
        if c.progress:
            from tqdm.auto import tqdm

            replays = tqdm(replays, desc=f"fastdiff {c.sampler} (CUDA graph)", unit="replay")
        for _ in replays:
            self.graph.replay()


_cache: OrderedDict[tuple, _Entry] = OrderedDict()
_failed: dict[tuple, str] = {}  # signatures whose capture failed: auto runs them eagerly from then on
_pools: dict[torch.device, Any] = {}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def use_graph(config: SamplingConfig) -> bool:
    """Whether ``sample()`` replays a CUDA graph for ``config``; raises for ``cuda_graph=True`` when it
    cannot, naming every reason; ``"auto"`` on CUDA warns once per reason and runs eagerly."""
    if config.cuda_graph is False:
        return False
    reasons = config.capture_reasons()
    if config.cuda_graph == "auto" and any(r.endswith("not on a CUDA device") for r in reasons):
        return False  # nothing to capture off CUDA: auto means eager, no warning
    failed = _failed.get(config.signature())
    if failed is not None:
        reasons.append(f"an earlier capture of this loop failed ({failed})")
    if not reasons:
        return True
    if config.cuda_graph is True:
        raise ValueError("cuda_graph=True cannot capture this sampling loop: " + "; ".join(reasons))
    _warn_once("fastdiff.sample: cuda_graph='auto' runs the loop eagerly: " + "; ".join(reasons))
    return False


def run(config: SamplingConfig) -> torch.Tensor:
    """Replay (capturing first if needed) the graph of ``config``'s loop; returns a fresh x_0."""
    signature = config.signature()
    entry = _cache.get(signature)
    if entry is not None and entry.weights != _weights(entry.model):
        del _cache[signature]  # a weight's storage moved: the graph would read freed memory
        entry = None
    if entry is not None:
        _cache.move_to_end(signature)
        entry.plan.load(config)
    else:
        plan = SamplingPlan(config)
        reasons = plan.capturable()
        if reasons:
            return _eager_instead(config, plan, "; ".join(reasons))
        if config.device not in _pools:
            _pools[config.device] = _runtime.pool(config.device)
        pool = _pools[config.device]
        entry = _Entry(plan, _mode(), pool)
        try:
            entry.capture(config)
        except CaptureError as exc:
            _failed[signature] = str(exc.__cause__ or exc).splitlines()[0][:200]
            if config.cuda_graph is True:
                raise
            plan = SamplingPlan(config)
            return _eager_instead(config, plan, str(exc))
        _cache[signature] = entry
        while len(_cache) > _cache_size():
            _cache.popitem(last=False)
    entry.replay()
    return entry.plan.result(copy=True)


def _eager_instead(config: SamplingConfig, plan: SamplingPlan, why: str) -> torch.Tensor:
    if config.cuda_graph is True:
        raise ValueError(f"cuda_graph=True cannot capture this sampling loop: {why}")
    _warn_once(f"fastdiff.sample: cuda_graph='auto' runs the loop eagerly: {why}")
    plan.load(config)
    return plan.run()


def clear() -> None:
    """Drop every cached graph (their memory returns to the pool's allocator) and failed capture."""
    _cache.clear()
    _failed.clear()


def cache_info() -> dict:
    """The cache's state: entries, its bound, the capture mode, and signatures whose capture failed."""
    return {"entries": len(_cache), "max_entries": _cache_size(), "mode": _mode(), "failed": len(_failed)}
