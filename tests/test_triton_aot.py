"""Every Triton build compiled for sm_80 and sm_90 without a GPU (fastdiff.triton.aot): attention's
with no spills, tensor-core MMA in the SASS and shared memory within what the GPUs offer;
group_norm_adagn's (fused, statistics and apply kernels) with no spills and registers that let a
block of their warps launch.

The first run compiles the builds in a child process (about a minute and a half on 2 cores) and
caches the report (FASTDIFF_CACHE_DIR, default ~/.cache/fastdiff); later runs read the cache
until the kernel source, the build list, Triton or ptxas change.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: nothing to compile")
from fastdiff.info import main  # noqa: E402
from fastdiff.triton import aot  # noqa: E402
from fastdiff.triton import attention as triton_attention  # noqa: E402


@pytest.fixture(scope="module")
def report() -> list[aot.TritonBuild]:
    rows = aot.attention_report()
    assert rows, "no builds"
    return rows


@pytest.fixture(scope="module")
def gn_report() -> list[aot.TritonBuild]:
    rows = aot.report("group_norm_adagn")
    assert rows, "no builds"
    return rows


def _label(r: aot.TritonBuild) -> str:
    return f"{r.arch} {r.dtype} D={r.head_dim} {r.config} {r.layout}"


def test_every_configuration_was_built_for_every_arch(report):
    built = {(r.arch, r.dtype, r.head_dim, r.config, r.layout) for r in report}
    for arch in (80, 90):
        for dtype in triton_attention.DTYPES:
            for d in aot.HEAD_DIMS:
                for config in triton_attention.configs_for(d, dtype):
                    key = (aot._compat.sm_arch(arch), str(dtype)[6:], d, str(config), "d-contig")
                    assert key in built, key
    assert {r.layout for r in report} == {"d-contig", "n-contig", "d-contig-int64"}


def test_no_build_spills(report):
    spilled = [f"{_label(r)}: {r.spills} B ({r.registers} registers)" for r in report if r.spills]
    assert not spilled, spilled


def test_every_build_runs_its_dots_on_tensor_cores(report):
    """HMMA on sm_80; sm_90 has HGMMA (wgmma) where Triton's pipeliner uses it, HMMA elsewhere.
    fp32 inputs count too: they run tf32x3, three tensor-core products per dot."""
    missing = [_label(r) for r in report if not r.mma]
    assert not missing, missing
    for r in report:
        assert set(r.mma) <= {"HMMA", "HGMMA"}, (_label(r), r.mma)
        if r.arch == "sm_80":
            assert r.mma == ["HMMA"], _label(r)


def test_registers_are_those_of_tritons_own_cubin(report):
    """ptxas -v was rerun on Triton's PTX with Triton's flags: the count must match the cubin's."""
    for r in report:
        assert r.registers == r.cubin_registers, _label(r)
        assert 0 < r.registers <= 255, _label(r)


def test_shared_memory_fits(report):
    """Every build fits its architecture's largest block (A100 163 KB, H100 227 KB); the default
    build of each sm_80 bucket also fits sm_86/sm_89 (99 KB), which load sm_80 cubins."""
    for r in report:
        assert r.shared_bytes <= aot.SHARED_LIMITS[r.capability], _label(r)
    dtypes = {str(d)[6:]: d for d in triton_attention.DTYPES}
    for r in report:
        default = str(triton_attention.configs_for(r.head_dim, dtypes[r.dtype])[0])
        if r.capability == 80 and r.config == default:
            assert r.shared_bytes <= aot.SHARED_LIMITS[86], _label(r)


def test_every_pipelined_build_is_pipelined(report):
    """Issue 13 item 5: D = 40 rows (80 B apart in fp16) hid their 16-byte alignment from the
    compiler, so the d-contig builds lost vectorized loads and cp.async pipelining (24 KB of shared
    memory against 48 KB n-contig). Every build with num_stages >= 2, every D (40, 80, 160) and
    layout (the 64-bit-offset variant included), must keep its K/V loads in flight: cp.async in the
    PTX, and shared memory for num_stages copies of the K and V tiles. (num_stages = 1 configurations
    do not pipeline by design.)"""
    configs = {
        str(c): c for d in aot.HEAD_DIMS for dt in triton_attention.DTYPES for c in triton_attention.configs_for(d, dt)
    }
    sizes = {str(d)[6:]: torch.empty((), dtype=d).element_size() for d in triton_attention.DTYPES}
    checked = set()
    for r in report:
        config = configs[r.config]
        if config.num_stages < 2:
            continue
        tiles = 2 * r.block_d * config.block_n * sizes[r.dtype]  # one K and one V tile
        assert r.async_copies, f"{_label(r)}: no cp.async in the PTX"
        assert r.shared_bytes >= config.num_stages * tiles, (_label(r), r.shared_bytes, config.num_stages * tiles)
        checked.add((r.head_dim, r.layout))
    assert checked == {(d, layout) for d in aot.HEAD_DIMS for layout in ("d-contig", "n-contig", "d-contig-int64")}


