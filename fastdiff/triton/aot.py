"""Ahead-of-time builds of every Triton kernel configuration for real GPUs, on a machine without one.

``triton.compile(..., target=GPUTarget("cuda", 80 | 90, 32))`` runs the whole pipeline down to a
cubin without a driver. For each build this records what decides whether the kernel is any good on
that GPU: registers per thread and spills (``ptxas -v`` on Triton's PTX, with Triton's flags),
shared memory (Triton's allocation: its pipelined tiles live there), and whether the SASS
(``cuobjdump -sass``) runs the dots on tensor cores (HMMA on sm_80; HGMMA, i.e. wgmma, on sm_90).

Builds: every autotune configuration x dtype x head dim (40, 80, 160: one per BLOCK_D bucket, each
masked) x arch, with the argument specialization the JIT would give contiguous (B, H, N, D) inputs
("d-contig": stride along D is 1), and for fp16 also the qkv-view layout of SpatialSelfAttention
("n-contig": stride along N is 1). The report is cached on disk (``FASTDIFF_CACHE_DIR``, default
``~/.cache/fastdiff``) under a key of the kernel source, the build list, Triton's and ptxas'
versions, so the tests and ``fastdiff info --kernels`` compile once per change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.compiler import ASTSource

from ..kernel_report import parse_ptxas
from . import _compat
from . import attention as _attention

__all__ = [
    "ARCHS",
    "SHARED_LIMITS",
    "TritonBuild",
    "attention_builds",
    "compile_build",
    "attention_report",
    "format_triton_kernels",
    "cache_path",
    "measure",
    "KERNELS",
    "kernel_report",
    "kernel_cache_path",
    "main",
]

ARCHS = (80, 90)
# Largest dynamic shared memory one block may opt into (CUDA C Programming Guide, compute
# capabilities table): sm_80 (A100) 163 KB, sm_86/sm_89 99 KB, sm_90 227 KB. An sm_80 cubin also
# runs on sm_86/89, so a build must fit 99 KB to run on every GPU that can load it; the tuner skips
# the ones that do not fit the GPU at hand.
SHARED_LIMITS = {80: 166912, 86: 101376, 90: 232448}
HEAD_DIMS = (40, 80, 160)
_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# A SASS instruction line: "/*0a30*/   @!P0 HMMA.16816.F32 R4, R16, R20, R4 ;" -> "HMMA".
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_CUOBJDUMP_REGS = re.compile(r"REG:(\d+)")


@dataclass
class TritonBuild:
    """One compiled configuration of one kernel for one GPU architecture."""

    kernel: str
    arch: str  # "sm_80", "sm_90a"
    dtype: str  # "float16"
    head_dim: int
    block_d: int
    config: str  # "M128-N64-w4-s3"
    layout: str  # "d-contig" | "n-contig"
    registers: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    cubin_registers: int = 0  # cuobjdump's count on Triton's own cubin: must equal ``registers``
    mma: list[str] = field(default_factory=list)  # tensor-core instructions in the SASS
    compile_seconds: float = 0.0

    @property
    def spills(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def capability(self) -> int:
        return int(self.arch.removeprefix("sm_").rstrip("a"))


def _example_tensors(layout: str, dtype: torch.dtype, head_dim: int):
    """Meta tensors with the strides the kernel sees in practice (the JIT specializes on them)."""
    B, H, N = 2, 8, 4096
    if layout == "d-contig":
        q, k, v = (torch.empty(B, H, N, head_dim, dtype=dtype, device="meta") for _ in range(3))
    else:  # views of a (B, 3C, N) 1x1-conv output, as SpatialSelfAttention reads them
        qkv = torch.empty(B, 3 * H * head_dim, N, dtype=dtype, device="meta")
        q, k, v = (t.transpose(-1, -2) for t in qkv.view(B, 3, H, head_dim, N).unbind(1))
    return q, k, v, torch.empty(B, H, N, head_dim, dtype=dtype, device="meta")


def _specialize(kernel, args: list, constants: dict, tt: str) -> tuple[dict, dict, dict]:
    """signature, constexprs and attrs as the JIT derives them: ints equal to 1 become constants,
    ints and pointers divisible by 16 get the divisibility hint (meta tensors sit at address 0)."""
    signature: dict[str, str] = {}
    constexprs = dict(constants)
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + tt
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def attention_builds() -> list[tuple[int, torch.dtype, int, _attention.AttentionConfig, str]]:
    """(arch, dtype, head_dim, config, layout) for every attention build the report covers."""
    builds = []
    for arch in ARCHS:
        for dtype in _attention.DTYPES:
            for head_dim in HEAD_DIMS:
                for config in _attention.configs_for(head_dim, dtype):
                    layouts = ("d-contig", "n-contig") if dtype == torch.float16 else ("d-contig",)
                    builds += [(arch, dtype, head_dim, config, layout) for layout in layouts]
    return builds


def _tool(name: str) -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    return str(cuda)


def compile_build(arch: int, dtype: torch.dtype, head_dim: int, config, layout: str) -> TritonBuild:
    """Compile one attention build for ``sm_<arch>`` and measure it (no GPU needed)."""
    kernel = _compat.as_jit(_attention.KERNEL)
    q, k, v, out = _example_tensors(layout, dtype, head_dim)
    args = _attention.kernel_args(q, k, v, out, 1.0 / head_dim**0.5)
    constants = _attention.kernel_constants(head_dim, dtype, config)
    signature, constexprs, attrs = _specialize(kernel, args, constants, _TT[dtype])
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=_compat.GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    seconds = time.perf_counter() - start
    row = TritonBuild(
        kernel=compiled.metadata.name, arch=_compat.sm_arch(arch), dtype=str(dtype).removeprefix("torch."),
        head_dim=head_dim, block_d=constants["BLOCK_D"], config=str(config), layout=layout,
        compile_seconds=round(seconds, 2),
    )
    return measure(compiled, row)


def measure(compiled, row: TritonBuild) -> TritonBuild:
    """Fill ``row`` (its ``arch`` set) from one ``triton.compile`` result: registers and spills (ptxas
    -v on Triton's PTX with Triton's flags), the cubin's own register count, shared memory, and the
    tensor-core instructions in the SASS. Every kernel's builds go through here."""
    gpu = row.arch
    row.shared_bytes = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory(prefix="fastdiff-aot-") as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        # Triton's own ptxas flags (backends/nvidia/compiler.py make_cubin), so the counts are its cubin's.
        log = subprocess.run(
            [_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(ptx),
             "-o", str(Path(tmp, "check.cubin"))],
            capture_output=True, text=True, check=True,
        ).stderr
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    parsed = parse_ptxas(log)
    if len(parsed) != 1:
        raise RuntimeError(f"aot: expected one entry in ptxas -v output for {gpu}, got:\n{log}")
    r = parsed[0]
    row.registers, row.stack_bytes = r.registers, r.stack_bytes
    row.spill_store_bytes, row.spill_load_bytes = r.spill_store_bytes, r.spill_load_bytes
    if m := _CUOBJDUMP_REGS.search(usage):
        row.cubin_registers = int(m[1])
    row.mma = sorted({op for op in _OPCODE.findall(sass) if "MMA" in op})
    return row


