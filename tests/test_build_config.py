"""tools/native_build.py, the one source of the native build's files, flags and plan (setup.py and CMake read it)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

import fastdiff

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def native_build():
    spec = importlib.util.spec_from_file_location("native_build", ROOT / "tools" / "native_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["native_build"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("native_build", None)


def _cmake_vars(path: Path) -> dict[str, list[str]]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r'set\((\w+) "(.*)"\)', line)
        if match:
            found[match.group(1)] = [v for v in match.group(2).split(";") if v]
    return found


def test_every_native_source_is_in_exactly_one_build(native_build):
    found = native_build.sources()
    listed = [s for files in found.values() for s in files]
    on_disk = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu") and p.is_file()
    )
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    assert all(s.endswith("_avx2.cpp") for s in found["avx2"]) and found["avx2"]
    assert all(s.endswith("_avx512.cpp") for s in found["avx512"]) and found["avx512"]
    assert not [s for s in found["portable"] if "_avx" in s]


def test_isa_files_get_their_flags_and_only_they(native_build):
    if not native_build.X86_SIMD_BUILD:
        pytest.skip("not an x86-64 Linux build: no ISA builds")
    assert "-mavx2" in native_build.simd_flags("csrc/cpu/x_avx2.cpp")
    assert "-mavx512f" in native_build.simd_flags("csrc/cpu/x_avx512.cpp")
    assert native_build.simd_flags("csrc/cpu/x.cpp") == []
    assert not [f for f in native_build.cxx_flags(openmp=True) if f.startswith("-mavx")]


def test_version_is_fastdiffs(native_build):
    assert native_build.version() == fastdiff.__version__


def test_cmake_variables_carry_the_plan_and_the_sources(native_build, tmp_path):
    plan = native_build.write_cmake(tmp_path, cxx=None)
    found = _cmake_vars(tmp_path / "fastdiff_native.cmake")
    assert json.loads((tmp_path / "fastdiff_native.json").read_text()) == plan
    assert found["FASTDIFF_NATIVE"] == ["ON"] and found["FASTDIFF_CUDA"] == (["ON"] if plan["cuda"] else ["OFF"])
    sources = native_build.sources()
    assert found["FASTDIFF_PORTABLE_SOURCES"] == sources["portable"]
    assert found["FASTDIFF_AVX2_SOURCES"] == sources["avx2"]
    assert found["FASTDIFF_AVX512_SOURCES"] == sources["avx512"]
    assert found["FASTDIFF_CUDA_SOURCES"] == (sources["cuda"] if plan["cuda"] else [])
    assert "TORCH_EXTENSION_NAME=_C" in found["FASTDIFF_TORCH_DEFINES"]
    assert found["FASTDIFF_EXT_SUFFIX"][0].endswith(".so")


def test_skip_knobs_reach_the_cmake_build(native_build, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_SKIP_CUDA", "1")
    native_build.write_cmake(tmp_path, cxx=None)
    found = _cmake_vars(tmp_path / "fastdiff_native.cmake")
    assert found["FASTDIFF_CUDA"] == ["OFF"] and found["FASTDIFF_CUDA_SOURCES"] == []
    assert "FASTDIFF_SKIP_CUDA=1" in found["FASTDIFF_CUDA_SKIPPED_REASON"][0]
    monkeypatch.setenv("FASTDIFF_SKIP_NATIVE", "1")
    native_build.write_cmake(tmp_path, cxx=None)
    found = _cmake_vars(tmp_path / "fastdiff_native.cmake")
    assert found["FASTDIFF_NATIVE"] == ["OFF"] and "FASTDIFF_TORCH_LIBRARIES" not in found


def test_a_missing_compiler_is_named(native_build):
    plan = native_build.plan(cxx="no-such-compiler-fastdiff")
    assert not plan["native"] and "no-such-compiler-fastdiff" in plan["native_skipped_reason"]


def test_stage_links_the_sources_and_records_the_cmake_build(native_build, tmp_path):
    native_build.write_cmake(tmp_path, cxx=None)
    package = tmp_path / "python" / "fastdiff"
    package.mkdir(parents=True)
    extension = package / "_C.fake.so"
    extension.write_bytes(b"")
    (package / "gone.py").symlink_to(tmp_path / "nowhere.py")  # a module since removed from the tree
    native_build.stage(tmp_path, extension)
    assert (package / "__init__.py").resolve() == ROOT / "fastdiff" / "__init__.py"
    assert (package / "ops").is_symlink() and not (package / "gone.py").is_symlink()
    assert not [p for p in package.iterdir() if p.is_symlink() and p.name.startswith(("_C.", "_build_info"))]
    info = json.loads((package / "_build_info.json").read_text())
    assert info["builder"] == "cmake" and info["native"] and info["fastdiff_version"] == fastdiff.__version__
    with pytest.raises(SystemExit, match="must be linked into"):
        native_build.stage(tmp_path, tmp_path / "_C.so")


def test_the_installed_build_record_names_its_builder():
    record = ROOT / "fastdiff" / "_build_info.json"
    if not record.exists():
        pytest.skip("no build record: fastdiff was not installed from this checkout")
    info = json.loads(record.read_text())
    assert info["builder"] == "setup.py" and info["fastdiff_version"] == fastdiff.__version__
