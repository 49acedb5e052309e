"""fastdiff.sample: the model contract, reproducibility, and every bad input named in the issue."""

from __future__ import annotations

import types

import pytest
import torch

import fastdiff
from fastdiff.models import GaussianMixtureDenoiser

SHAPE = (3, 2, 4, 4)


class Toy(torch.nn.Module):
    """A deterministic model with a parameter (so sample() can infer its device)."""

    def __init__(self, out_factor: int = 1, returns: str = "tensor"):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.out_factor = out_factor
        self.returns = returns
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], t.clone(), None if y is None else y.clone()))
        out = torch.tanh(self.w * x + t.view(-1, *[1] * (x.dim() - 1)) / 1000)
        if y is not None:
            out = out + 0.1 * y.view(-1, *[1] * (x.dim() - 1))
        if self.out_factor == 2:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        if self.returns == "tuple":
            return (out,)
        if self.returns == "object":
            return types.SimpleNamespace(sample=out)
        return out


@pytest.mark.parametrize("returns", ["tensor", "tuple", "object"])
def test_model_contract_return_forms(returns):
    ref = fastdiff.sample(Toy(), SHAPE, steps=5, generator=0)
    out = fastdiff.sample(Toy(returns=returns), SHAPE, steps=5, generator=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_model_sees_int64_timesteps_of_batch_shape_and_stacked_cfg_batch():
    model = Toy()
    y = torch.tensor([1, 2, 3])
    fastdiff.sample(
        model, SHAPE, steps=4, cfg=3.0, cond={"y": y}, uncond={"y": torch.zeros(3, dtype=torch.long)}, generator=0
    )
    assert len(model.calls) == 4
    for n, t, yy in model.calls:
        assert n == 6 and t.dtype == torch.int64 and t.shape == (6,)
        assert torch.equal(yy, torch.tensor([0, 0, 0, 1, 2, 3]))  # [uncond; cond]
    assert [int(c[1][0]) for c in model.calls] == [750, 500, 250, 0]


def test_cfg_combines_as_documented():
    # With noise given, one DDIM step from the last timestep reads the guided eps directly:
    # x0 = (x - sqrt(1 - a) eps) / sqrt(a).
    def model(x, t, y):
        return y.view(-1, 1, 1, 1).float().expand_as(x)

    sched = fastdiff.Schedule()
    x = torch.randn(SHAPE)
    out = fastdiff.sample(
        model,
        noise=x,
        steps=1,
        cfg=4.0,
        cond={"y": torch.full((3,), 2.0)},
        uncond={"y": torch.full((3,), 0.5)},
        timestep_spacing="trailing",
    )
    a = sched.alphas_cumprod[999]
    eps = 0.5 + 4.0 * (2.0 - 0.5)
    torch.testing.assert_close(out, (x - (1 - a) ** 0.5 * eps) / a**0.5)


def test_same_seed_same_images_and_batch_invariance():
    sched = fastdiff.Schedule()
    model = GaussianMixtureDenoiser(torch.randn(3, 2, 4, 4), torch.full((3,), 0.2), torch.ones(3), sched)
    for sampler, kw in (("ddpm", {"steps": 20}), ("ddim", {"steps": 10, "eta": 0.7})):
        a = fastdiff.sample(model, (5, 2, 4, 4), sampler=sampler, generator=123, **kw)
        b = fastdiff.sample(model, (5, 2, 4, 4), sampler=sampler, generator=123, **kw)
        assert torch.equal(a, b)
        small = fastdiff.sample(model, (2, 2, 4, 4), sampler=sampler, generator=123, **kw)
        torch.testing.assert_close(small, a[:2], rtol=1e-6, atol=1e-6)
        other = fastdiff.sample(model, (5, 2, 4, 4), sampler=sampler, generator=124, **kw)
        assert not torch.allclose(other, a)


STOCHASTIC = [
    ("ddpm", {}),
    ("ddim", {"eta": 0.8}),
    ("euler_a", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"karras_sigmas": True}),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize(
    "sampler,kw",
    STOCHASTIC,
    ids=[f"{s}{'-karras' if kw.get('karras_sigmas') else ''}{'-eta' if 'eta' in kw else ''}" for s, kw in STOCHASTIC],
)
def test_first_image_makes_a_batch_the_same_images_of_the_whole_set(sampler, kw, backend):
    """A set of 7 images generated whole, or as batches of 3, 3 and 1 with first_image 0, 3 and 6: the
    same images, bit for bit (x_T and every step's noise follow the image's index in the set, not its
    place in the batch). The cpu backend runs the native step, triton its kernel in the interpreter
    (each skipped with its reason where it cannot run)."""
    if backend == "cpu":
        from fastdiff.ops.sampler_loop_step import SUPPORT

        why = SUPPORT.why_not("cpu", {"x_in": torch.zeros(1)})
        if why:
            pytest.skip(why)
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
        from conftest import cpu_tensor_skip_reason

        why = cpu_tensor_skip_reason("triton")
        if why:
            pytest.skip(why)
    model = Toy()
    whole = fastdiff.sample(model, (7, 2, 4, 4), sampler=sampler, steps=6, generator=11, backend=backend, **kw)
    parts = [
        fastdiff.sample(
            model, (n, 2, 4, 4), sampler=sampler, steps=6, generator=11, first_image=first, backend=backend, **kw
        )
        for first, n in ((0, 3), (3, 3), (6, 1))
    ]
    assert torch.equal(torch.cat(parts), whole)
    shifted = fastdiff.sample(
        model, (3, 2, 4, 4), sampler=sampler, steps=6, generator=11, first_image=1, backend=backend, **kw
    )
    assert not torch.allclose(shifted, whole[:3])  # the index, not only the x_T, moves the noise


def test_first_image_at_the_end_of_the_32_bit_range_and_past_it():
    model = Toy()
    top = fastdiff.sample(model, (2, 2, 4, 4), sampler="ddpm", steps=4, generator=5, first_image=2**32 - 2)
    assert torch.isfinite(top).all()
    with pytest.raises(ValueError, match=r"first_image \+ batch must be at most 2\*\*32"):
        fastdiff.sample(model, (3, 2, 4, 4), sampler="ddpm", steps=4, generator=5, first_image=2**32 - 2)


def test_generator_object_and_global_rng():
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    a = fastdiff.sample(Toy(), SHAPE, steps=3, generator=g1)
    b = fastdiff.sample(Toy(), SHAPE, steps=3, generator=g2)
    assert torch.equal(a, b)
    torch.manual_seed(9)
    c = fastdiff.sample(Toy(), SHAPE, steps=3)
    torch.manual_seed(9)
    d = fastdiff.sample(Toy(), SHAPE, steps=3)
    assert torch.equal(c, d)


def test_callback_progress_and_dtype(capsys):
    seen = []
    out = fastdiff.sample(
        Toy(),
        SHAPE,
        steps=4,
        generator=0,
        progress=True,
        dtype=torch.float64,
        callback=lambda i, t, x: seen.append((i, t, x.dtype)),
    )
    assert out.dtype == torch.float64
    assert seen == [(0, 750, torch.float64), (1, 500, torch.float64), (2, 250, torch.float64), (3, 0, torch.float64)]
    assert "4/4" in capsys.readouterr().err


def test_learned_range_with_ddpm_and_ddim():
    for sampler in ("ddpm", "ddim"):
        out = fastdiff.sample(Toy(out_factor=2), SHAPE, sampler=sampler, steps=5, variance="learned_range", generator=0)
        assert out.shape == SHAPE and torch.isfinite(out).all()


def test_learned_range_with_cfg_takes_variance_from_the_conditional_half():
    seen = []

    def model(x, t, y):
        eps = torch.zeros_like(x)
        var = y.view(-1, 1, 1, 1).float().expand_as(x)  # variance channels carry the label
        return torch.cat([eps, var], dim=1)

    def spy(i, t, x):
        seen.append(x)

    y = torch.ones(3)
    a = fastdiff.sample(
        model,
        SHAPE,
        sampler="ddpm",
        steps=3,
        variance="learned_range",
        cfg=2.0,
        cond={"y": y},
        uncond={"y": -y},
        generator=0,
        callback=spy,
    )
    b = fastdiff.sample(model, SHAPE, sampler="ddpm", steps=3, variance="learned_range", cond={"y": y}, generator=0)
    torch.testing.assert_close(a, b)


def test_check_finite_names_the_step():
    def model(x, t):
        return torch.where(t.view(-1, 1, 1, 1) < 500, torch.nan, 0.0).expand_as(x)

    with pytest.raises(FloatingPointError, match=r"step 2 \(timestep 250\)"):
        fastdiff.sample(model, SHAPE, steps=4, check_finite=True, generator=0)
    # Without the check the NaN propagates silently into the result: the flag is what catches it.
    assert torch.isnan(fastdiff.sample(model, SHAPE, steps=4, generator=0)).all()


def test_schedule_object_and_string_forms():
    sched = fastdiff.Schedule("cosine", 500)
    a = fastdiff.sample(Toy(), SHAPE, steps=5, schedule=sched, generator=0)
    b = fastdiff.sample(Toy(), SHAPE, steps=5, schedule="squaredcos_cap_v2", num_train_timesteps=500, generator=0)
    assert torch.equal(a, b)


def test_backend_argument_and_env_override(monkeypatch):
    cond, uncond = {"y": torch.ones(3)}, {"y": torch.zeros(3)}
    a = fastdiff.sample(Toy(), SHAPE, steps=3, cfg=2.0, cond=cond, uncond=uncond, generator=0, backend="reference")
    b = fastdiff.sample(Toy(), SHAPE, steps=3, cfg=2.0, cond=cond, uncond=uncond, generator=0)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="backend"):
        fastdiff.sample(Toy(), SHAPE, steps=3, backend="fastest")
    monkeypatch.setenv("FASTDIFF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        fastdiff.sample(Toy(), SHAPE, steps=3)


# ---- bad input: each case raises naming the argument and what is accepted ------------------------


def _bad(**kwargs):
    base = dict(shape=SHAPE, steps=5, generator=0)
    base.update(kwargs)
    model = base.pop("model", Toy())
    return fastdiff.sample(model, **base)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(steps=0), ValueError, r"steps must be an int in \[1, num_train_timesteps=1000\]"),
        (dict(steps=1001), ValueError, r"steps must be an int in \[1, num_train_timesteps=1000\]"),
        (dict(steps=2.5), ValueError, "steps must be an int"),
        (
            dict(sampler="heun"),
            ValueError,
            r"sampler must be one of \('ddim', 'ddpm', 'euler', 'euler_a', 'dpmpp_2m', 'dpmpp_2m_sde'\)",
        ),
        (dict(schedule="quadratic"), ValueError, "schedule must be one of"),
        (dict(prediction="epsilon"), ValueError, r"prediction must be one of \('eps', 'v', 'x0'\)"),
        (dict(timestep_spacing="uniform"), ValueError, "timestep_spacing must be one of"),
        (dict(sampler="ddpm", variance="learned"), ValueError, "variance must be None or one of"),
        (dict(variance="fixed_large"), ValueError, "applies to sampler='ddpm'"),
        (dict(eta=1.5), ValueError, r"eta must be a number in \[0, 1\]"),
        (dict(eta=-0.1), ValueError, r"eta must be a number in \[0, 1\]"),
        (dict(sampler="ddpm", eta=0.5), ValueError, "eta applies to sampler='ddim'"),
        (dict(cfg=4.0), ValueError, "cfg needs both cond and uncond"),
        (dict(cfg=4.0, cond={"y": torch.ones(3)}), ValueError, "cfg needs both cond and uncond"),
        (dict(cfg=float("nan"), cond={}, uncond={}), ValueError, "cfg must be a finite number"),
        (dict(uncond={"y": torch.ones(3)}), ValueError, "uncond is only used with cfg"),
        (
            dict(cfg=2.0, cond={"y": torch.ones(3)}, uncond={"z": torch.ones(3)}),
            ValueError,
            "cond and uncond must have the same keys",
        ),
        (
            dict(cfg=2.0, cond={"y": torch.ones(3)}, uncond={"y": torch.ones(2)}),
            ValueError,
            r"uncond\['y'\] has batch size 2 but the sample batch is 3",
        ),
        (dict(cond={"y": torch.ones(4)}), ValueError, r"cond\['y'\] has batch size 4"),
        (dict(cond=[1]), TypeError, "cond must be a dict"),
        (dict(shape=None), ValueError, "give shape"),
        (dict(shape=(3,)), ValueError, r"shape must be \(B, C, ...\)"),
        (dict(shape=5), TypeError, r"shape must be a tuple \(B, C, ...\) of positive ints, got int 5"),
        (dict(device="bogus"), ValueError, "device must be a torch.device or a device string"),
        (
            dict(device="cuda:7" if torch.cuda.device_count() < 8 else "cuda:99"),
            ValueError,
            "device 'cuda:(7|99)' is not available here",
        ),
        (dict(device="meta"), ValueError, "device 'meta' holds no data"),
        (
            dict(shape=None, noise=torch.zeros(SHAPE, dtype=torch.int32)),
            TypeError,
            "noise must be a floating-point tensor",
        ),
        (dict(noise=torch.zeros(2, 2, 4, 4)), ValueError, "does not match noise.shape"),
        (dict(dtype=torch.int64), TypeError, "dtype must be a floating torch.dtype"),
        (dict(clip_x0=-1.0), ValueError, "clip_x0 must be a positive finite number"),
        (dict(dynamic_threshold=1.5), ValueError, r"dynamic_threshold ratio must lie in \(0, 1\)"),
        (dict(dynamic_threshold=0.9, clip_x0=1.0), ValueError, "clip_x0 or dynamic_threshold, not both"),
        (dict(generator="seed"), TypeError, "generator must be an int seed"),
        (dict(first_image=-1), ValueError, "first_image must be an int >= 0, got -1"),
        (dict(first_image=True), ValueError, "first_image must be an int >= 0, got True"),
        (dict(num_train_timesteps=500, schedule=fastdiff.Schedule()), ValueError, "disagrees"),
        (dict(steps_offset=-1), ValueError, "steps_offset must be a non-negative int"),
        (
            dict(model=lambda x, t: x[:, :1]),
            ValueError,
            r"model output at step 0 has shape \(3, 1, 4, 4\), expected \(3, 2, 4, 4\)",
        ),
        (
            dict(model=lambda x, t: x, sampler="ddpm", variance="learned_range"),
            ValueError,
            r"expected \(3, 4, 4, 4\) \(2C channels for variance='learned_range'\)",
        ),
        (dict(model=lambda x, t: "eps"), TypeError, "model must return a tensor"),
        (dict(model="unet"), TypeError, "model must be callable"),
        (dict(classifier_grad=lambda x, t: x[:1], cond={}), ValueError, "classifier_grad must return a tensor"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**kwargs)