def _ptxas_version() -> str:
    out = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def _cache_key(builds: Iterable) -> str:
    h = hashlib.sha256()
    # What decides the builds' code, not the modules' prose: edits elsewhere keep the cache.
    for fn in (_attention.KERNEL.fn, _attention.kernel_constants, _attention.kernel_args, compile_build, measure,
               _specialize, _example_tensors):
        h.update(inspect.getsource(fn).encode())
    h.update(triton.__version__.encode())
    h.update(_ptxas_version().encode())
    h.update(repr([(a, str(d), hd, str(c), lay) for a, d, hd, c, lay in builds]).encode())
    return h.hexdigest()[:16]


def cache_path(builds: Iterable | None = None) -> Path:
    """Where the report for these builds (default: all of them) is cached."""
    root = Path(os.environ.get("FASTDIFF_CACHE_DIR", Path.home() / ".cache" / "fastdiff"))
    return root / f"triton_aot_attention_{_cache_key(attention_builds() if builds is None else builds)}.json"


def _compile_all(path: Path) -> list[TritonBuild]:
    rows = []
    for build in attention_builds():
        rows.append(compile_build(*build))
        print(f"aot: {rows[-1].arch} {rows[-1].dtype} D={rows[-1].head_dim} {rows[-1].config} {rows[-1].layout}: "
              f"{rows[-1].compile_seconds:.1f} s", file=sys.stderr, flush=True)
    _write_rows(path, rows)
    return rows


