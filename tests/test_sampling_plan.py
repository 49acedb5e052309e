"""The sampling loop as config -> plan -> run: static buffers, one fused op per step, capturability.

``capture_check`` is the CPU proof that a CUDA graph can capture the loop: it must pass for
fastdiff's own models and patched diffusers UNets, and catch every kind of failure on
deliberately bad models, with a message naming the kind, the op and the step.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastdiff
from fastdiff import _native
from fastdiff.models import DiT, UNet
from fastdiff.profiling import count_ops
from fastdiff.sampling import CaptureCheckError, SamplingConfig, SamplingPlan, capture_check

SHAPE = (3, 2, 4, 4)
HAS_LOOP_KERNEL = _native.status()["built"] and hasattr(torch.ops.fastdiff, "sampler_loop_step")
needs_kernel = pytest.mark.skipif(not HAS_LOOP_KERNEL, reason="fastdiff._C without sampler_loop_step (not built)")


class Toy(torch.nn.Module):
    def __init__(self, out_factor: int = 1):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.out_factor = out_factor

    def forward(self, x, t, y=None):
        out = torch.tanh(self.w * x + t.view(-1, *[1] * (x.dim() - 1)) / 1000)
        if y is not None:
            out = out + 0.1 * y.view(-1, *[1] * (x.dim() - 1))
        if self.out_factor == 2:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out


GUIDED = dict(cfg=3.0, cond={"y": torch.ones(3)}, uncond={"y": torch.zeros(3)})
LOOPS = {
    "ddim": dict(sampler="ddim"),
    "ddim-eta": dict(sampler="ddim", eta=0.6, clip_x0=1.0),
    "ddpm": dict(sampler="ddpm"),
    "ddpm-learned": dict(sampler="ddpm", variance="learned_range", prediction="v"),
    "euler-trailing": dict(sampler="euler", timestep_spacing="trailing", prediction="v"),
    "euler_a": dict(sampler="euler_a"),
    "ddpm-img2img": dict(sampler="ddpm", init=torch.linspace(-1, 1, 96).reshape(SHAPE), strength=0.5),
}


# ---- the plan ---------------------------------------------------------------------------------------


def test_config_is_frozen_and_signature_ignores_values():
    a = SamplingConfig.build(Toy(), SHAPE, steps=5, generator=1, **GUIDED)
    with pytest.raises(AttributeError):
        a.steps = 6
    b = SamplingConfig.build(
        a.model, SHAPE, steps=5, generator=2, cfg=7.0, cond={"y": torch.full((3,), 2.0)}, uncond={"y": torch.zeros(3)}
    )
    assert a.signature() == b.signature()  # seed, cfg and kwargs values are loaded, not captured
    c = SamplingConfig.build(a.model, SHAPE, steps=6, generator=1, **GUIDED)
    assert a.signature() != c.signature()
    d = SamplingConfig.build(a.model, SHAPE, steps=5, generator=1)  # no guidance: another loop
    assert a.signature() != d.signature()


def test_plan_buffers_are_made_once_and_written_in_place():
    config = SamplingConfig.build(Toy(), SHAPE, steps=4, generator=0, **GUIDED)
    plan = SamplingPlan(config)
    assert plan.x_in.shape == (6, 2, 4, 4) and plan.x_in.is_contiguous()
    torch.testing.assert_close(plan.x_in[:3], plan.x_in[3:], rtol=0, atol=0)
    assert torch.equal(plan.kwargs["y"], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    assert int(plan.counter) == 0 and plan.t_in.tolist() == [750] * 6
    pointers = [t.data_ptr() for t in (plan.x_in, plan.t_in, plan.counter, plan.kwargs["y"])]
    out = plan.run()
    assert [t.data_ptr() for t in (plan.x_in, plan.t_in, plan.counter, plan.kwargs["y"])] == pointers
    assert int(plan.counter) == 4 and plan.t_in.tolist() == [0] * 6
    torch.testing.assert_close(plan.x_in[:3], plan.x_in[3:], rtol=0, atol=0)  # both halves, every step
    assert torch.equal(out, plan.x_in[:3]) and out.data_ptr() != plan.x_in.data_ptr()


@pytest.mark.parametrize("name", list(LOOPS))
def test_plan_rerun_after_load_is_identical(name):
    kw = dict(LOOPS[name])
    model = Toy(2 if kw.get("variance") == "learned_range" else 1)
    config = SamplingConfig.build(model, SHAPE, steps=6, generator=3, **GUIDED, **kw)
    plan = SamplingPlan(config)
    first = plan.run().clone()
    plan.load(config)
    assert torch.equal(plan.run(), first)


@needs_kernel
@pytest.mark.parametrize("name", list(LOOPS))
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_native_loop_samples_like_the_reference(name, guided):
    kw = dict(LOOPS[name], **(GUIDED if guided else {}))
    model = Toy(2 if kw.get("variance") == "learned_range" else 1)
    ref = fastdiff.sample(model, SHAPE, steps=8, generator=5, backend="reference", **kw)
    got = fastdiff.sample(model, SHAPE, steps=8, generator=5, backend="cpu", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("name", ["ddim", "ddim-eta", "ddpm"])
def test_one_fused_op_per_step_and_no_sync(name):
    def model(x, t, y):
        return torch.tanh(x) * 0.5

    _, count = count_ops(fastdiff.sample, model, SHAPE, steps=10, generator=0, **GUIDED, **LOOPS[name])
    assert count.syncs == 0, str(count)
    assert count.ops["fastdiff.sampler_loop_step"] == 10, str(count)


def test_callback_gets_a_copy_the_loop_does_not_overwrite():
    seen = []
    fastdiff.sample(Toy(), SHAPE, steps=3, generator=0, callback=lambda i, t, x: seen.append(x), **GUIDED)
    assert len({x.data_ptr() for x in seen}) == 3
    assert not torch.equal(seen[0], seen[2])


# ---- capture_check: fastdiff's and diffusers' models pass ---------------------------------------------


@needs_kernel
@pytest.mark.parametrize("name", list(LOOPS))
def test_capture_check_passes_for_the_toy_model(name):
    kw = dict(LOOPS[name])
    model = Toy(2 if kw.get("variance") == "learned_range" else 1)
    report = capture_check(model, SHAPE, steps=6, generator=0, **GUIDED, **kw)
    assert report.loop_ops == {"fastdiff.sampler_loop_step": 1}, str(report)
    assert report.syncs == 0 and report.allocations_outside_model == 0
    assert f"capturable: {int(6 * kw.get('strength', 1))} steps" in str(report)  # img2img runs the last ones


@needs_kernel
def test_capture_check_passes_for_inpainting():
    """The inpainting blend runs after the fused op from preallocated buffers, indexed by the device
    counter: more ops outside the model, but no sync and no allocation."""
    init = torch.linspace(-1, 1, 96).reshape(SHAPE)
    mask = (torch.arange(16) % 3 == 0).float().reshape(1, 1, 4, 4)
    report = capture_check(Toy(), SHAPE, steps=6, generator=0, init=init, mask=mask, **GUIDED)
    assert report.loop_ops["fastdiff.sampler_loop_step"] == 1, str(report)
    assert report.syncs == 0 and report.allocations_outside_model == 0
    assert "capturable: 6 steps" in str(report)


@needs_kernel
def test_capture_check_passes_for_fastdiffs_unet():
    model = UNet(
        in_channels=3,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=8,
        num_classes=10,
        num_groups=8,
    ).eval()
    y = torch.tensor([1, 2, 3])
    report = capture_check(
        model, (3, 3, 8, 8), steps=4, generator=0, cfg=2.0, cond={"y": y}, uncond={"y": torch.full((3,), 10)}
    )
    assert report.loop_ops == {"fastdiff.sampler_loop_step": 1}, str(report)
    assert report.model_ops > 20


@needs_kernel
def test_capture_check_passes_for_fastdiffs_dit():
    model = DiT(
        input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3, num_classes=5, learn_sigma=True
    ).eval()
    report = capture_check(
        model,
        (2, 3, 8, 8),
        sampler="ddpm",
        variance="learned_range",
        steps=4,
        generator=0,
        cfg=4.0,
        cond={"y": torch.tensor([0, 1])},
        uncond={"y": torch.tensor([5, 5])},
    )
    assert report.loop_ops == {"fastdiff.sampler_loop_step": 1}, str(report)


@needs_kernel
def test_capture_check_passes_for_patched_diffusers_unets():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        num_class_embeds=11,
        resnet_time_scale_shift="scale_shift",
    ).eval()
    fastdiff.patch(unet)
    report = capture_check(
        unet,
        (2, 3, 8, 8),
        steps=3,
        generator=0,
        cfg=4.0,
        cond={"class_labels": torch.tensor([1, 2])},
        uncond={"class_labels": torch.tensor([10, 10])},
    )
    assert report.loop_ops == {"fastdiff.sampler_loop_step": 1}, str(report)

    cond_unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=40,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    fastdiff.patch(cond_unet)
    ctx = torch.randn(2, 7, 40)
    report = capture_check(
        cond_unet,
        (2, 4, 8, 8),
        steps=3,
        generator=0,
        cfg=7.5,
        cond={"encoder_hidden_states": ctx},
        uncond={"encoder_hidden_states": torch.zeros_like(ctx)},
    )
    assert report.loop_ops == {"fastdiff.sampler_loop_step": 1}, str(report)


# ---- capture_check: each failure kind caught and named -----------------------------------------------


def _item(x, t):
    return x * float(t[0].item()) / 1000


def _tolist(x, t):
    return x * (t.tolist()[0] / 1000)


def _nonzero(x, t):
    return x + x.nonzero().shape[0] * 0


def _branch(x, t):
    return x if (x.mean() > -100) else -x


def _to_host(x, t):
    return (x.cpu() * 0.5).to(x.device)


def _from_host(x, t):
    return x * torch.tensor(0.5)


class _PerStepScalar:
    """Bakes a Python float that changes every step: a graph would replay the first one forever."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return x * (1.0 / self.calls)


