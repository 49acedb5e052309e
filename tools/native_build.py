"""What the native extension fastdiff._C is built from, and with which flags: the one place for both builds.

setup.py (``pip install -e .``, through torch.utils.cpp_extension) imports this module, and the top-level
CMakeLists.txt runs it, so the two builds share the source lists, the ISA builds, the flags and the decision
of whether to build the CUDA part:

    python tools/native_build.py cmake BUILD_DIR   # configure: writes BUILD_DIR/fastdiff_native.{cmake,json}
    python tools/native_build.py stage BUILD_DIR   # after the link: BUILD_DIR/python/fastdiff, importable

Torch's own include and library directories and its compile definitions are read from
torch.utils.cpp_extension here, so CMake never runs find_package(Torch), which aborts on a CUDA build of
torch when no CUDA toolkit is installed (docs/build.md).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastdiff"
BUILD_INFO = "_build_info.json"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
EXTENSION = "fastdiff._C"

# -Wno-unknown-pragmas: torch's at::vec headers carry `#pragma unroll`, which g++ does not know.
CXX_FLAGS = ["-O3", "-Wno-unknown-pragmas"]
NVCC_FLAGS = ["-O3", "-Xptxas", "-v"]  # -v: the registers, stack and spills of every kernel, in the build log
CUDA_DEFINE = "FASTDIFF_WITH_CUDA"

# x86-64 gets AVX2 and AVX-512 builds of the CPU loops next to the portable one (picked at run time
# from torch's own CPU capability): *_avx2.cpp and *_avx512.cpp files are compiled with these flags,
# every other file without them. Least capable first: that is also their order on the link line, so
# for an inline function several files emit the linker keeps the copy of the least capable build that
# has it, and no AVX2 or AVX-512 instruction can leak into code that runs on CPUs without them.
X86_SIMD_BUILD = platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux")
X86_SIMD_DEFINES = ["-DFASTDIFF_CPU_HAVE_AVX2=1", "-DFASTDIFF_CPU_HAVE_AVX512=1"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
# The subset torch builds its own AVX512 kernels with (F, BW, VL, DQ), so at::vec's 512-bit code compiles.
# g++ 12 flags _mm512_undefined_* inside its own avx512fintrin.h as maybe-uninitialized (a false positive).
AVX512_FLAGS = [
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
    "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-Wno-maybe-uninitialized",
]  # fmt: skip
SIMD_BUILDS = (("avx2", "_avx2.cpp", AVX2_FLAGS), ("avx512", "_avx512.cpp", AVX512_FLAGS))


def sources() -> dict[str, list[str]]:
    """The source files, relative to the repository root, by build: portable, avx2, avx512, cuda."""

    def glob(pattern: str) -> list[str]:
        return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))

    cpp = glob("csrc/torch_bindings.cpp") + glob("csrc/cpu/*.cpp") + glob("csrc/meta/*.cpp")
    found = {"portable": [s for s in cpp if not s.endswith(tuple(suffix for _, suffix, _ in SIMD_BUILDS))]}
    for name, suffix, _ in SIMD_BUILDS:
        found[name] = [s for s in cpp if s.endswith(suffix)]
    found["cuda"] = glob("csrc/cuda/*.cu")
    return found


def simd_flags(source: str) -> list[str]:
    """The extra flags of one C++ source: its ISA build's, or none."""
    if X86_SIMD_BUILD:
        for _, suffix, flags in SIMD_BUILDS:
            if source.endswith(suffix):
                return list(flags)
    return []


def cxx_flags(openmp: bool) -> list[str]:
    """fastdiff's flags for every C++ file (torch's own come from cpp_extension, or torch_flags())."""
    return CXX_FLAGS + (X86_SIMD_DEFINES if X86_SIMD_BUILD else []) + (["-fopenmp"] if openmp else [])


def torch_uses_openmp() -> bool:
    """at::parallel_for is inline and parallelizes with `#pragma omp parallel`: without -fopenmp the
    pragma is ignored and every CPU kernel runs on one thread. The .so then needs libgomp.so.1, which
    resolves to the copy torch has already loaded (same soname)."""
    import torch

    return sys.platform.startswith("linux") and "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def version() -> str:
    """fastdiff's version, read from fastdiff/__init__.py without importing the package."""
    match = re.search(r'^__version__ = "([^"]+)"', (PACKAGE / "__init__.py").read_text(), re.M)
    if match is None:
        raise RuntimeError("fastdiff/__init__.py has no __version__ line")
    return match.group(1)