def _compile_in_child(path: Path, *extra: str) -> None:
    """Run ``python -m fastdiff.triton.aot [extra] --write path`` in a child process without
    TRITON_INTERPRET: compiling needs Triton's language functions in compiled mode, and a test
    session on a machine without a GPU runs them interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(__file__).resolve().parents[2])  # this fastdiff, not another install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-m", "fastdiff.triton.aot", *extra, "--write", str(path)], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"aot: compiling the Triton builds failed:\n{result.stderr[-4000:]}")


def attention_report(*, use_cache: bool = True, compile_missing: bool = True) -> list[TritonBuild]:
    """Every attention build (:func:`attention_builds`) compiled and measured, from the cache if
    there; ``compile_missing=False`` returns [] instead of compiling (about a minute on 2 cores).
    The builds run in a child process (:func:`_compile_in_child`)."""
    path = cache_path()
    if not (use_cache and path.exists()):
        if not compile_missing:
            return []
        _compile_in_child(path)
    return [TritonBuild(**row) for row in json.loads(path.read_text())]


# ---- other kernels' builds --------------------------------------------------------------------------
# A kernel module registered here lists its builds (``aot_builds()``) and compiles one
# (``aot_compile(build) -> TritonBuild``, through :func:`measure`); its report is compiled in a child
# process and cached like attention's, keyed by the module's whole source.
KERNELS = {"sampler_step": "fastdiff.triton.sampler_step"}


def _kernel_module(name: str):
    import importlib

    return importlib.import_module(KERNELS[name])


def kernel_cache_path(name: str) -> Path:
    """Where the report of a registered kernel's builds is cached."""
    module = _kernel_module(name)
    h = hashlib.sha256(inspect.getsource(module).encode())
    for fn in (measure, _specialize):
        h.update(inspect.getsource(fn).encode())
    h.update(triton.__version__.encode())
    h.update(_ptxas_version().encode())
    h.update(repr([tuple(map(str, b)) for b in module.aot_builds()]).encode())
    root = Path(os.environ.get("FASTDIFF_CACHE_DIR", Path.home() / ".cache" / "fastdiff"))
    return root / f"triton_aot_{name}_{h.hexdigest()[:16]}.json"


def kernel_report(name: str, *, use_cache: bool = True, compile_missing: bool = True) -> list[TritonBuild]:
    """Every build of the registered kernel ``name`` (:data:`KERNELS`), compiled and measured, cached."""
    path = kernel_cache_path(name)
    if not (use_cache and path.exists()):
        if not compile_missing:
            return []
        _compile_in_child(path, "--kernel", name)
    return [TritonBuild(**row) for row in json.loads(path.read_text())]


def _write_rows(path: Path, rows: list[TritonBuild]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    tmp.replace(path)  # atomic: a concurrent reader sees no file or the whole of it


def format_triton_kernels(rows: list[TritonBuild]) -> str:
    """The report as a table, one build per line, and a summary line."""
    if not rows:
        return "  no Triton builds (triton not installed, or not compiled yet: python -m fastdiff.triton.aot)"
    lines = [
        "  kernel                  arch    dtype     D  BLOCK_D  config           layout    regs  spill(B)  "
        "smem(B)  MMA"
    ]
    for r in rows:
        lines.append(
            f"  {r.kernel:<22}  {r.arch:<6}  {r.dtype:<8} {r.head_dim:3d}  {r.block_d:7d}  {r.config:<15}  "
            f"{r.layout:<8}  {r.registers:4d}  {r.spills:8d}  {r.shared_bytes:7d}  {','.join(r.mma) or 'none'}"
        )
    spills = sum(r.spills for r in rows)
    no_mma = sum(1 for r in rows if not r.mma)
    # Kernels without a dot (elementwise ones) have no MMA to miss: the count is for the others.
    mma = f", {no_mma} without tensor-core MMA" if any(r.mma for r in rows) else ", no dots (no MMA expected)"
    lines.append(f"  {len(rows)} Triton builds, {spills} bytes of spills in all{mma}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m fastdiff.triton.aot [--write PATH]``: compile every build, print the report."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastdiff.triton.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the report as JSON here (the cache file)")
    parser.add_argument("--kernel", choices=sorted(KERNELS), help="a registered kernel's builds instead of attention's")
    args = parser.parse_args(argv)
    if args.kernel is None:
        rows = _compile_all(args.write or cache_path())
    else:
        module = _kernel_module(args.kernel)
        rows = [module.aot_compile(build) for build in module.aot_builds()]
        _write_rows(args.write or kernel_cache_path(args.kernel), rows)
    print(format_triton_kernels(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
