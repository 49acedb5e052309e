"""Every Triton attention build compiled for sm_80 and sm_90 without a GPU: no spills, tensor-core
MMA in the SASS, shared memory within what the GPUs offer (fastdiff.triton.aot).

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
    assert {r.layout for r in report} == {"d-contig", "n-contig"}


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


def test_specialization_follows_the_jit():
    """The builds see what the JIT would: unit strides become constants, multiples of 16 get the
    divisibility hint, the rest stay plain i32 (D = 40 rows are 80 B apart: no hint)."""
    kernel = triton_attention.KERNEL  # compiled or interpreted, it knows its argument names
    q, k, v, out = aot._example_tensors("d-contig", torch.float16, 40)
    args = triton_attention.kernel_args(q, k, v, out, 0.1)
    constants = triton_attention.kernel_constants(40, torch.float16, triton_attention.configs_for(40, torch.float16)[0])
    signature, constexprs, attrs = aot._specialize(kernel, args, constants, "fp16")
    names = kernel.arg_names
    assert signature["Q"] == "*fp16" and attrs[(names.index("Q"),)] == [["tt.divisibility", 16]]
    assert signature["stride_qd"] == "constexpr" and constexprs["stride_qd"] == 1
    assert signature["stride_qn"] == "i32" and (names.index("stride_qn"),) not in attrs  # 40
    assert attrs[(names.index("stride_qh"),)] == [["tt.divisibility", 16]]  # 4096 * 40
    assert signature["qk_scale"] == "fp32" and signature["HEAD_DIM"] == "constexpr"


def test_info_kernels_prints_the_triton_report(report, capsys):
    assert main(["--kernels"]) == 0
    out = capsys.readouterr().out
    assert "Triton kernels (compiled ahead of time for sm_80 and sm_90" in out
    assert re.search(r"_attention_fwd_kernel\s+sm_90a\s+float16\s+40", out)
    assert f"{len(report)} Triton builds, 0 bytes of spills in all, 0 without tensor-core MMA" in out


# ---- the other registered kernels (fastdiff.triton.aot.KERNELS) -----------------------------------


@pytest.fixture(scope="module")
def sampler_step_report() -> list[aot.TritonBuild]:
    rows = aot.kernel_report("sampler_step")
    assert rows, "no builds"
    return rows


def test_sampler_step_builds_compile_without_spills(sampler_step_report):
    """Every sampler_step build (fastdiff.triton.sampler_step.aot_builds: 4 variants x 3 dtypes x
    sm_80/sm_90) compiled, with no spills, the cubin's own register count, and no shared memory
    beyond what a layout conversion needs. The Philox builds keep a 32-byte stack frame and no
    spills: libdevice's sinf/cosf hold a small array for the Payne-Hanek reduction of huge arguments
    (as the native CUDA kernel's do); the others have no stack at all."""
    from fastdiff.triton import sampler_step as triton_sampler_step

    built = {(r.arch, r.dtype, r.layout) for r in sampler_step_report}
    expected = {(aot._compat.sm_arch(a), str(d).removeprefix("torch."), v)
                for a, d, v in triton_sampler_step.aot_builds()}
    assert built == expected
    for r in sampler_step_report:
        label = f"{r.arch} {r.dtype} {r.layout}"
        assert r.spills == 0, (label, r.spills, r.registers)
        assert r.stack_bytes <= (32 if "philox" in r.layout else 0), (label, r.stack_bytes)
        assert r.registers == r.cubin_registers and 0 < r.registers <= 128, label  # 4 warps: >= 4 blocks per SM
        assert r.shared_bytes <= 16384 and not r.mma, label


def test_info_kernels_prints_the_sampler_step_report(sampler_step_report, capsys):
    assert main(["--kernels"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"_sampler_step_kernel\s+sm_90a\s+float16", out)
    assert f"{len(sampler_step_report)} Triton builds, 0 bytes of spills in all, no dots (no MMA expected)" in out