# ---- what to build -------------------------------------------------------------------------------


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _output(cmd: list[str]) -> str:
    """stdout + stderr of a short command, or "" if it cannot run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout + out.stderr


def _first_line(cmd: list[str]) -> str:
    lines = _output(cmd).strip().splitlines()
    return lines[0].strip() if lines else ""


def find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the toolkit around `nvcc` on PATH.

    torch.utils.cpp_extension guesses dirname(dirname(which nvcc)), which is /usr/local when
    /usr/local/bin/nvcc is a wrapper script (as on these machines); it reads CUDA_HOME at import,
    so setup.py exports this answer before that import.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def _nvcc_version(cuda_home: str) -> str | None:
    match = re.search(r"release (\d+\.\d+)", _output([str(Path(cuda_home) / "bin" / "nvcc"), "--version"]))
    return match.group(1) if match else None


def plan(cxx: str | None = None) -> dict:
    """Decide what to build; every 'no' carries its reason. ``cxx``: the C++ compiler (default $CXX or c++)."""
    result: dict = {
        "native": False,
        "native_skipped_reason": "",
        "cuda": False,
        "cuda_skipped_reason": "",
        "cuda_archs": [],
        "cuda_home": None,
        "nvcc_version": None,
        "cxx": None,
        "cxx_version": None,
    }
    if _truthy("FASTDIFF_SKIP_NATIVE"):
        result["native_skipped_reason"] = "FASTDIFF_SKIP_NATIVE=1 was set at install time"
        return result
    try:
        import torch
    except ImportError as exc:
        result["native_skipped_reason"] = (
            f"torch was not importable at build time ({exc}); install torch first, then "
            "`pip install -e . --no-build-isolation`"
        )
        return result
    cxx = cxx or os.environ.get("CXX", "c++")
    cxx_argv = shlex.split(cxx)
    if not cxx_argv or shutil.which(cxx_argv[0]) is None:
        result["native_skipped_reason"] = f"no C++ compiler found (CXX={cxx!r} is not on PATH)"
        return result
    result.update(native=True, cxx=shutil.which(cxx_argv[0]), cxx_version=_first_line([*cxx_argv, "--version"]))

    cuda_home = find_cuda_home()
    result["cuda_home"] = cuda_home
    if cuda_home is not None:
        result["nvcc_version"] = _nvcc_version(cuda_home)
    nvcc = result["nvcc_version"]
    if _truthy("FASTDIFF_SKIP_CUDA"):
        result["cuda_skipped_reason"] = "FASTDIFF_SKIP_CUDA=1 was set at install time"
    elif getattr(torch.version, "hip", None):
        result["cuda_skipped_reason"] = f"torch {torch.__version__} is a ROCm build; fastdiff has no HIP kernels"
    elif torch.version.cuda is None:
        result["cuda_skipped_reason"] = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        result["cuda_skipped_reason"] = "nvcc not found (set CUDA_HOME, or put nvcc on PATH)"
    elif nvcc is None:
        result["cuda_skipped_reason"] = f"no working nvcc at {Path(cuda_home) / 'bin' / 'nvcc'} (CUDA_HOME={cuda_home})"
    elif nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        result["cuda_skipped_reason"] = (
            f"nvcc {nvcc} at {cuda_home} does not match torch's CUDA {torch.version.cuda} "
            "(the major versions must agree)"
        )
    else:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
        result.update(cuda=True, cuda_archs=[a for a in re.split(r"[;\s,]+", arch_list) if a])
    return result


def plan_line(result: dict) -> str:
    """The one line that says what this build does, and why not more."""
    if not result["native"]:
        return f"native extension skipped, installing pure Python: {result['native_skipped_reason']}"
    if not result["cuda"]:
        return f"CUDA part skipped, building the CPU part only: {result['cuda_skipped_reason']}"
    archs, nvcc, home = result["cuda_archs"], result["nvcc_version"], result["cuda_home"]
    return f"building CPU + CUDA parts for archs {archs} with nvcc {nvcc} ({home})"


# ---- the build record fastdiff._native checks before it imports the .so ---------------------------


def _torch_versions() -> dict:
    try:
        import torch
    except ImportError:
        return {"torch_version": None, "torch_git_version": None, "torch_cuda_version": None}
    return {
        "torch_version": torch.__version__,
        "torch_git_version": getattr(torch.version, "git_version", None),
        "torch_cuda_version": torch.version.cuda,
    }


def _triton_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def build_info(result: dict, built: bool, seconds: float | None, builder: str, ptxas_report: str | None) -> dict:
    return {
        "fastdiff_version": version(),
        "builder": builder,
        "native": built,
        "native_skipped_reason": result["native_skipped_reason"],
        # A deliberate pure-Python install: fastdiff._native then falls back without a warning.
        "native_skip_requested": _truthy("FASTDIFF_SKIP_NATIVE"),
        **_torch_versions(),
        "cuda_compiled": built and result["cuda"],
        "cuda_skipped_reason": result["cuda_skipped_reason"],
        "cuda_archs": result["cuda_archs"] if built and result["cuda"] else [],
        "cuda_home": result["cuda_home"],
        "nvcc_version": result["nvcc_version"],
        "cxx": result["cxx"],
        "cxx_version": result["cxx_version"],
        "python_version": platform.python_version(),
        "triton_version": _triton_version(),
        "ptxas_report": ptxas_report if built and result["cuda"] else None,
        "build_seconds": None if seconds is None else round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_build_info(package_dir: Path, info: dict) -> None:
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# ---- torch's flags, for builds that do not go through cpp_extension (CMake) ---------------------------


def export_cuda_env(result: dict) -> None:
    """CUDA_HOME and TORCH_CUDA_ARCH_LIST from the plan, before torch.utils.cpp_extension is imported: it reads
    CUDA_HOME at import (and would guess /usr/local here), and the arch list when it makes -gencode flags."""
    if result["cuda_home"]:
        os.environ["CUDA_HOME"] = result["cuda_home"]
    if result["cuda"]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(result["cuda_archs"])


def torch_flags(result: dict) -> dict:
    """What torch.utils.cpp_extension's CppExtension/CUDAExtension add for ``fastdiff._C``, from torch itself:
    include and library directories, libraries, defines, the C++ standard, nvcc's flags and arch flags."""
    export_cuda_env(result)
    from torch.utils import cpp_extension

    device = "cuda" if result["cuda"] else "cpu"
    libraries = ["c10", "torch", "torch_cpu", "torch_python"]
    if result["cuda"]:
        libraries += ["cudart", "c10_cuda", "torch_cuda"]
    # cpp_extension adds these two to every extension (BuildExtension.build_extensions).
    defines = ["TORCH_API_INCLUDE_EXTENSION_H", f"TORCH_EXTENSION_NAME={EXTENSION.rsplit('.', 1)[1]}"]
    flags = {
        "include_dirs": cpp_extension.include_paths(device) + [sysconfig.get_paths()["include"]],
        "library_dirs": cpp_extension.library_paths(device),
        "libraries": libraries,
        "defines": defines,
        # cpp_extension compiles every C++ and CUDA file as C++20 (torch's headers need it).
        "cxx_std": ["-std=c++20"],
        "nvcc_flags": [],
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
    }
    if result["cuda"]:
        # The private helper is what CUDAExtension itself calls for -gencode; a torch without it fails
        # here, loudly, rather than building for other arches than setup.py would.
        flags["nvcc_flags"] = list(cpp_extension.COMMON_NVCC_FLAGS) + cpp_extension._get_cuda_arch_flags()
    return flags


