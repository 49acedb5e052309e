"""The CMake build's fastdiff._C, imported and run: every op's CPU backend once per dtype against its reference.

ctest runs this file (CMakeLists.txt: tests python_smoke_default and python_smoke_avx2) with
PYTHONPATH=BUILD/python, where the build links the Python sources beside its own _C, and
FASTDIFF_CMAKE_BUILD=BUILD, as a script (`python tests/cmake_smoke.py`, which runs pytest on itself): a script
puts its own folder first on sys.path, where `python -m pytest` would put the working directory, which in the
repository root holds the source tree's fastdiff. `pytest tests` does not collect it (the name does not start
with test_).

The full grids stay in tests/test_ops_harness.py, on the extension setup.py builds; this checks that the
CMake build is the same extension: it loads, it registers every native op, and each op's CPU kernel
(each ISA build, through ATEN_CPU_CAPABILITY) agrees with the reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from op_cases import CASES, OpCase, skip_unless_runs

import fastdiff
from fastdiff import _native

BUILD = os.environ.get("FASTDIFF_CMAKE_BUILD")
pytestmark = pytest.mark.skipif(not BUILD, reason="run by ctest on a CMake build (FASTDIFF_CMAKE_BUILD is unset)")


def _package() -> Path:
    return Path(BUILD or "", "python", "fastdiff").resolve()


def test_fastdiff_and_its_extension_come_from_the_cmake_build():
    assert Path(fastdiff.__file__).parent.resolve() == _package(), (
        f"imported {fastdiff.__file__}, not the CMake build's package {_package()}: is PYTHONPATH set?"
    )
    module = _native.load()
    assert module is not None, f"the CMake build's fastdiff._C did not load: {_native.status()}"
    assert Path(module.__file__).resolve().parent == _package()
    info = json.loads((_package() / "_build_info.json").read_text())
    plan = json.loads(Path(BUILD, "fastdiff_native.json").read_text())
    assert info["builder"] == "cmake" and info["native"]
    assert info["cuda_compiled"] == plan["cuda"], "the build record disagrees with the configure step's plan"


def test_the_requested_isa_build_runs():
    expected = os.environ.get("FASTDIFF_SMOKE_EXPECT_ISA")
    if not expected:
        pytest.skip("no ISA requested (ATEN_CPU_CAPABILITY unset): the machine's best build runs")
    assert torch.backends.cpu.get_cpu_capability() == expected


@pytest.mark.parametrize("case", [c for c in CASES if c.native_op], ids=repr)
def test_native_op_is_registered(case: OpCase):
    _native.load()
    assert hasattr(torch.ops.fastdiff, case.native_op), f"torch.ops.fastdiff.{case.native_op} is missing"


def _cpu_grid():
    for case in CASES:
        if "cpu" not in case.support.backends:
            continue
        for dtype in case.dtypes:
            yield pytest.param(case, dtype, id=f"{case.op}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("case", "dtype"), list(_cpu_grid()))
def test_cpu_op_matches_reference(case: OpCase, dtype: torch.dtype):
    sid, spec = case.shapes[0]
    layouts = [layout for layout in case.layouts if case.applies(spec, layout)]
    calls = [call for layout in layouts for call in case.calls(spec, dtype, layout, "cpu")]
    skip_unless_runs(case, "cpu", *calls)
    for call in calls:
        case.check(case.run(call, "cpu"), call, f"cpu {sid} {call.what}")


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "-rs", "-p", "no:cacheprovider"]))
