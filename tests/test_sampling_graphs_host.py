"""The host side of fastdiff.sampling.graphs, run on the CPU with a recording runtime.

A CUDA graph needs a GPU (tests/test_cuda_graphs.py); everything around it does not: which loops
capture, the cache per signature and its bound, reuse across seeds and cfg values, recapture when a
weight's storage is replaced, the check of the first replayed steps against eager, and falling back
or raising with the reason. Here the runtime's "graph" re-runs the captured Python on replay, so the
results must equal the eager loop's bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastdiff
from fastdiff.sampling import SamplingConfig, graphs

SHAPE = (3, 2, 4, 4)


class Net(torch.nn.Module):
    def __init__(self, out_factor: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2 * out_factor, 3, padding=1)
        self.emb = torch.nn.Embedding(11, 2 * out_factor)

    def forward(self, x, t, y=None):
        h = self.conv(x) + (t.float() / 1000).view(-1, 1, 1, 1)
        if y is not None:
            h = h + self.emb(y)[:, :, None, None]
        return torch.tanh(h)


class _Graph:
    def __init__(self, fn, runtime):
        self.fn, self.runtime = fn, runtime

    def replay(self):
        self.runtime.replays += 1
        self.fn()
        if self.runtime.corrupt:
            self.runtime.corrupt(self.fn)


class Recorder:
    """A runtime whose capture keeps the Python body and whose replay re-runs it."""

    def __init__(self):
        self.captures = self.replays = self.warm_ups = 0
        self.fail_with: Exception | None = None
        self.corrupt = None

    def warm_up(self, device, fn):
        self.warm_ups += 1
        fn()

    def pool(self, device):
        return ("pool", device)

    def capture(self, fn, pool):
        if self.fail_with is not None:
            raise self.fail_with
        self.captures += 1
        return _Graph(fn, self)

    def after_failure(self, device):
        pass


@pytest.fixture
def runtime(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(graphs, "_runtime", recorder)
    reasons = SamplingConfig.capture_reasons
    # the loop runs on the CPU here; every other reason still counts
    monkeypatch.setattr(
        SamplingConfig, "capture_reasons", lambda self: [r for r in reasons(self) if "not on a CUDA device" not in r]
    )
    monkeypatch.setattr(graphs, "_warned", set())
    graphs.clear()
    yield recorder
    graphs.clear()


def _kw(**extra):
    y = torch.tensor([1, 2, 3])
    base = dict(steps=6, generator=7, cfg=4.0, cond={"y": y}, uncond={"y": torch.full_like(y, 10)})
    base.update(extra)
    return base


CASES = {
    "ddim": dict(),
    "ddim-eta": dict(eta=0.7, clip_x0=1.0),
    "ddpm-learned": dict(sampler="ddpm", variance="learned_range"),
    "euler-trailing": dict(sampler="euler", timestep_spacing="trailing"),
    "euler_a": dict(sampler="euler_a"),
    "euler-img2img": dict(sampler="euler", init=torch.linspace(-1, 1, 96).reshape(SHAPE), strength=0.5),
    "ddim-inpaint": dict(
        init=torch.linspace(-1, 1, 96).reshape(SHAPE), mask=(torch.arange(16) % 3 == 0).float().reshape(1, 1, 4, 4)
    ),
    "no-cfg": dict(cfg=None, uncond=None),
}


@pytest.mark.parametrize("mode", graphs.MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_replay_equals_eager(runtime, monkeypatch, name, mode):
    monkeypatch.setenv(graphs.MODE_ENV, mode)
    kw = _kw(**CASES[name])
    model = Net(2 if kw.get("variance") == "learned_range" else 1).eval()
    eager = fastdiff.sample(model, SHAPE, cuda_graph=False, **kw)
    for _ in range(2):
        assert torch.equal(fastdiff.sample(model, SHAPE, cuda_graph=True, **kw), eager)
    assert runtime.captures == 1 and runtime.warm_ups == 1
    # per call: 6 replays of one step, or 1 of the unrolled loop; plus the verification's at capture
    per_call, verified = (int(6 * kw.get("strength", 1)), 2) if mode == "step" else (1, 1)  # img2img: fewer steps
    assert runtime.replays == 2 * per_call + verified


def test_seed_cfg_and_kwargs_values_replay_without_recapture(runtime):
    model = Net().eval()
    outs = []
    for seed, cfg, label in ((1, 4.0, 1), (2, 1.5, 2), (3, 7.5, 3)):
        kw = _kw(generator=seed, cfg=cfg, eta=0.3)
        kw["cond"] = {"y": torch.full((3,), label)}
        outs.append(fastdiff.sample(model, SHAPE, cuda_graph=True, **kw))
        assert torch.equal(outs[-1], fastdiff.sample(model, SHAPE, cuda_graph=False, **kw))
    assert runtime.captures == 1
    assert not torch.equal(outs[0], outs[1])


def test_img2img_init_values_replay_without_recapture(runtime):
    """init is a value, loaded into x_in before each replay; strength changes the steps, a new signature."""
    model = Net().eval()
    outs = []
    for init, strength in ((torch.zeros(SHAPE), 0.5), (torch.ones(SHAPE), 0.5), (torch.ones(SHAPE), 0.8)):
        kw = _kw(init=init, strength=strength)
        outs.append(fastdiff.sample(model, SHAPE, cuda_graph=True, **kw))
        assert torch.equal(outs[-1], fastdiff.sample(model, SHAPE, cuda_graph=False, **kw))
    assert runtime.captures == 2
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_results_are_not_overwritten_by_the_next_call(runtime):
    model = Net().eval()
    a = fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw(generator=1))
    a_copy = a.clone()
    fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw(generator=2))
    assert torch.equal(a, a_copy)


def test_cache_is_bounded_lru(runtime, monkeypatch):
    monkeypatch.setenv(graphs.CACHE_ENV, "2")
    model = Net().eval()
    for steps in (3, 4, 5, 3):
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw(steps=steps))
    assert graphs.cache_info()["entries"] == 2
    assert runtime.captures == 4  # steps=3 was evicted by 5, so it captured again


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_cache_size_is_named(runtime, monkeypatch, value):
    monkeypatch.setenv(graphs.CACHE_ENV, value)
    with pytest.raises(ValueError, match="FASTDIFF_CUDA_GRAPH_CACHE must be a positive int"):
        fastdiff.sample(Net(), SHAPE, cuda_graph=True, **_kw())


def test_bad_mode_is_named(runtime, monkeypatch):
    monkeypatch.setenv(graphs.MODE_ENV, "unrolled")
    with pytest.raises(ValueError, match=r"FASTDIFF_CUDA_GRAPH_MODE must be one of \('step', 'loop'\)"):
        fastdiff.sample(Net(), SHAPE, cuda_graph=True, **_kw())


def test_weights_in_place_replay_and_replaced_storage_recaptures(runtime):
    model = Net().eval()
    fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw())
    with torch.no_grad():
        model.conv.weight.mul_(0.5)
    model.load_state_dict({k: v * 0.9 for k, v in model.state_dict().items()})
    assert torch.equal(
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw()),
        fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw()),
    )
    assert runtime.captures == 1  # in-place writes: the graph reads the same memory
    model.conv.weight.data = model.conv.weight.data * 2
    assert torch.equal(
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw()),
        fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw()),
    )
    assert runtime.captures == 2  # a replaced storage: the old graph would read freed memory


def test_capture_failure_raises_with_true_and_falls_back_once_with_auto(runtime):
    model = Net().eval()
    runtime.fail_with = RuntimeError("operation not permitted when stream is capturing")
    with pytest.raises(graphs.CaptureError, match="operation not permitted when stream is capturing.*capture_check"):
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw())
    graphs.clear()
    eager = fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(fastdiff.sample(model, SHAPE, **_kw()), eager)
    messages = [str(w.message) for w in seen if "cuda_graph='auto' runs the loop eagerly" in str(w.message)]
    assert len(messages) == 2, messages  # the failure, then "an earlier capture of this loop failed", once each
    assert "an earlier capture of this loop failed" in messages[1]
    assert graphs.cache_info()["failed"] == 1


def test_a_replay_that_differs_from_eager_is_not_used(runtime):
    model = Net().eval()

    def bake(body):
        """After each replay, perturb x_in: what a value fixed at capture time would do to the state."""
        for cell in body.__closure__:
            x_in = getattr(cell.cell_contents, "x_in", None)
            if x_in is not None:
                x_in.add_(1.0)

    runtime.corrupt = bake
    with pytest.raises(graphs.CaptureError, match="differ from the eager loop's"):
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw())
    assert graphs.cache_info()["entries"] == 0
    with pytest.warns(RuntimeWarning, match="differ from the eager loop's"):
        out = fastdiff.sample(model, SHAPE, **_kw(generator=3))
    assert torch.equal(out, fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw(generator=3)))


def test_uncapturable_options_raise_with_true_and_warn_with_auto(runtime):
    model = Net().eval()
    with pytest.raises(ValueError, match="cuda_graph=True cannot capture this sampling loop: .*dynamic_threshold"):
        fastdiff.sample(model, SHAPE, cuda_graph=True, dynamic_threshold=0.9, **_kw())
    with pytest.warns(RuntimeWarning, match="classifier_grad calls a classifier"):
        fastdiff.sample(model, SHAPE, classifier_grad=lambda x, t, y: torch.zeros_like(x), **_kw())
    assert runtime.captures == 0


def test_progress_counts_replays(runtime, capsys):
    fastdiff.sample(Net().eval(), SHAPE, cuda_graph=True, progress=True, **_kw())
    assert "(CUDA graph)" in capsys.readouterr().err
