"""`fastdiff info --kernels`: the ptxas report parsed into registers, spills, stack, shared memory."""

from __future__ import annotations

import pytest

from fastdiff import _native
from fastdiff.info import main
from fastdiff.kernel_report import format_kernels, native_kernels, parse_ptxas

SAMPLE = """## csrc/cuda/demo.cu
ptxas info    : Compiling entry function '_ZN8fastdiff4demoIfEEvPT_' for 'sm_80'
ptxas info    : Function properties for _ZN8fastdiff4demoIfEEvPT_
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 388 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN8fastdiff4demoIfEEvPT_' for 'sm_90'
ptxas info    : Function properties for _ZN8fastdiff4demoIfEEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 0 barriers
"""


def test_parse_reads_every_field():
    rows = parse_ptxas(SAMPLE)
    assert [(r.arch, r.registers, r.spills, r.stack_bytes, r.shared_bytes, r.source) for r in rows] == [
        ("sm_80", 40, 16, 8, 2048, "csrc/cuda/demo.cu"),
        ("sm_90", 38, 0, 0, 0, "csrc/cuda/demo.cu"),
    ]
    text = format_kernels(rows)
    assert "demo<float>" in text and "16 bytes of spills" in text


def test_installed_kernels_have_no_spills_on_every_arch(capsys):
    status = _native.status()
    if not status["cuda_compiled"]:
        pytest.skip(f"CUDA part not compiled: {status['cuda_skipped_reason'] or status['reason']}")
    rows = native_kernels()
    assert rows, "CUDA was compiled but the package has no ptxas report"
    archs = {"sm_" + a.removesuffix("+PTX").replace(".", "") for a in status["cuda_archs"]}
    for kernel in (
        "cfg_combine_kernel",
        "sampler_step_kernel",
        "layer_norm_modulate_warp_kernel",
        "layer_norm_modulate_block_kernel",
    ):
        built = {r.arch for r in rows if kernel in r.kernel}
        assert built == archs, f"{kernel} compiled for {sorted(built)}, expected {sorted(archs)}"
    spilled = [f"{r.kernel} {r.arch}: {r.spills} B" for r in rows if r.spills]
    assert not spilled, spilled
    assert main(["--kernels"]) == 0
    out = capsys.readouterr().out
    assert "sampler_step_kernel<float, float, false>" in out and "0 bytes of spills in all" in out