def test_specialization_follows_the_jit():
    """The builds see what the JIT would: unit strides become constants, multiples of 16 get the
    divisibility hint, the rest stay plain i32 (D = 40 rows are 80 B apart: no hint)."""
    kernel = triton_attention.KERNEL  # compiled or interpreted, it knows its argument names
    q, k, v, out = aot._example_tensors("d-contig", torch.float16, 40)
    args = triton_attention.kernel_args(q, k, v, out, 0.1)
    constants = triton_attention.kernel_constants(
        40,
        torch.float16,
        triton_attention.configs_for(40, torch.float16)[0],
        align=triton_attention.stride_align(q, k, v, out),
    )
    assert constants["STRIDE_ALIGN"] == 8  # what the hints restore: rows 40 elements apart are 8-aligned
    signature, constexprs, attrs = aot._specialize(kernel, args, constants, "fp16")
    names = kernel.arg_names
    assert signature["Q"] == "*fp16" and attrs[(names.index("Q"),)] == [["tt.divisibility", 16]]
    assert signature["stride_qd"] == "constexpr" and constexprs["stride_qd"] == 1
    assert signature["stride_qn"] == "i32" and (names.index("stride_qn"),) not in attrs  # 40
    assert attrs[(names.index("stride_qh"),)] == [["tt.divisibility", 16]]  # 4096 * 40
    assert signature["qk_scale"] == "fp32" and signature["HEAD_DIM"] == "constexpr"


def test_info_kernels_prints_the_triton_report(report, gn_report, capsys):
    assert main(["--kernels"]) == 0
    out = capsys.readouterr().out
    assert "Triton kernels (compiled ahead of time for sm_80 and sm_90" in out
    assert re.search(r"_attention_fwd_kernel\s+sm_90a\s+float16\s+40", out)
    assert f"attention: {len(report)} Triton builds, 0 bytes of spills in all, 0 without tensor-core MMA" in out
    assert re.search(r"_group_norm_adagn_fused_kernel\s+sm_90a\s+bfloat16\s+fused-C16-S1024-w16\s+channels_last", out)
    assert f"group_norm_adagn: {len(gn_report)} Triton builds, 0 bytes of spills in all\n" in out


# ---- group_norm_adagn ------------------------------------------------------------------------------


def _gn_label(r: aot.TritonBuild) -> str:
    return f"{r.kernel} {r.arch} {r.dtype} {r.config} {r.layout}"


def test_every_group_norm_adagn_kernel_was_built_for_every_arch(gn_report):
    built = {(r.kernel, r.arch, r.dtype, r.config, r.layout) for r in gn_report}
    expected = {
        (f"_group_norm_adagn_{kernel}_kernel", aot._compat.sm_arch(arch), str(dtype)[6:], str(plan), layout)
        for arch, dtype, layout, _, _, plan, kernel in aot.group_norm_adagn_builds()
    }
    assert built == expected
    assert len(expected) == 2 * 3 * 7  # archs x dtypes x (3 fused plans + 2 split plans of 2 kernels)
    assert all(r.op == "group_norm_adagn" for r in gn_report)


def test_no_group_norm_adagn_build_spills(gn_report):
    spilled = [f"{_gn_label(r)}: {r.spills} B, stack {r.stack_bytes} B" for r in gn_report if r.spills or r.stack_bytes]
    assert not spilled, spilled


def test_group_norm_adagn_blocks_fit_the_register_file(gn_report):
    """Registers per thread as Triton's cubin has them, and few enough that a block of the plan's
    warps fits an SM's 64K registers (the 16-warp fused tile is the tightest: at most 128)."""
    warps = {str(plan): plan.num_warps for *_, plan, _ in aot.group_norm_adagn_builds()}
    for r in gn_report:
        assert r.registers == r.cubin_registers, _gn_label(r)
        assert 0 < r.registers * 32 * warps[r.config] <= 65536, _gn_label(r)
        assert r.shared_bytes <= aot.SHARED_LIMITS[86], _gn_label(r)  # reductions only: a few bytes
        assert not r.mma, _gn_label(r)  # no dots


def test_report_families_are_a_registry():
    """Each op registers its builds once; a family's cache key covers its kernels' source."""
    assert set(aot.FAMILIES) >= {"attention", "group_norm_adagn", "sampler_step", "layer_norm_modulate"}
    assert aot.cache_path(op="attention") != aot.cache_path(op="group_norm_adagn")
    assert aot.cache_path(op="group_norm_adagn").name.startswith("triton_aot_group_norm_adagn_")


# ---- sampler_step -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_step_report() -> list[aot.TritonBuild]:
    rows = aot.report("sampler_step")
    assert rows, "no builds"
    return rows


