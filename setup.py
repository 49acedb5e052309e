"""Build fastdiff._C from csrc/ with torch.utils.cpp_extension and ninja.

Install (after torch):  pip install -e . --no-build-isolation

What gets built, decided once here and recorded in fastdiff/_build_info.json:
  * the CPU part always, when a C++ compiler exists;
  * the CUDA part when torch is a CUDA build and an nvcc of the same major version is found
    (arches from TORCH_CUDA_ARCH_LIST, default "8.0;9.0"); otherwise one line says why it was skipped;
  * nothing native with FASTDIFF_SKIP_NATIVE=1, or when no C++ compiler / no torch is found: the
    package then installs as pure Python and runs on the reference backend.
Knobs: MAX_JOBS (default 2), FASTDIFF_SKIP_CUDA=1 (CPU part only), CUDA_HOME, CXX.

Why not CMake: torch's CMake config (find_package(Torch)) requires a full CUDA toolkit whenever
torch is a CUDA build, so it cannot build the CPU part on a machine without one; see docs/build.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUILD_INFO = "_build_info.json"
PTXAS_REPORT = ROOT / "build" / "ptxas_report.txt"
PACKAGED_PTXAS_REPORT = "_ptxas_report.txt"  # the copy inside the package (fastdiff/)
PTXAS_DIR = ROOT / "build" / "ptxas"
NATIVE_LOG = ROOT / "build" / "native_build.log"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _say(message: str) -> None:
    print(f"fastdiff build: {message}", flush=True)


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


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the toolkit around `nvcc` on PATH.

    torch.utils.cpp_extension guesses dirname(dirname(which nvcc)), which is /usr/local when
    /usr/local/bin/nvcc is a wrapper script (as on these machines); it reads CUDA_HOME at import,
    so this runs before that import and exports the answer.
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


def _plan() -> dict:
    """Decide what to build; every 'no' carries its reason."""
    plan: dict = {
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
        plan["native_skipped_reason"] = "FASTDIFF_SKIP_NATIVE=1 was set at install time"
        return plan
    try:
        import torch
    except ImportError as exc:
        plan["native_skipped_reason"] = (
            f"torch was not importable at build time ({exc}); install torch first, then "
            "`pip install -e . --no-build-isolation`"
        )
        return plan
    cxx = os.environ.get("CXX", "c++")
    cxx_argv = shlex.split(cxx)
    if not cxx_argv or shutil.which(cxx_argv[0]) is None:
        plan["native_skipped_reason"] = f"no C++ compiler found (CXX={cxx!r} is not on PATH)"
        return plan
    plan.update(native=True, cxx=shutil.which(cxx_argv[0]), cxx_version=_first_line([*cxx_argv, "--version"]))

    cuda_home = _find_cuda_home()
    plan["cuda_home"] = cuda_home
    if cuda_home is not None:
        plan["nvcc_version"] = _nvcc_version(cuda_home)
    if _truthy("FASTDIFF_SKIP_CUDA"):
        plan["cuda_skipped_reason"] = "FASTDIFF_SKIP_CUDA=1 was set at install time"
    elif getattr(torch.version, "hip", None):
        plan["cuda_skipped_reason"] = f"torch {torch.__version__} is a ROCm build; fastdiff has no HIP kernels"
    elif torch.version.cuda is None:
        plan["cuda_skipped_reason"] = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        plan["cuda_skipped_reason"] = "nvcc not found (set CUDA_HOME, or put nvcc on PATH)"
    elif plan["nvcc_version"] is None:
        plan["cuda_skipped_reason"] = f"no working nvcc at {Path(cuda_home) / 'bin' / 'nvcc'} (CUDA_HOME={cuda_home})"
    elif plan["nvcc_version"].split(".")[0] != torch.version.cuda.split(".")[0]:
        plan["cuda_skipped_reason"] = (
            f"nvcc {plan['nvcc_version']} at {cuda_home} does not match torch's CUDA {torch.version.cuda} "
            "(the major versions must agree)"
        )
    else:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
        plan.update(cuda=True, cuda_archs=[a for a in re.split(r"[;\s,]+", arch_list) if a])
    return plan


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


def _build_info(plan: dict, built: bool, seconds: float | None) -> dict:
    return {
        "fastdiff_version": "0.1.0",
        "native": built,
        "native_skipped_reason": plan["native_skipped_reason"],
        # A deliberate pure-Python install: fastdiff._native then falls back without a warning.
        "native_skip_requested": _truthy("FASTDIFF_SKIP_NATIVE"),
        **_torch_versions(),
        "cuda_compiled": built and plan["cuda"],
        "cuda_skipped_reason": plan["cuda_skipped_reason"],
        "cuda_archs": plan["cuda_archs"] if built and plan["cuda"] else [],
        "cuda_home": plan["cuda_home"],
        "nvcc_version": plan["nvcc_version"],
        "cxx": plan["cxx"],
        "cxx_version": plan["cxx_version"],
        "python_version": platform.python_version(),
        "triton_version": _triton_version(),
        "ptxas_report": str(PTXAS_REPORT.relative_to(ROOT)) if built and plan["cuda"] else None,
        "build_seconds": None if seconds is None else round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_build_info(package_dir: Path, info: dict) -> None:
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _tee_stdout(log_path: Path) -> Iterator[None]:
    """Copy everything written to fd 1 (ninja and the compilers) into log_path as well.

    cpp_extension runs ninja with its output on fd 1 and keeps none of it; nvcc's `-Xptxas -v`
    report (registers, spills) lives only there, and a later check parses it from the log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    saved = os.dup(1)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.close(write_fd)

    def pump() -> None:
        with open(log_path, "wb") as log, os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                log.write(chunk)
                os.write(saved, chunk)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)  # closes the pipe's last write end, so pump() sees EOF
        thread.join()
        os.close(saved)


