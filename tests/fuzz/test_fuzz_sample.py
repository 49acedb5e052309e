"""``fastdiff.sample()`` with arbitrary, often invalid, keyword arguments, and the nn modules.

The property: a call either returns a finite batch of the right shape and dtype that the "reference"
and "cpu" backends agree on, or raises TypeError/ValueError whose message names one of the arguments
given (BackendUnavailableError, the documented error of an explicit backend that cannot run, is
accepted with its reasons). Never another exception, NaN from finite inputs, or a hang."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tier needs hypothesis (pip install -e '.[test]')")
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff.backends import BackendUnavailableError
from fastdiff.models import GaussianMixtureDenoiser

from .strategies import examples, failure

INVALID = object()  # marks a drawn value as one of the invalid choices (for the printout only)

# Per keyword: valid values first, then invalid ones. Only small, cheap valid values.
CHOICES: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    "sampler": (("ddim", "ddpm"), ("euler", "", None, 3)),
    "steps": ((1, 2, 3, 5), (0, -1, 10**6, 2.5, "3", None, True)),
    "cfg": ((None, 1.0, 3.0, 0.0, -2.0, 7), (float("nan"), float("inf"), "4", True)),
    "eta": ((0.0, 0.5, 1.0), (-0.1, 1.5, float("nan"), "0", None)),
    "shape": (
        ((2, 3, 4, 4), (1, 1, 5), (3, 2, 1, 1), (2, 4, 3, 5, 2)),
        ((), (2,), (2, 0, 3), (2, -1, 3), (2.0, 3), "ab", 5),
    ),
    "dtype": (
        (None, torch.float32, torch.float64, torch.float16, torch.bfloat16),
        (torch.int64, torch.bool, "float32", float),
    ),
    "device": ((None, "cpu", torch.device("cpu")), ("bogus", "cuda:7", 3)),
    "schedule": (("linear", "scaled_linear", "cosine", "squaredcos_cap_v2"), ("nope", 3, None)),
    "timestep_spacing": (("leading", "trailing", "linspace"), ("bogus", 1)),
    "steps_offset": ((0, 1), (-1, 1.5, "1")),
    "prediction": (("eps", "v", "x0"), ("noise", None)),
    "variance": ((None, "fixed_small", "fixed_large", "learned_range"), ("bogus", 1)),
    "clip_x0": ((None, True, False, 1.0, 2), (0, -1.0, float("nan"), float("inf"), "1")),
    "dynamic_threshold": ((None, 0.9, (0.995, 1.5)), (1.5, -0.1, (0.9,), "a", float("nan"), (0.9, -1.0))),
    "generator": ((None, 0, 123, "torch.Generator(7)"), (-1, 2**70, "seed", 1.5)),
    "noise": ((None, "like-shape"), ("int-tensor", [1.0, 2.0], "wrong-shape", "nan-tensor")),
    "cond": ((None, "labels"), ("not-a-dict", "wrong-batch")),
    "uncond": ((None, "null-labels"), ("not-a-dict", "wrong-batch")),
    "backend": (("auto", "reference", "cpu"), ("bogus", "cuda", None)),
}
# Words a message may use for an argument besides its own name.
ALIASES = {
    "cond": ("cond", "kwargs"),
    "uncond": ("uncond", "kwargs"),
    "noise": ("noise", "shape"),
    "schedule": ("schedule", "alphas", "timesteps"),
    "generator": ("generator", "seed"),
}
DTYPE_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@dataclasses.dataclass
class Call:
    kwargs: dict[str, Any]
    invalid: tuple[str, ...]
    model: str

    def __repr__(self) -> str:
        return f"Call(model={self.model!r}, invalid={self.invalid}, kwargs={self.kwargs})"


@st.composite
def calls(draw) -> Call:
    kwargs, invalid = {}, []
    for name, (good, bad) in CHOICES.items():
        roll = draw(st.integers(0, 9))
        if roll < 4:
            continue  # the default
        if roll == 9:
            kwargs[name] = draw(st.sampled_from(bad))
            invalid.append(name)
        else:
            kwargs[name] = draw(st.sampled_from(good))
    if "shape" not in kwargs and kwargs.get("noise") in (None, "like-shape"):
        kwargs["shape"] = draw(st.sampled_from(CHOICES["shape"][0]))
    return Call(kwargs, tuple(invalid), draw(st.sampled_from(("linear", "mixture"))))


def _materialize(call: Call) -> tuple[Any, dict[str, Any]]:
    """The model and the keyword arguments of a drawn call (tensors built fresh for every run)."""
    kw = dict(call.kwargs)
    shape = kw.get("shape")
    valid_shape = isinstance(shape, tuple) and len(shape) >= 2 and all(type(s) is int and s > 0 for s in shape)
    B = shape[0] if valid_shape else 2
    learned = kw.get("variance") == "learned_range"
    if call.model == "mixture" and valid_shape:
        event = shape[1:]
        gen = torch.Generator().manual_seed(1)
        means = torch.randn((2, *event), generator=gen, dtype=torch.float64)
        mix = GaussianMixtureDenoiser(
            means,
            [0.3, 0.5],
            [0.5, 0.5],
            fastdiff.Schedule("linear"),
            prediction=kw.get("prediction", "eps") if kw.get("prediction") in ("eps", "v", "x0") else "eps",
        )

        def model(x, t, y=None):
            out = mix(x, t, y=y).to(x.dtype)
            return torch.cat([out, torch.zeros_like(out)], 1) if learned else out
    else:

        def model(x, t, **kwargs):
            return torch.cat([0.1 * x, torch.zeros_like(x)], 1) if learned else 0.1 * x

    noise = kw.get("noise")
    if isinstance(noise, str):
        like = shape if valid_shape else (2, 3, 4, 4)
        kw["noise"] = {
            "like-shape": lambda: torch.randn(like, generator=torch.Generator().manual_seed(3)),
            "int-tensor": lambda: torch.ones(like, dtype=torch.int64),
            # seeded, as every tensor here: the runs compared must see the same noise
            "wrong-shape": lambda: torch.randn(B + 1, 3, 2, 2, generator=torch.Generator().manual_seed(4)),
            "nan-tensor": lambda: torch.full(like, float("nan")),
        }[noise]()
    for name, labels in (("cond", "labels"), ("uncond", "null-labels")):
        v = kw.get(name)
        if v == labels:
            kw[name] = {"y": torch.arange(B) % 2 if name == "cond" else torch.full((B,), 2)}
        elif v == "not-a-dict":
            kw[name] = "y"
        elif v == "wrong-batch":
            kw[name] = {"y": torch.zeros(B + 1, dtype=torch.int64)}
    if kw.get("generator") == "torch.Generator(7)":
        kw["generator"] = torch.Generator().manual_seed(7)
    return model, kw


def _run(call: Call, backend: str | None = None):
    model, kw = _materialize(call)
    if backend is not None:
        kw["backend"] = backend
    torch.manual_seed(0)  # generator=None draws from the global RNG: the same numbers on each run
    return fastdiff.sample(model, **kw)


def _names_an_argument(message: str, call: Call) -> bool:
    words = ["model"]
    for name in call.kwargs:
        words += ALIASES.get(name, (name,))
    return any(w in message for w in words)


@settings(max_examples=examples(200))
@given(call=calls())
def test_sample_arguments(call):
    what = repr(call)
    try:
        x = _run(call)
    except BackendUnavailableError as e:
        assert e.reasons, f"{what}: refused without reasons"
        return
    except (TypeError, ValueError) as e:
        event(f"rejected: {type(e).__name__}")
        if not _names_an_argument(str(e), call):
            raise failure("sample", "unnamed")(f"{what}: {type(e).__name__} names no argument: {e}") from e
        return
    except Exception as e:  # noqa: BLE001 - the property
        raise failure("sample", type(e).__name__)(f"{what}: raised {type(e).__name__}: {e}") from e
    event("sampled")
    kw = _materialize(call)[1]
    noise = kw.get("noise")
    dtype = kw.get("dtype") or (noise.dtype if isinstance(noise, torch.Tensor) else torch.float32)
    shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else kw["shape"]
    if tuple(x.shape) != shape or x.dtype != dtype:
        raise failure("sample", "shape")(f"{what}: returned {tuple(x.shape)} {x.dtype}, expected {shape} {dtype}")
    finite_inputs = not isinstance(noise, torch.Tensor) or bool(noise.isfinite().all())
    ref = _run(call, "reference")
    if finite_inputs and not bool(ref.isfinite().all()):
        raise failure("sample", "reference_nan")(f"{what}: backend='reference' gives NaN/Inf from finite inputs")
    cpu = _run(call, "cpu")
    tol = DTYPE_TOL[dtype]
    if kw.get("sampler") == "ddpm" or kw.get("eta", 0) > 0:
        # Step noise is Philox drawn in the kernel, whose Box-Muller runs in float32 on every backend but
        # the reference (float64): float64 samples differ by float32-rounded normals, amplified through
        # the steps, so they are held to float32's tolerance (documented in ops.sampler_step).
        tol = max(tol, DTYPE_TOL[torch.float32])
    both = ref.isfinite()
    if not torch.equal(both, cpu.isfinite()):
        raise failure("sample", "cpu_nonfinite")(
            f"{what}: cpu non-finite at {int((both != cpu.isfinite()).sum())} elements where the reference is not"
        )
    try:
        torch.testing.assert_close(cpu[both], ref[both], atol=tol, rtol=tol)
    except AssertionError as e:
        raise failure("sample", "cpu_vs_reference")(f"{what}: backend='cpu' differs from 'reference': {e}") from None


# ---- the nn modules ----------------------------------------------------------------------------------


@st.composite
def module_cases(draw) -> dict[str, Any]:
    return dict(
        kind=draw(
            st.sampled_from(("AdaGroupNorm", "AdaLayerNorm", "SpatialSelfAttention", "CrossAttention", "Conv3x3"))
        ),
        B=draw(st.sampled_from((1, 2, 3))),
        C=draw(st.sampled_from((8, 12, 32))),
        HW=draw(st.sampled_from(((1, 1), (3, 5), (7, 7), (4, 9)))),
        ctx=draw(st.sampled_from((1, 7, 77))),
        dtype=draw(st.sampled_from((torch.float32, torch.float64, torch.float16, torch.bfloat16))),
        channels_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _module_output(spec: dict[str, Any], backend: str) -> torch.Tensor:
    """The module of ``spec`` (same weights for every backend) applied to the same inputs."""
    from fastdiff import nn as fnn

    torch.manual_seed(spec["seed"])
    B, C, (H, W), dtype, kind = spec["B"], spec["C"], spec["HW"], spec["dtype"], spec["kind"]
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    x = torch.randn(B, C, H, W).to(dtype).contiguous(memory_format=fmt)
    if kind == "AdaGroupNorm":
        m = fnn.AdaGroupNorm(C, 4, backend=backend)
        torch.nn.init.normal_(m.weight)
        args = (x, torch.randn(B, C).to(dtype), torch.randn(B, C).to(dtype))
    elif kind == "AdaLayerNorm":
        m = fnn.AdaLayerNorm(C, elementwise_affine=True, backend=backend)
        args = (x.flatten(2).transpose(1, 2), torch.randn(B, C).to(dtype), torch.randn(B, C).to(dtype))
    elif kind == "SpatialSelfAttention":
        m = fnn.SpatialSelfAttention(C, num_heads=2, num_groups=4, zero_init=False, backend=backend)
        args = (x,)
    elif kind == "CrossAttention":
        m = fnn.CrossAttention(C, context_dim=24, heads=2, dim_head=8, backend=backend)
        args = (x.flatten(2).transpose(1, 2), torch.randn(B, spec["ctx"], 24).to(dtype))
    else:
        m = fnn.Conv3x3(C, C, backend=backend)
        args = (x,)
    repr(m)
    with torch.no_grad():
        return m.to(dtype)(*args)


@settings(max_examples=examples(25))
@given(spec=module_cases())
def test_nn_modules_match_their_reference(spec):
    """Every fastdiff.nn module on auto against the same module on backend="reference"."""
    what = f"module {spec}"
    ref = _module_output(spec, "reference")
    out = _module_output(spec, "auto")
    if out.shape != ref.shape or out.dtype != ref.dtype:
        raise failure("module", "shape")(f"{what}: {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {ref.dtype}")
    tol = DTYPE_TOL[spec["dtype"]] * 10
    try:
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    except AssertionError as e:
        raise failure("module", "auto_vs_reference")(f"{what}: {e}") from None