def test_sampler_step_builds_compile_without_spills(sampler_step_report):
    """Every sampler_step build (fastdiff.triton.sampler_step.aot_builds: 9 variants, the loop step's
    in-place two-output ones and the history (c_hist) ones among them, x 3 dtypes x sm_80/sm_90)
    compiled, with no spills, the cubin's own register count, and no shared memory beyond what a
    layout conversion needs. The history builds include a loop step's, a sampler_step's and one
    with split (strided) addressing; a loop step's build reads the seed [key, first image]
    (PHILOX_FIRST). The Philox builds keep a 32-byte stack frame and no spills: libdevice's
    sinf/cosf hold a small array for the Payne-Hanek reduction of huge arguments (as the native
    CUDA kernel's do); the others have no stack at all."""
    from fastdiff.triton import sampler_step as triton_sampler_step

    built = {(r.arch, r.dtype, r.layout) for r in sampler_step_report}
    expected = {
        (aot._compat.sm_arch(a), str(d).removeprefix("torch."), v) for a, d, v in triton_sampler_step.aot_builds()
    }
    assert built == expected
    assert {r.layout for r in sampler_step_report if r.layout.startswith("loop-")}, "no sampler_loop_step build"
    history = {
        v
        for _, _, v in triton_sampler_step.aot_builds()
        if triton_sampler_step.aot_example(torch.float16, v)[1]["HAS_HIST"]
    }
    assert any(v.startswith("loop-") for v in history), "no sampler_loop_step build with a history"
    assert any(not v.startswith("loop-") for v in history), "no sampler_step build with a history"
    assert any(not triton_sampler_step.aot_example(torch.float16, v)[1]["FLAT"] for v in history), (
        "no history build with split (strided) addressing"
    )
    first = {
        v
        for _, _, v in triton_sampler_step.aot_builds()
        if triton_sampler_step.aot_example(torch.float16, v)[1]["PHILOX_FIRST"]
    }
    assert any(v.startswith("loop-") for v in first), "no sampler_loop_step build with the seed [key, first image]"
    for r in sampler_step_report:
        label = f"{r.arch} {r.dtype} {r.layout}"
        assert not r.inexact_ptx, (label, r.inexact_ptx)  # 1 / threshold correctly rounded (tl.div_rn)
        assert r.spills == 0, (label, r.spills, r.registers)
        assert r.stack_bytes <= (32 if "philox" in r.layout else 0), (label, r.stack_bytes)
        assert r.registers == r.cubin_registers and 0 < r.registers <= 128, label  # 4 warps: >= 4 blocks per SM
        assert r.shared_bytes <= 16384 and not r.mma, label


def test_info_kernels_prints_the_sampler_step_report(sampler_step_report, capsys):
    assert main(["--kernels"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"_sampler_step_kernel\s+sm_90a\s+float16", out)
    assert f"sampler_step: {len(sampler_step_report)} Triton builds, 0 bytes of spills in all\n" in out


# ---- layer_norm_modulate ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lnm_report() -> list[aot.TritonBuild]:
    rows = aot.report("layer_norm_modulate")
    assert rows, "no builds"
    return rows


def test_layer_norm_modulate_builds_compile_without_spills(lnm_report):
    """DiT-XL/2's rows (D 1152, scale/shift strided views of the adaLN output) and the largest row
    the kernel accepts (D 8192, every part), fp32/fp16/bf16 on sm_80 and sm_90: no spills, no stack,
    and a block of the launcher's warps fits an SM's 64K registers."""
    from fastdiff.triton import layer_norm_modulate as triton_lnm

    assert len(lnm_report) == len(aot.layer_norm_modulate_builds()) == 2 * 3 * 2
    for r in lnm_report:
        label = f"{r.arch} {r.dtype} {r.config}"
        assert not r.inexact_ptx, (label, r.inexact_ptx)  # mean, variance, rstd: div.rn and sqrt.rn
        assert r.spills == 0 and r.stack_bytes == 0, (label, r.spills, r.stack_bytes)
        assert r.registers == r.cubin_registers, label
        assert r.registers * 32 * triton_lnm._num_warps(r.block_d) <= 65536, (label, r.registers)
        assert not r.mma, label


def test_inexact_ptx_pattern_finds_the_fast_forms():
    """The forms `/` and tl.sqrt compile to in float32 (as Triton 3.8 emits them), and the
    correctly rounded ones tl.div_rn/tl.sqrt_rn give, which must not match."""
    ptx = """
        div.full.f32 %r5, %r3, %r4;
        sqrt.approx.ftz.f32 %f2, %f1;
        rsqrt.approx.f32 %f3, %f2;
        div.rn.f32 %f4, %f3, %f2;
        sqrt.rn.f32 %f5, %f4;
        div.rn.f64 %fd1, %fd2, %fd3;
    """
    assert sorted(set(aot._INEXACT_PTX.findall(ptx))) == ["div.full.f32", "rsqrt.approx.f32", "sqrt.approx.ftz.f32"]