_PTXAS_KEEP = ("ptxas info", "bytes stack frame", "ptxas warning", "ptxas error")


def _ptxas_file(source: str) -> Path:
    return PTXAS_DIR / (source.replace("/", "__") + ".txt")


def _update_ptxas_report(log_path: Path, cuda_sources: list[str]) -> int:
    """Refresh build/ptxas_report.txt (registers, stack, spills of every kernel) from this build's log.

    ninja only recompiles what changed, so the log holds ptxas output for some .cu files only: it is
    kept per source file (build/ptxas/) and the report joins the files of all current sources.
    ninja -v prints "[i/n] <command>" before each command's output, which attributes the lines.
    """
    found: dict[str, list[str]] = {}
    current = None
    for line in log_path.read_text(errors="replace").splitlines():
        step = re.match(r"\[\d+/\d+\] (.*)", line)
        if step:
            source = re.search(r"\s-c\s+(\S+\.cu)(\s|$)", step.group(1))
            current = str(Path(source.group(1)).resolve().relative_to(ROOT)) if source else None
            if current is not None:
                found[current] = []
        elif current is not None and any(key in line for key in _PTXAS_KEEP):
            found[current].append(line.rstrip())
    PTXAS_DIR.mkdir(parents=True, exist_ok=True)
    for source, lines in found.items():
        _ptxas_file(source).write_text("\n".join(lines) + "\n")
    report = []
    for source in cuda_sources:
        if _ptxas_file(source).exists():
            report += [f"## {source}", *_ptxas_file(source).read_text().splitlines()]
    PTXAS_REPORT.write_text("\n".join(report) + "\n")
    return sum(1 for line in report if "Compiling entry function" in line)


PLAN = _plan()


def _plan_line(plan: dict) -> str:
    """The one line that says what this build does, and why not more."""
    if not plan["native"]:
        return f"native extension skipped, installing pure Python: {plan['native_skipped_reason']}"
    if not plan["cuda"]:
        return f"CUDA part skipped, building the CPU part only: {plan['cuda_skipped_reason']}"
    return (
        f"building CPU + CUDA parts for archs {plan['cuda_archs']} with nvcc {plan['nvcc_version']} "
        f"({plan['cuda_home']}), MAX_JOBS={os.environ.get('MAX_JOBS', '2')}"
    )


