"""The backend registry: names, per-op extra backends, FASTDIFF_BACKEND, the support table, and
honest refusals."""

from __future__ import annotations

import pytest
import torch

from fastdiff import _native
from fastdiff.backends import (
    AUTO,
    AVAILABLE,
    BACKENDS,
    PRIORITY,
    BackendUnavailableError,
    ExplicitOnly,
    Kernel,
    Limit,
    OpSupport,
    _compiled_for,
    always_available,
    known_backends,
    registered_ops,
    resolve_backend,
    select_backend,
    support_table,
)
from fastdiff.ops import attention, group_norm_adagn
from fastdiff.reference import attention as reference_attention
from fastdiff.reference import group_norm_adagn as reference_group_norm_adagn

OPS = ("attention", "cfg_combine", "conv3x3", "group_norm_adagn")


@pytest.mark.parametrize("name", (AUTO, *BACKENDS))
def test_resolve_accepts_every_name(name):
    assert resolve_backend(name) == name


def test_resolve_follows_ops_registering_and_leaving():
    """resolve_backend remembers the accepted names; an op registering or leaving with an extra
    backend must change them."""
    from fastdiff.backends import register_op, unregister_op

    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("demo_extra")
    reasons = {**dict.fromkeys(BACKENDS, always_available), "demo_extra": always_available}
    register_op(OpSupport("demo_extra_op", reasons))
    try:
        assert resolve_backend("demo_extra") == "demo_extra"
        assert resolve_backend("demo_extra", "demo_extra_op") == "demo_extra"
    finally:
        unregister_op("demo_extra_op")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("demo_extra")


@pytest.mark.parametrize("bad", ["CUDA", "gpu", "", None, 3])
def test_resolve_rejects_unknown_names_naming_the_argument(bad):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'cuda', 'triton'"):
        resolve_backend(bad)


def test_extra_backends_belong_to_their_op():
    """attention has sdpa and xformers; other ops reject those names, naming the op and what it takes."""
    assert known_backends()[: len(BACKENDS)] == BACKENDS
    assert {"sdpa", "xformers"} <= set(known_backends())
    assert resolve_backend("sdpa", "attention") == "sdpa"
    with pytest.raises(
        ValueError,
        match=r"cfg_combine: backend must be one of \('auto', 'reference', 'cpu', "
        r"'cuda', 'triton'\), got 'sdpa'",
    ):
        resolve_backend("sdpa", "cfg_combine")


def test_env_var_naming_an_extra_backend_leaves_other_ops_on_auto(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "sdpa")
    assert resolve_backend("reference", "attention") == "sdpa"
    assert resolve_backend("cpu", "cfg_combine") == "auto"
    x = torch.randn(2, 3)
    assert select_backend("cfg_combine", "reference", {"model_out": x}) in ("cpu", "reference")


