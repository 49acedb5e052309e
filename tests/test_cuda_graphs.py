"""CUDA-graph replay of the sampling loop (fastdiff.sampling.graphs): GPU only, skips elsewhere.

Replay must equal the eager loop bit for bit (DDIM eta=0, and with in-kernel Philox noise), reuse
one graph across seeds and cfg values, read weights changed in place, recapture when a weight's
storage is replaced, keep memory flat across calls, and refuse or fall back with the reason.
``python -m fastdiff.gpucheck`` runs this file on a GPU machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastdiff
from fastdiff.sampling import graphs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph capture and replay)"),
]

SHAPE = (4, 3, 16, 16)


class Net(torch.nn.Module):
    """A small conv denoiser with a class embedding: enough ops to make a graph worth having."""

    def __init__(self, out_factor: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.emb = torch.nn.Embedding(11, 16)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.out = torch.nn.Conv2d(16, 3 * out_factor, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.inp(x) + (t.float() / 1000).view(-1, 1, 1, 1)
        if y is not None:
            h = h + self.emb(y)[:, :, None, None]
        return self.out(torch.nn.functional.silu(self.norm(h)))


@pytest.fixture(autouse=True)
def _fresh_cache():
    graphs.clear()
    yield
    graphs.clear()


def _kw(**extra):
    y = torch.tensor([1, 2, 3, 4], device="cuda")
    base = dict(steps=10, generator=7, cfg=4.0, cond={"y": y}, uncond={"y": torch.full_like(y, 10)})
    base.update(extra)
    return base


CASES = {
    "ddim": dict(),
    "ddim-eta-philox": dict(eta=0.7),
    "ddpm": dict(sampler="ddpm"),
    "ddpm-learned": dict(sampler="ddpm", variance="learned_range", prediction="v"),
    "no-cfg": dict(cfg=None, uncond=None),
}


@pytest.mark.parametrize("mode", graphs.MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_replay_equals_eager_bit_for_bit(name, mode, monkeypatch):
    monkeypatch.setenv(graphs.MODE_ENV, mode)
    kw = _kw(**CASES[name])
    model = Net(2 if kw.get("variance") == "learned_range" else 1).cuda().eval()
    eager = fastdiff.sample(model, SHAPE, cuda_graph=False, **kw)
    replayed = fastdiff.sample(model, SHAPE, cuda_graph=True, **kw)
    assert graphs.cache_info()["entries"] == 1
    assert torch.equal(replayed, eager)
    again = fastdiff.sample(model, SHAPE, cuda_graph=True, **kw)  # the cached graph, replayed
    assert torch.equal(again, eager)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_each_kernel_backend_replays(backend):
    pytest.importorskip("triton", reason="triton is not installed")
    model = Net().cuda().eval()
    kw = _kw(eta=0.5, backend=backend)
    assert torch.equal(
        fastdiff.sample(model, SHAPE, cuda_graph=True, **kw), fastdiff.sample(model, SHAPE, cuda_graph=False, **kw)
    )


def test_new_seed_cfg_and_labels_replay_without_recapture():
    model = Net().cuda().eval()
    first = fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw())
    for seed, cfg, label in ((8, 4.0, 1), (7, 1.5, 2), (9, 7.5, 3)):
        kw = _kw(generator=seed, cfg=cfg, eta=0.3)
        kw["cond"] = {"y": torch.full((4,), label, device="cuda")}
        got = fastdiff.sample(model, SHAPE, cuda_graph=True, **kw)
        assert torch.equal(got, fastdiff.sample(model, SHAPE, cuda_graph=False, **kw))
    assert graphs.cache_info()["entries"] == 2  # eta 0 and eta 0.3 are two loops; nothing else recaptured
    assert not torch.equal(first, got)


def test_results_are_not_overwritten_by_the_next_replay():
    model = Net().cuda().eval()
    a = fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw(generator=1))
    a_copy = a.clone()
    fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw(generator=2))
    assert torch.equal(a, a_copy)


def test_weights_changed_in_place_are_used_and_replaced_storage_recaptures():
    model = Net().cuda().eval()
    fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw())
    with torch.no_grad():
        model.out.weight.mul_(0.5)  # in place: the graph reads it
    assert torch.equal(
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw()),
        fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw()),
    )
    ema = {k: v * 0.9 for k, v in model.state_dict().items()}
    model.load_state_dict(ema)  # copies in place
    assert torch.equal(
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw()),
        fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw()),
    )
    model.out.weight.data = model.out.weight.data * 2  # new storage: must recapture
    assert torch.equal(
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw()),
        fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw()),
    )


def test_memory_is_flat_across_calls_of_three_shapes():
    model = Net().cuda().eval()
    shapes = [(4, 3, 16, 16), (2, 3, 16, 16), (4, 3, 8, 8)]

    def round_():
        for shape in shapes:
            kw = _kw()
            kw["cond"] = {"y": kw["cond"]["y"][: shape[0]]}
            kw["uncond"] = {"y": kw["uncond"]["y"][: shape[0]]}
            fastdiff.sample(model, shape, cuda_graph=True, **kw)

    round_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(9):
        round_()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before
    assert graphs.cache_info()["entries"] == 3


def test_true_refuses_what_cannot_be_captured_and_auto_falls_back_once():
    model = Net().cuda().eval()
    with pytest.raises(ValueError, match="cuda_graph=True cannot capture .*a callback runs Python"):
        fastdiff.sample(model, SHAPE, cuda_graph=True, callback=lambda i, t, x: None, **_kw())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            out = fastdiff.sample(model, SHAPE, check_finite=True, **_kw())
    messages = [str(w.message) for w in seen if "cuda_graph='auto'" in str(w.message)]
    assert len(messages) == 1 and "check_finite" in messages[0]
    assert torch.equal(out, fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw()))


def test_a_model_that_syncs_fails_capture_with_the_reason_and_auto_runs_eagerly():
    class Syncing(Net):
        def forward(self, x, t, y=None):
            return super().forward(x, t, y) * float(x.abs().max().item() > -1)

    model = Syncing().cuda().eval()
    with pytest.raises(graphs.CaptureError, match="capture_check"):
        fastdiff.sample(model, SHAPE, cuda_graph=True, **_kw())
    graphs.clear()
    with pytest.warns(RuntimeWarning, match="runs the loop eagerly"):
        out = fastdiff.sample(model, SHAPE, **_kw())
    assert torch.equal(out, fastdiff.sample(model, SHAPE, cuda_graph=False, **_kw()))
    # ... and the failure is remembered: no second capture attempt for that loop
    assert graphs.cache_info()["failed"] == 1