class _PerStepBuffer:
    """Picks a different pre-made tensor every step by a host counter: a graph would keep the first."""

    def __init__(self):
        self.calls = 0
        self.tables = [torch.full(SHAPE[1:], float(k)) for k in range(32)]

    def __call__(self, x, t):
        self.calls += 1
        return x * self.tables[self.calls]


BAD = [
    (_item, "host sync", r"host sync at step 0: Tensor.item in the model"),
    (_tolist, "host sync", r"host sync at step 0: Tensor.tolist in the model"),
    (_nonzero, "host sync", r"host sync at step 0: aten.nonzero in the model"),
    (_branch, "branch on a tensor value", r"branch on a tensor value at step 0: Tensor.__bool__ in the model"),
    (_to_host, "copy across devices", r"copy across devices at step 0: Tensor.cpu in the model"),
    (_from_host, "copy across devices", r"copy across devices at step 0: torch.tensor in the model"),
    (_PerStepScalar, "steps differ", r"steps differ at step 1: op #\d+ \(aten.mul\) differs from step 0's"),
    (_PerStepBuffer, "steps differ", r"steps differ at step 1: op #\d+ \(aten.mul\) differs from step 0's"),
]


@needs_kernel
@pytest.mark.parametrize("model,kind,match", BAD, ids=[f"{b[1].replace(' ', '-')}-{i}" for i, b in enumerate(BAD)])
def test_capture_check_names_each_failure(model, kind, match):
    if isinstance(model, type):
        model = model()
    with pytest.raises(CaptureCheckError, match=match) as info:
        capture_check(model, SHAPE, steps=4, generator=0)
    assert info.value.kind == kind
    assert info.value.in_model is True