@pytest.mark.parametrize("sampler,kw", [("ddim", {"eta": 0.5}), ("ddpm", {"variance": "fixed_large"})])
def test_sampling_loop_makes_no_host_sync(sampler, kw):
    from fastdiff.profiling import count_ops

    def model(x, t, y):
        return torch.tanh(x) * 0.5

    cond, uncond = {"y": torch.ones(3)}, {"y": torch.zeros(3)}
    _, count = count_ops(
        fastdiff.sample, model, SHAPE, sampler=sampler, steps=10, cfg=3.0, cond=cond, uncond=uncond, generator=0, **kw
    )
    assert count.syncs == 0, str(count)
    assert count.ops["fastdiff.sampler_loop_step"] == 10, str(count)  # one fused op per step, guidance included
    # ... while check_finite pays exactly one sync per step, by design.
    _, checked = count_ops(
        fastdiff.sample,
        model,
        SHAPE,
        sampler=sampler,
        steps=10,
        cfg=3.0,
        cond=cond,
        uncond=uncond,
        generator=0,
        check_finite=True,
        **kw,
    )
    assert checked.syncs == 10, str(checked)


@pytest.mark.parametrize(
    "kw",
    [
        dict(sampler="ddim", eta=0.3, clip_x0=1.0),
        dict(sampler="ddpm", variance="learned_range", prediction="v"),
        dict(sampler="ddim", dynamic_threshold=(0.9, 1.2)),
    ],
)
def test_native_backend_samples_like_the_reference(kw):
    from fastdiff.backends import BackendUnavailableError

    model = Toy(out_factor=2 if kw.get("variance") == "learned_range" else 1)
    y = torch.tensor([1.0, 2.0, 3.0])
    args = dict(steps=12, cfg=2.5, cond={"y": y}, uncond={"y": torch.zeros(3)}, generator=4, **kw)
    ref = fastdiff.sample(model, SHAPE, backend="reference", **args)
    try:
        got = fastdiff.sample(model, SHAPE, backend="cpu", **args)
    except BackendUnavailableError as exc:
        pytest.skip(f"cpu backend unavailable: {exc}")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sampling_keeps_no_autograd_graph():
    """A model with trainable parameters, called outside no_grad: the samples carry no graph."""
    layer = torch.nn.Conv2d(2, 2, 1)

    def model(x, t):
        return layer(x)

    x = fastdiff.sample(model, (2, 2, 4, 4), steps=3, generator=0)
    assert not x.requires_grad and x.grad_fn is None


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize(
    "kw",
    [dict(sampler="ddim"), dict(sampler="ddpm"), dict(sampler="ddim", cfg=3.0), dict(sampler="ddim", classifier=True)],
    ids=["ddim", "ddpm", "cfg", "classifier"],
)
def test_samples_never_require_grad_even_from_noise_that_does(backend, kw):
    """Regression: noise with requires_grad gave samples with requires_grad=True whose backward left
    out the model's part (reference) or had none (native steps). sample() is not differentiable:
    its result requires no grad, the noise gets no .grad, and classifier guidance still sees grad
    mode on (it differentiates a classifier) while its result enters the step as a constant."""
    kw = dict(kw)
    seen_grad_mode = []

    def classifier_grad(x, t, **_):
        seen_grad_mode.append(torch.is_grad_enabled())
        xx = x.detach().requires_grad_()
        (g,) = torch.autograd.grad((xx**2).sum(), xx)
        return -0.01 * g.requires_grad_()  # a result that itself requires grad must not leak

    if kw.pop("classifier", False):
        kw["classifier_grad"] = classifier_grad
    if "cfg" in kw:
        kw.update(cond={"s": torch.ones(2)}, uncond={"s": torch.zeros(2)})

    def model(x, t, s=None):
        return 0.3 * x if s is None else 0.3 * x * s.view(-1, 1, 1, 1)

    noise = torch.randn(2, 3, 5, 7, requires_grad=True)
    x = fastdiff.sample(model, noise=noise, steps=4, generator=0, backend=backend, **kw)
    assert not x.requires_grad and x.grad_fn is None
    assert noise.grad is None
    with torch.no_grad():
        expected = fastdiff.sample(model, noise=noise.detach(), steps=4, generator=0, backend=backend, **kw)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    if "classifier_grad" in kw:
        assert seen_grad_mode and all(seen_grad_mode)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ddim_with_eta_ignores_learned_variance_channels(backend):
    """Regression: DDIM with variance="learned_range" and eta > 0 took its sigma from the variance
    channels' formula (which DDIM's table leaves empty: sigma 1) instead of eta's, 0.58 off at one
    step. DDIM drops those channels: sampling must equal the same model without them."""
    from fastdiff.backends import BackendUnavailableError

    def with_variance(x, t):
        return torch.cat([0.3 * x, 5 * torch.ones_like(x)], dim=1)

    def without(x, t):
        return 0.3 * x

    kw = dict(shape=(2, 3, 5, 7), steps=6, eta=0.7, generator=0, backend=backend)
    try:
        got = fastdiff.sample(with_variance, variance="learned_range", **kw)
    except BackendUnavailableError as exc:
        pytest.skip(f"{backend} backend unavailable: {exc}")
    torch.testing.assert_close(got, fastdiff.sample(without, **kw), rtol=0, atol=0)


def test_sample_refuses_eps_on_a_zero_terminal_snr_schedule():
    """Regression: rescale_zero_terminal_snr with an eps prediction returned all NaN (x0 divides by
    sqrt(alphas_cumprod) = 0 at the first step); v and x0 predictions sample it."""
    s = fastdiff.Schedule(rescale_zero_terminal_snr=True)
    kw = dict(shape=(1, 1, 2, 2), steps=5, schedule=s, timestep_spacing="trailing", generator=0)
    with pytest.raises(ValueError, match=r"prediction='eps' cannot sample timestep 999.*'v' or 'x0'"):
        fastdiff.sample(lambda x, t: 0.3 * x, **kw)
    for prediction in ("v", "x0"):
        assert torch.isfinite(fastdiff.sample(lambda x, t: 0.3 * x, prediction=prediction, **kw)).all()