def test_env_var_overrides_the_argument(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    assert resolve_backend("cuda") == "reference"
    monkeypatch.setenv("FASTDIFF_BACKEND", " CPU ")  # shell values are forgiven case and spaces
    assert resolve_backend("auto") == "cpu"
    monkeypatch.setenv("FASTDIFF_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"FASTDIFF_BACKEND must be one of .* got 'fastest'"):
        resolve_backend("auto")
    monkeypatch.setenv("FASTDIFF_BACKEND", "")  # empty means unset
    assert resolve_backend("triton") == "triton"


def test_priority_covers_every_backend_and_ends_with_the_reference():
    assert sorted(PRIORITY) == sorted(BACKENDS)
    assert PRIORITY[-1] == "reference"


def test_every_op_is_registered_for_every_backend():
    ops = registered_ops()
    for op in OPS:
        assert op in ops
        for backend in BACKENDS:
            assert isinstance(ops[op].why_not(backend, None), list)


def test_op_support_must_cover_every_backend():
    with pytest.raises(ValueError, match=r"no kernel for backends \['triton'\]"):
        OpSupport("half_done", {"reference": always_available, "cpu": always_available, "cuda": always_available})


def _everywhere(**extra):
    return {b: always_available for b in BACKENDS} | extra


def test_extra_backends_go_before_the_reference_unless_ordered():
    support = OpSupport("demo", _everywhere(fast=always_available, other=always_available))
    assert support.priority == (*PRIORITY[:-1], "fast", "other", "reference")
    ordered = ("fast", "cuda", "triton", "cpu", "other", "reference")
    assert OpSupport("demo", _everywhere(fast=always_available, other=always_available), ordered).priority == ordered
    with pytest.raises(ValueError, match=r"priority \('cuda', 'reference'\) must order exactly the backends"):
        OpSupport("demo", _everywhere(), ("cuda", "reference"))
    with pytest.raises(ValueError, match=r"backend names must be identifiers other than 'auto', got 'auto'"):
        OpSupport("demo", _everywhere(auto=always_available))


def test_explicit_only_reasons_keep_auto_away_but_not_an_explicit_request():
    from fastdiff.backends import register_op

    def slow(inputs):
        return [ExplicitOnly("slow: only when asked")] if inputs is not None else []

    register_op(OpSupport("demo_explicit", _everywhere(slow=slow), ("slow", "cuda", "triton", "cpu", "reference")))
    x = {"x": torch.randn(2)}
    try:
        assert select_backend("demo_explicit", "auto", x) == "cuda"  # the next in its order
        assert select_backend("demo_explicit", "slow", x) == "slow"
    finally:
        from fastdiff.backends import unregister_op

        unregister_op("demo_explicit")


def test_support_table_is_available_or_reasons():
    table = support_table()
    assert set(OPS) <= set(table)
    status = _native.status()
    for op, row in table.items():
        assert list(row) == list(registered_ops()[op].priority)
        assert row["reference"] == AVAILABLE, op
        for backend, verdict in row.items():
            assert verdict == AVAILABLE or (isinstance(verdict, list) and verdict and all(verdict)), (op, backend)
        if op not in (
            "attention",
            "sampler_step",
            "sampler_loop_step",
            "group_norm_adagn",
            "layer_norm_modulate",
        ):  # Triton kernels
            assert any("not implemented for this op yet" in r for r in row["triton"]), op
    assert list(table["attention"]) == ["cuda", "triton", "cpu", "xformers", "sdpa", "reference"]
    assert table["attention"]["sdpa"] == AVAILABLE
    for op in ("cfg_combine", "conv3x3", "group_norm_adagn", "sampler_step", "sampler_loop_step"):
        if status["built"]:
            assert table[op]["cpu"] == AVAILABLE
        else:
            assert table[op]["cpu"] == [f"fastdiff._C not built ({status['reason']})"]
        if not torch.cuda.is_available():
            assert table[op]["cuda"] != AVAILABLE
    for backend in ("cpu", "cuda"):
        assert any("not implemented for this op yet" in r for r in table["attention"][backend])


@pytest.mark.parametrize(
    ("capability", "archs", "runs"),
    [
        ((8, 0), ["8.0", "9.0"], True),
        ((8, 6), ["8.0", "9.0"], True),  # sm_80 cubins run on later minors of Ampere
        ((8, 9), ["8.0", "9.0"], True),
        ((9, 0), ["8.0", "9.0"], True),
        ((7, 5), ["8.0", "9.0"], False),  # too old
        ((10, 0), ["8.0", "9.0"], False),  # new major, no PTX to JIT from
        ((10, 0), ["8.0+PTX"], True),
        ((9, 0), ["9.0a"], True),
        ((9, 1), ["9.0a"], False),  # arch-specific code runs only on exactly that GPU
    ],
)
def test_compiled_archs_cover_a_gpu(capability, archs, runs):
    assert _compiled_for(capability, archs) is runs


def test_explicit_backend_that_cannot_run_raises_with_every_reason():
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(BackendUnavailableError, match=r"group_norm_adagn: backend='triton' cannot run") as info:
        group_norm_adagn(x.double(), 4, backend="triton")
    assert "x dtype torch.float64 not supported (supported: float32, float16, bfloat16)" in info.value.reasons
    with pytest.raises(BackendUnavailableError, match=r"attention: backend='triton' cannot run") as info:
        attention(x.double(), x.double(), x.double(), backend="triton")
    assert "q dtype torch.float64 not supported (supported: float32, float16, bfloat16)" in info.value.reasons


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_ops_without_kernels_run_the_reference(backend):
    x = torch.randn(2, 8, 5, 3)
    scale, shift = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(
        group_norm_adagn(x, 4, scale=scale, shift=shift, activation="silu", backend=backend),
        reference_group_norm_adagn(x, 4, scale=scale, shift=shift, activation="silu"),
    )
    q, k, v = torch.randn(2, 3, 7, 40), torch.randn(2, 3, 77, 40), torch.randn(2, 3, 77, 40)
    torch.testing.assert_close(attention(q, k, v, backend=backend), reference_attention(q, k, v))
    # attention's auto picks PyTorch's SDPA on the CPU (fastdiff has no CPU attention kernel)
    expected = "sdpa" if backend == "auto" else "reference"
    assert select_backend("attention", backend, {"q": q, "k": k, "v": v}) == expected


def test_ops_keep_the_reference_validation():
    with pytest.raises(ValueError, match="channels"):
        group_norm_adagn(torch.randn(1, 6, 2, 2), 4)
    with pytest.raises(TypeError, match="q must be a tensor"):
        attention("q", torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))


def _counting_op(name: str, cpu_refuses: list[str]):
    """A throwaway op whose cpu reasons function counts its calls and refuses while told to."""
    from fastdiff.backends import register_op, unregister_op

    calls = {"cpu": 0}

    def cpu(inputs):
        calls["cpu"] += 1
        return list(cpu_refuses)

    def never(inputs):
        return ["not here"]

    register_op(OpSupport(name, {"reference": always_available, "cpu": cpu, "cuda": never, "triton": never}))
    return calls, lambda: unregister_op(name)


def _declared_op(name: str, limit_calls: list[int], refuses: list[str]):
    """A throwaway declared op: a float32 CPU "library" kernel with a counted limit, the reference,
    and no GPU kernels."""
    from fastdiff.backends import register_op, unregister_op

    def broken(inputs):
        limit_calls.append(1)
        return refuses[0] if refuses else None

    support = register_op(
        OpSupport(
            name,
            {
                "reference": Kernel("reference", lambda x: ("reference", x)),
                "cpu": Kernel(
                    "library",
                    lambda x: ("cpu", x),
                    dtypes=(torch.float32,),
                    devices=("cpu",),
                    limits=(Limit("told to", broken),),
                ),
                "cuda": Kernel("missing"),
                "triton": Kernel("missing"),
            },
            inputs=lambda x: {"x": x},
            prepare=lambda x, backend, checked=True: (x,),
        )
    )
    return support, lambda: unregister_op(name)


def test_declared_ops_resolve_once_per_signature(monkeypatch):
    """A declared op is resolved once per call signature (devices, dtypes, which inputs, backend,
    FASTDIFF_BACKEND, the loaded _C) and the binding reused; explicit refusals are never kept."""
    import fastdiff.backends as backends

    resolved = []
    real_select = backends._select
    monkeypatch.setattr(backends, "_select", lambda *a: resolved.append(a[1]) or real_select(*a))
    refuses: list[str] = []
    support, unregister = _declared_op("_declared_op", [], refuses)
    try:
        x = torch.randn(3, 4)
        assert select_backend("_declared_op", AUTO, {"x": x}) == "cpu"
        assert select_backend("_declared_op", AUTO, {"x": torch.randn(7)}) == "cpu"  # same device and dtype
        assert support(AUTO, x) == ("cpu", x)
        assert len(resolved) == 1
        assert select_backend("_declared_op", AUTO, {"x": x.double()}) == "reference"
        assert select_backend("_declared_op", "cpu", {"x": x}) == "cpu"
        monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
        assert select_backend("_declared_op", AUTO, {"x": x}) == "reference"
        assert support(AUTO, x)[0] == "reference"
        monkeypatch.delenv("FASTDIFF_BACKEND")
        assert len(resolved) == 4
        monkeypatch.setattr(_native, "generation", _native.generation + 1)  # a reloaded _C: decided afresh
        assert select_backend("_declared_op", AUTO, {"x": x}) == "cpu"
        assert len(resolved) == 5
        refuses.append("simulated: told to refuse")
        for _ in range(2):
            with pytest.raises(BackendUnavailableError, match="simulated: told to refuse"):
                select_backend("_declared_op", "cpu", {"x": x})
        assert len(resolved) == 7
    finally:
        unregister()


def test_limits_are_read_where_they_take_part():
    """A backend's limits join the signature only where that backend passed every other rule: the
    cpu kernel's limit is read on every float32 CPU call (and its outcome picks the binding), never
    again for float64 inputs, which the kernel refuses by dtype whatever the limit says."""
    limit_calls: list[int] = []
    refuses: list[str] = []
    support, unregister = _declared_op("_limited_op", limit_calls, refuses)
    try:
        x = torch.randn(3, 4)
        assert support(AUTO, x)[0] == "cpu"
        refuses.append("simulated: past the limit")
        assert support(AUTO, x)[0] == "reference"  # same devices and dtypes, other limit outcome
        refuses.clear()
        assert support(AUTO, x)[0] == "cpu"
        assert len(limit_calls) >= 3
        wide = x.double()
        assert support(AUTO, wide)[0] == "reference"
        before = len(limit_calls)
        for _ in range(3):
            assert support(AUTO, wide)[0] == "reference"
        assert len(limit_calls) == before
        assert "told to" in support.describe()["cpu"]["limits"]
    finally:
        unregister()


def test_ops_declared_with_reasons_functions_decide_every_call():
    calls, unregister = _counting_op("_uncached_op", [])
    try:
        for _ in range(3):
            assert select_backend("_uncached_op", AUTO, {"x": torch.randn(2)}) == "cpu"
        assert calls["cpu"] == 3
    finally:
        unregister()


def test_every_registered_op_is_fully_declared():
    """Every op's backends are Kernel declarations (what info, the errors and the tests read)."""
    for op, support in registered_ops().items():
        assert all(isinstance(k, Kernel) for k in support.kernels.values()), op
        assert support.inputs is not None, op
        assert set(support.describe()) == set(support.backends), op


# ---- the float32 CPU path of group_norm_adagn, conv3x3 and layer_norm_modulate --------------------


def _fast_path_inputs(op: str) -> dict[str, torch.Tensor]:
    if op == "group_norm_adagn":
        return {"x": torch.randn(2, 8, 3, 3), "weight": torch.randn(8), "scale": torch.randn(2, 8)}
    if op == "layer_norm_modulate":
        return {"x": torch.randn(2, 5, 8), "scale": torch.randn(2, 8), "shift": torch.randn(2, 8)}
    return {"x": torch.randn(2, 4, 5, 5), "weight": torch.randn(3, 4, 3, 3)}


def _call(op: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    import fastdiff

    if op == "group_norm_adagn":
        return fastdiff.ops.group_norm_adagn(inputs["x"], 2, inputs["weight"], scale=inputs["scale"])
    if op == "layer_norm_modulate":
        return fastdiff.ops.layer_norm_modulate(inputs["x"], scale=inputs["scale"], shift=inputs["shift"])
    return fastdiff.ops.conv3x3(inputs["x"], inputs["weight"])


_BAD = {  # op -> (a call its Python checks refuse once the signature is bound, the error's words)
    "group_norm_adagn": (lambda i: _call("group_norm_adagn", {**i, "weight": torch.randn(5)}), "weight"),
    "layer_norm_modulate": (lambda i: _call("layer_norm_modulate", {**i, "scale": torch.randn(2, 7)}), "scale"),
    "conv3x3": (lambda i: _call("conv3x3", {**i, "weight": torch.randn(3, 5, 3, 3)}), "weight"),
}


@pytest.mark.skipif(not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}")
@pytest.mark.parametrize("op", ["group_norm_adagn", "conv3x3", "layer_norm_modulate"])
def test_bound_native_cpu_calls_keep_the_ops_errors_and_follow_the_override(op, monkeypatch):
    """Once a float32 CPU signature is bound to the cpu kernel, calls skip the Python checks (the
    kernel checks the same rules): a bad argument still gets the op's own error, and FASTDIFF_BACKEND
    still steers the call (here to the reference, which must then run)."""
    inputs = _fast_path_inputs(op)
    assert select_backend(op, AUTO, inputs) == "cpu"
    module = __import__(f"fastdiff.ops.{op}", fromlist=["_"])
    reference_calls = []
    original = getattr(module, f"_reference_{op}")

    def spy(*args, **kwargs):
        reference_calls.append(op)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, f"_reference_{op}", spy)
    expected = _call(op, inputs)
    assert reference_calls == []  # the native kernel ran
    bad, words = _BAD[op]
    with pytest.raises(ValueError, match=f"{op}: {words}"):
        bad(inputs)
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    torch.testing.assert_close(_call(op, inputs), expected, rtol=1e-4, atol=1e-4)
    assert reference_calls == [op]


@pytest.mark.skipif(not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}")
def test_bind_runs_the_chosen_kernel_like_the_op():
    g = torch.Generator().manual_seed(0)
    x, w, s = torch.randn(2, 8, 3, 3, generator=g), torch.randn(8, generator=g), torch.randn(2, 8, generator=g)
    support = registered_ops()["group_norm_adagn"]
    bound = support.bind(AUTO, x, 2, w, None, s, None, None, 1e-5, "silu")
    assert bound.backend == select_backend("group_norm_adagn", AUTO, {"x": x, "weight": w, "scale": s}) == "cpu"
    torch.testing.assert_close(
        bound(x, 2, w, None, s, None, None, 1e-5, "silu"),
        group_norm_adagn(x, 2, w, scale=s, activation="silu"),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="group_norm_adagn: activation"):
        support.bind(AUTO, x, 2, w, None, s, None, None, 1e-5, "relu")


@pytest.mark.skipif(not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}")
def test_native_autograd_kernel_records_a_graph_only_when_one_is_needed():
    """The native ops' Autograd kernel (C++): without grad the call reaches the backend kernel with
    no graph (dispatch modes such as FakeTensor, profilers and flop counters still see it); with an
    input requiring grad it records the graph through the op's Python backward formula."""
    from torch.utils._python_dispatch import TorchDispatchMode

    op = torch.ops.fastdiff.conv3x3.default
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, generator=g, requires_grad=True)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with Seen() as seen:
            out = op(x, w, None, None)
    assert op in seen.ops
    assert not out.requires_grad and out.grad_fn is None
    with_grad = op(x, w, None, None)
    assert with_grad.requires_grad and with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad.detach(), out, rtol=0, atol=0)
    with_grad.sum().backward()
    gx, gw = torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=1).sum(), (x, w))
    torch.testing.assert_close(x.grad, gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, gw, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}")
