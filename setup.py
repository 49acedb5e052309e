"""Build fastdiff._C from csrc/ with torch.utils.cpp_extension and ninja.

Install (after torch):  pip install -e . --no-build-isolation

What gets built, decided once here and recorded in fastdiff/_build_info.json:
  * the CPU part always, when a C++ compiler exists;
  * the CUDA part when torch is a CUDA build and an nvcc of the same major version is found
    (arches from TORCH_CUDA_ARCH_LIST, default "8.0;9.0"); otherwise one line says why it was skipped;
  * nothing native with FASTDIFF_SKIP_NATIVE=1, or when no C++ compiler / no torch is found: the
    package then installs as pure Python and runs on the reference backend.
Knobs: MAX_JOBS (default 2), FASTDIFF_SKIP_CUDA=1 (CPU part only), CUDA_HOME, CXX.

The source lists, the ISA builds, the flags and that decision live in tools/native_build.py, which the
top-level CMakeLists.txt (the build for C++ work: compile_commands.json, ctest) reads too; docs/build.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
import native_build  # noqa: E402  (the file lists, flags and build plan, shared with CMakeLists.txt)

PTXAS_REPORT = ROOT / "build" / "ptxas_report.txt"
PACKAGED_PTXAS_REPORT = "_ptxas_report.txt"  # the copy inside the package (fastdiff/)
PTXAS_DIR = ROOT / "build" / "ptxas"
NATIVE_LOG = ROOT / "build" / "native_build.log"


def _say(message: str) -> None:
    print(f"fastdiff build: {message}", flush=True)


def _build_info(plan: dict, built: bool, seconds: float | None) -> dict:
    report = str(PTXAS_REPORT.relative_to(ROOT))
    return native_build.build_info(plan, built=built, seconds=seconds, builder="setup.py", ptxas_report=report)


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


PLAN = native_build.plan()


def _extensions() -> list:
    if not PLAN["native"]:
        return []
    native_build.export_cuda_env(PLAN)  # before cpp_extension is imported
    os.environ.setdefault("MAX_JOBS", "2")  # these machines have 2 cores; nvcc needs ~1 GB per job
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    found = native_build.sources()
    cpp_sources = found["portable"] + [s for name, _, _ in native_build.SIMD_BUILDS for s in found[name]]
    openmp = native_build.torch_uses_openmp()
    cxx_flags = native_build.cxx_flags(openmp)
    link_flags = ["-fopenmp"] if openmp else []
    if not PLAN["cuda"]:
        return [
            CppExtension(
                native_build.EXTENSION, cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
            )
        ]
    return [
        CUDAExtension(
            native_build.EXTENSION,
            cpp_sources + found["cuda"],
            define_macros=[(native_build.CUDA_DEFINE, None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": native_build.NVCC_FLAGS},
            extra_link_args=link_flags,
        )
    ]


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
            _say(native_build.plan_line(PLAN))  # here, not at module level: pip runs setup.py more than once
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
                native_build.write_build_info(package_dir, info)
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


def _compile_simd_files_apart(compile_fn):
    """Wrap cpp_extension's ninja compile so *_avx2.cpp / *_avx512.cpp get their flags and link last.

    cpp_extension applies one flag set to every source. Portable objects come first on the link
    line, then AVX2, then AVX-512 (native_build.SIMD_BUILDS says why that order).
    """

    def compile(sources, *args, extra_postargs=None, **kwargs):
        simd_suffixes = tuple(suffix for _, suffix, _ in native_build.SIMD_BUILDS)
        portable = [s for s in sources if not s.endswith(simd_suffixes)]
        objects = compile_fn(portable, *args, extra_postargs=extra_postargs, **kwargs)
        for _, suffix, _ in native_build.SIMD_BUILDS:
            simd = [s for s in sources if s.endswith(suffix)]
            if not simd:
                continue
            flags = dict(extra_postargs or {})
            flags["cxx"] = list(flags.get("cxx", [])) + native_build.simd_flags(simd[0])
            objects += compile_fn(simd, *args, extra_postargs=flags, **kwargs)
        return objects

    return compile


class PurePythonBuildPy(build_py):
    """Records the reason in _build_info.json when no native extension is built."""

    def run(self) -> None:
        _say(native_build.plan_line(PLAN))
        super().run()
        info = _build_info(PLAN, built=False, seconds=None)
        dirs = [Path(self.build_lib) / "fastdiff"]
        if getattr(self, "editable_mode", False):
            dirs.append(ROOT / "fastdiff")
        for package_dir in dirs:
            native_build.write_build_info(package_dir, info)


ext_modules = _extensions()
if ext_modules:
    cmdclass = {"build_ext": _native_build_ext()}
else:
    cmdclass = {"build_py": PurePythonBuildPy, "build_ext": build_ext}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