@needs_kernel
def test_capture_check_catches_an_allocation_in_the_loop(monkeypatch):
    """A regression to the old loop (x stacked with torch.cat every step) is an allocation outside the model."""
    from fastdiff.sampling import plan as plan_module

    fused_call = plan_module._Fused.__call__

    def stacking(self, i, out):
        p = self.plan
        p.x_in.copy_(torch.cat([p.x, p.x]))
        fused_call(self, i, out)

    monkeypatch.setattr(plan_module._Fused, "__call__", stacking)
    with pytest.raises(
        CaptureCheckError,
        match=r"allocation outside the model at step 0: aten.cat in "
        r"fastdiff's loop",
    ) as info:
        capture_check(Toy(), SHAPE, steps=3, generator=0, **GUIDED)
    assert info.value.in_model is False


@pytest.mark.parametrize(
    "kw,reason",
    [
        (dict(callback=lambda i, t, x: None), "a callback runs Python"),
        (dict(check_finite=True), "check_finite reads the model output"),
        (dict(dynamic_threshold=0.9), "dynamic_threshold takes a per-image quantile"),
        (dict(classifier_grad=lambda x, t: torch.zeros_like(x)), "classifier_grad calls a classifier"),
        (dict(backend="reference"), "backend='reference' reads the step index"),
    ],
)
def test_capture_check_refuses_uncapturable_options(kw, reason):
    with pytest.raises(CaptureCheckError, match=reason) as info:
        capture_check(Toy(), SHAPE, steps=3, generator=0, **kw)
    assert info.value.kind == "not capturable"