def test_a_part_on_another_device_gets_the_ops_error_after_the_signature_is_bound():
    """A call's signature keys on the first input's device only (the op's validation puts every
    input there): a part on another device, once a valid call bound the signature, still raises the
    op's own error naming it."""
    import fastdiff

    x, w, s = torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(2, 8)
    fastdiff.ops.group_norm_adagn(x, 2, w, scale=s)
    with pytest.raises(ValueError, match="group_norm_adagn: scale is on meta but x is on cpu"):
        fastdiff.ops.group_norm_adagn(x, 2, w, scale=s.to("meta"))
    tokens = torch.randn(2, 5, 8)
    fastdiff.ops.layer_norm_modulate(tokens, scale=s)
    with pytest.raises(ValueError, match="layer_norm_modulate: scale is on meta but x is on cpu"):
        fastdiff.ops.layer_norm_modulate(tokens, scale=s.to("meta"))
    weight = torch.randn(3, 8, 3, 3)
    fastdiff.ops.conv3x3(x, weight)
    with pytest.raises(ValueError, match="conv3x3: bias is on meta but x is on cpu"):
        fastdiff.ops.conv3x3(x, weight, torch.randn(3, device="meta"))


def test_a_malformed_input_gets_the_ops_error_where_the_limits_take_part():
    """Where the limits take part in a signature's choice they run before the op's checks, on every
    call; a malformed input that breaks a limit function (too few dims to unpack) must still get
    the op's own error, not the limit's."""
    from fastdiff.backends import register_op, unregister_op

    def validate(x):
        if x.dim() != 2:
            raise ValueError(f"_shaped_op: x must be 2-D, got {x.dim()}-D")

    def too_wide(inputs):
        rows, cols = inputs["x"].shape  # raises on any other rank
        return "too wide" if cols > 100 else None

    support = register_op(
        OpSupport(
            "_shaped_op",
            {
                "reference": Kernel("reference", lambda x: "reference"),
                "cpu": Kernel("library", lambda x: "cpu", devices=("cpu",), limits=(Limit("cols <= 100", too_wide),)),
                "cuda": Kernel("missing"),
                "triton": Kernel("missing"),
            },
            inputs=lambda x: {"x": x},
            validate=validate,
            prepare=lambda x, backend, checked=True: (validate(x), x)[1:],
        )
    )
    try:
        assert support(AUTO, torch.randn(2, 3)) == "cpu"
        assert support(AUTO, torch.randn(2, 300)) == "reference"
        with pytest.raises(ValueError, match="_shaped_op: x must be 2-D, got 1-D"):
            support(AUTO, torch.randn(5))
    finally:
        unregister_op("_shaped_op")