def _extensions() -> list:
    if not PLAN["native"]:
        return []
    if PLAN["cuda_home"]:
        os.environ["CUDA_HOME"] = PLAN["cuda_home"]  # before cpp_extension reads it at import
    if PLAN["cuda"]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(PLAN["cuda_archs"])
    os.environ.setdefault("MAX_JOBS", "2")  # these machines have 2 cores; nvcc needs ~1 GB per job
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    def sources(pattern: str) -> list[str]:
        return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))

    cpp_sources = sources("csrc/torch_bindings.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/meta/*.cpp")
    # -Wno-unknown-pragmas: torch's at::vec headers carry `#pragma unroll`, which g++ does not know.
    cxx_flags = ["-O3", "-Wno-unknown-pragmas"]
    if _X86_SIMD_BUILD:
        cxx_flags += ["-DFASTDIFF_CPU_HAVE_AVX2=1", "-DFASTDIFF_CPU_HAVE_AVX512=1"]
    link_flags = []
    if _torch_uses_openmp():
        # at::parallel_for is inline and parallelizes with `#pragma omp parallel`: without -fopenmp
        # the pragma is ignored and every CPU kernel runs on one thread. The .so then needs
        # libgomp.so.1, which resolves to the copy torch has already loaded (same soname).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not PLAN["cuda"]:
        return [
            CppExtension("fastdiff._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
        ]
    return [
        CUDAExtension(
            "fastdiff._C",
            cpp_sources + sources("csrc/cuda/*.cu"),
            define_macros=[("FASTDIFF_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-Xptxas", "-v"]},
            extra_link_args=link_flags,
        )
    ]


def _torch_uses_openmp() -> bool:
    import torch

    return sys.platform.startswith("linux") and "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _native_build_ext() -> type:
    from torch.utils.cpp_extension import BuildExtension

    class NativeBuildExt(BuildExtension):
        """BuildExtension that keeps the compiler log and records what it built."""

        def finalize_options(self) -> None:
            super().finalize_options()
            # A fixed object directory (editable installs otherwise use a fresh temp dir) lets ninja
            # rebuild only what changed when `pip install -e .` runs again: minutes saved on 2 cores.
            self.build_temp = str(ROOT / "build" / f"temp-py{sys.version_info[0]}{sys.version_info[1]}")

        def run(self) -> None:
            _say(_plan_line(PLAN))  # here, not at module level: pip runs setup.py more than once
            cuda_sources = [s for ext in self.extensions for s in ext.sources if s.endswith(".cu")]
            for source in cuda_sources:
                # No ptxas record for an up-to-date object: drop the object so nvcc runs (and reports).
                if not _ptxas_file(source).exists():
                    Path(self.build_temp, source).with_suffix(".o").unlink(missing_ok=True)
            start = time.monotonic()
            with _tee_stdout(NATIVE_LOG):
                super().run()
            seconds = time.monotonic() - start
            if PLAN["cuda"]:
                entries = _update_ptxas_report(NATIVE_LOG, cuda_sources)
                _say(f"ptxas report ({entries} kernel entries) written to {PTXAS_REPORT.relative_to(ROOT)}")
            info = _build_info(PLAN, built=True, seconds=seconds)
            for package_dir in self._package_dirs():
                _write_build_info(package_dir, info)
                if PLAN["cuda"] and PTXAS_REPORT.exists():
                    # Installed with the package, so `fastdiff info --kernels` works outside a checkout.
                    shutil.copyfile(PTXAS_REPORT, package_dir / PACKAGED_PTXAS_REPORT)
            _say(f"built fastdiff._C in {seconds:.0f} s (cuda_compiled={info['cuda_compiled']})")

        def build_extension(self, ext) -> None:
            # BuildExtension.build_extensions has installed its ninja compile by now; split it.
            self.compiler.compile = _compile_simd_files_apart(self.compiler.compile)
            super().build_extension(ext)

        def _package_dirs(self) -> list[Path]:
            dirs = [Path(self.build_lib) / "fastdiff"]
            if self.inplace or getattr(self, "editable_mode", False):
                dirs.append(ROOT / "fastdiff")
            return dirs

    return NativeBuildExt


# x86-64 gets AVX2 and AVX-512 builds of the CPU loops next to the portable one (picked at run time
# from torch's own CPU capability): *_avx2.cpp and *_avx512.cpp files are compiled with these flags,
# every other file without them. Least capable first: that is also their order on the link line.
_X86_SIMD_BUILD = platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux")
AVX2_SUFFIX = "_avx2.cpp"
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
AVX512_SUFFIX = "_avx512.cpp"
# The subset torch builds its own AVX512 kernels with (F, BW, VL, DQ), so at::vec's 512-bit code compiles.
# g++ 12 flags _mm512_undefined_* inside its own avx512fintrin.h as maybe-uninitialized (a false positive).
AVX512_FLAGS = [
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
    "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-Wno-maybe-uninitialized",
]  # fmt: skip
SIMD_BUILDS = ((AVX2_SUFFIX, AVX2_FLAGS), (AVX512_SUFFIX, AVX512_FLAGS))


def _compile_simd_files_apart(compile_fn):
    """Wrap cpp_extension's ninja compile so *_avx2.cpp / *_avx512.cpp get their flags and link last.

    cpp_extension applies one flag set to every source. Portable objects come first on the link
    line, then AVX2, then AVX-512: for an inline function that several files emit, the linker keeps
    the first copy, which is always from the least capable build that has it, so no AVX2 or AVX-512
    instruction can leak into code that runs on CPUs without them.
    """

    def compile(sources, *args, extra_postargs=None, **kwargs):
        simd_suffixes = tuple(suffix for suffix, _ in SIMD_BUILDS)
        portable = [s for s in sources if not s.endswith(simd_suffixes)]
        objects = compile_fn(portable, *args, extra_postargs=extra_postargs, **kwargs)
        for suffix, simd_flags in SIMD_BUILDS:
            simd = [s for s in sources if s.endswith(suffix)]
            if not simd:
                continue
            flags = dict(extra_postargs or {})
            if _X86_SIMD_BUILD:
                flags["cxx"] = list(flags.get("cxx", [])) + simd_flags
            objects += compile_fn(simd, *args, extra_postargs=flags, **kwargs)
        return objects

    return compile


class PurePythonBuildPy(build_py):
    """Records the reason in _build_info.json when no native extension is built."""

    def run(self) -> None:
        _say(_plan_line(PLAN))
        super().run()
        info = _build_info(PLAN, built=False, seconds=None)
        dirs = [Path(self.build_lib) / "fastdiff"]
        if getattr(self, "editable_mode", False):
            dirs.append(ROOT / "fastdiff")
        for package_dir in dirs:
            _write_build_info(package_dir, info)


ext_modules = _extensions()
if ext_modules:
    cmdclass = {"build_ext": _native_build_ext()}
else:
    cmdclass = {"build_py": PurePythonBuildPy, "build_ext": build_ext}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