# ---- cuda_graph argument -------------------------------------------------------------------------------


def test_cuda_graph_true_off_cuda_names_the_reason():
    with pytest.raises(ValueError, match="cuda_graph=True cannot capture this sampling loop: the loop runs on cpu"):
        fastdiff.sample(Toy(), SHAPE, steps=3, generator=0, cuda_graph=True)


def test_cuda_graph_auto_on_cpu_is_eager_without_a_warning(recwarn):
    a = fastdiff.sample(Toy(), SHAPE, steps=3, generator=0)
    b = fastdiff.sample(Toy(), SHAPE, steps=3, generator=0, cuda_graph=False)
    assert torch.equal(a, b)
    assert not [w for w in recwarn if "cuda_graph" in str(w.message)]


@pytest.mark.parametrize("value", ["yes", 1, None, "True"])
def test_cuda_graph_bad_value(value):
    with pytest.raises(ValueError, match=r"cuda_graph must be 'auto', True or False"):
        fastdiff.sample(Toy(), SHAPE, steps=3, generator=0, cuda_graph=value)


# ---- eager plans are reused across calls like the last one ---------------------------------------------


def test_eager_plan_is_reused_with_new_values_and_results_stay_put():
    sample_module = importlib.import_module("fastdiff.sampling.sample")

    sample_module._plans.clear()
    model = Toy()
    a = fastdiff.sample(model, SHAPE, steps=5, generator=1, **GUIDED)
    a_copy = a.clone()
    assert len(sample_module._plans) == 1
    plan = next(iter(sample_module._plans.values()))
    assert plan.config is None  # a kept plan holds no model, kwargs or noise between calls
    b = fastdiff.sample(
        model, SHAPE, steps=5, generator=2, cfg=1.5, cond={"y": torch.full((3,), 2.0)}, uncond={"y": torch.zeros(3)}
    )
    assert next(iter(sample_module._plans.values())) is plan and len(sample_module._plans) == 1
    assert torch.equal(a, a_copy)  # the reused plan did not write into the first call's result
    sample_module._plans.clear()
    fresh = fastdiff.sample(
        model, SHAPE, steps=5, generator=2, cfg=1.5, cond={"y": torch.full((3,), 2.0)}, uncond={"y": torch.zeros(3)}
    )
    assert torch.equal(b, fresh)


def test_eager_plans_are_dropped_with_their_model():
    import gc

    sample_module = importlib.import_module("fastdiff.sampling.sample")

    sample_module._plans.clear()
    model = Toy()
    fastdiff.sample(model, SHAPE, steps=3, generator=0)
    assert len(sample_module._plans) == 1
    del model
    gc.collect()
    assert len(sample_module._plans) == 0


def test_classifier_guidance_does_not_reuse_a_plain_plan():
    model = Toy()
    plain = fastdiff.sample(model, SHAPE, steps=3, generator=0)
    guided = fastdiff.sample(model, SHAPE, steps=3, generator=0, classifier_grad=lambda x, t: torch.ones_like(x))
    assert not torch.equal(plain, guided)


def test_triton_loop_step_samples_like_the_reference_and_is_capturable():
    """The Triton kernel (the interpreter on CPU tensors here) drives the same loop: one custom op a step."""
    pytest.importorskip("triton", reason="triton is not installed")
    from conftest import cpu_tensor_skip_reason

    reason = cpu_tensor_skip_reason("triton")
    if reason:
        pytest.skip(reason)
    kw = dict(steps=4, generator=3, eta=0.5, **GUIDED)
    ref = fastdiff.sample(Toy(), SHAPE, backend="reference", **kw)
    got = fastdiff.sample(Toy(), SHAPE, backend="triton", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    report = capture_check(Toy(), SHAPE, backend="triton", **kw)
    assert report.loop_ops == {"fastdiff.sampler_loop_step_triton": 1}, str(report)