def _cmake_list(values: list[str]) -> str:
    return '"' + ";".join(v.replace("\\", "/").replace('"', '\\"').replace(";", "\\;") for v in values) + '"'


def write_cmake(build_dir: Path, cxx: str | None) -> dict:
    """Configure step: the plan, the sources and every flag as CMake variables (BUILD_DIR/fastdiff_native.cmake)
    and as JSON (BUILD_DIR/fastdiff_native.json, which `stage` reads after the link)."""
    result = plan(cxx)
    found = sources()
    variables: dict[str, str | list[str]] = {
        "FASTDIFF_NATIVE": "ON" if result["native"] else "OFF",
        "FASTDIFF_NATIVE_SKIPPED_REASON": result["native_skipped_reason"],
        "FASTDIFF_CUDA": "ON" if result["cuda"] else "OFF",
        "FASTDIFF_CUDA_SKIPPED_REASON": result["cuda_skipped_reason"],
        "FASTDIFF_PLAN_LINE": plan_line(result),
        "FASTDIFF_PORTABLE_SOURCES": found["portable"],
        "FASTDIFF_CUDA_SOURCES": found["cuda"] if result["cuda"] else [],
        "FASTDIFF_NVCC": str(Path(result["cuda_home"] or "", "bin", "nvcc")) if result["cuda"] else "",
        "FASTDIFF_NVCC_FLAGS": NVCC_FLAGS,
        "FASTDIFF_CUDA_DEFINE": CUDA_DEFINE,
    }
    for name, _, flags in SIMD_BUILDS:
        variables[f"FASTDIFF_{name.upper()}_SOURCES"] = found[name]
        variables[f"FASTDIFF_{name.upper()}_FLAGS"] = list(flags) if X86_SIMD_BUILD else []
    if result["native"]:
        openmp = torch_uses_openmp()
        variables["FASTDIFF_CXX_FLAGS"] = cxx_flags(openmp)
        variables["FASTDIFF_OPENMP"] = "ON" if openmp else "OFF"
        torch = torch_flags(result)
        variables.update(
            FASTDIFF_TORCH_INCLUDE_DIRS=torch["include_dirs"],
            FASTDIFF_TORCH_LIBRARY_DIRS=torch["library_dirs"],
            FASTDIFF_TORCH_LIBRARIES=torch["libraries"],
            FASTDIFF_TORCH_DEFINES=torch["defines"],
            FASTDIFF_TORCH_CXX_STD=torch["cxx_std"],
            FASTDIFF_TORCH_NVCC_FLAGS=torch["nvcc_flags"],
            FASTDIFF_EXT_SUFFIX=torch["ext_suffix"],
        )
    lines = [f"# Written by {Path(__file__).relative_to(ROOT)} at configure time; do not edit."]
    for key, value in variables.items():
        # A ; in a sentence would split it into a CMake list (and an escaped one prints as \;).
        text = _cmake_list(value) if isinstance(value, list) else _cmake_list([value.replace(";", ",")])
        lines.append(f"set({key} {text})")
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "fastdiff_native.cmake").write_text("\n".join(lines) + "\n")
    (build_dir / "fastdiff_native.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


_BUILD_PRODUCTS = ("_C.", BUILD_INFO, "_ptxas_report.txt", "__pycache__")


def stage(build_dir: Path, extension: Path) -> Path:
    """After the link: BUILD_DIR/python/fastdiff links every file and folder of fastdiff/ except setup.py's
    build products, holds the CMake-built extension, and gets its own build record. With BUILD_DIR/python
    first on PYTHONPATH, `import fastdiff` runs the CMake build."""
    result = json.loads((build_dir / "fastdiff_native.json").read_text())
    package = build_dir / "python" / "fastdiff"
    package.mkdir(parents=True, exist_ok=True)
    for entry in package.iterdir():
        if entry.is_symlink() and not entry.exists():
            entry.unlink()  # a module removed from the source tree since the last build
    for entry in PACKAGE.iterdir():
        if entry.name.startswith(_BUILD_PRODUCTS):
            continue
        link = package / entry.name
        if not link.is_symlink():
            link.symlink_to(entry)
    if extension.resolve().parent != package.resolve():
        raise SystemExit(f"stage: the extension {extension} must be linked into {package}")
    write_build_info(package, build_info(result, built=True, seconds=None, builder="cmake", ptxas_report=None))
    return package


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="native_build.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmake = commands.add_parser("cmake", help="write BUILD_DIR/fastdiff_native.cmake and .json (configure time)")
    cmake.add_argument("build_dir", type=Path)
    cmake.add_argument("--cxx", help="the C++ compiler CMake uses (default $CXX or c++)")
    staged = commands.add_parser("stage", help="make BUILD_DIR/python/fastdiff importable (after the link)")
    staged.add_argument("build_dir", type=Path)
    staged.add_argument("--extension", type=Path, required=True, help="the linked _C*.so")
    commands.add_parser("sources", help="print the source files of each build as JSON")
    args = parser.parse_args(argv)
    if args.command == "cmake":
        result = write_cmake(args.build_dir, args.cxx)
        print(f"fastdiff build: {plan_line(result)}")
    elif args.command == "stage":
        package = stage(args.build_dir, args.extension)
        print(f"fastdiff build: {package} is importable with PYTHONPATH={package.parent}")
    else:
        print(json.dumps(sources(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
