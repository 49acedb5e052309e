"""Ahead-of-time builds of every Triton kernel configuration for real GPUs, on a machine without one.

``triton.compile(..., target=GPUTarget("cuda", 80 | 90, 32))`` runs the whole pipeline down to a
cubin without a driver. For each build this records what decides whether the kernel is any good on
that GPU: registers per thread and spills (``ptxas -v`` on Triton's PTX, with Triton's flags),
shared memory (Triton's allocation: its pipelined tiles live there), and whether the SASS
(``cuobjdump -sass``) runs the dots on tensor cores (HMMA on sm_80; HGMMA, i.e. wgmma, on sm_90).

Each op with Triton kernels registers a :class:`KernelFamily` here (:data:`FAMILIES`): the list of
its builds, how to compile one, and what source decides the code (the cache key). The families:

- attention: every autotune configuration x dtype x head dim (40, 80, 160: one per BLOCK_D bucket,
  each masked) x arch, with the argument specialization the JIT would give contiguous (B, H, N, D)
  inputs ("d-contig": stride along D is 1), and for fp16 also the qkv-view layout of
  SpatialSelfAttention ("n-contig": stride along N is 1) and the 64-bit-offset variant the launcher
  picks when a (batch, head) spans 2**31 elements or more ("d-contig-int64").
- group_norm_adagn: every kernel of each plan in fastdiff.triton.group_norm_adagn.AOT_PLANS (fused;
  statistics and apply) x dtype x arch, with every optional part and SiLU, in NCHW or channels_last.

Each family's report is cached on disk (``FASTDIFF_CACHE_DIR``, default ``~/.cache/fastdiff``)
under a key of its kernel source, its build list, Triton's and ptxas' versions, so the tests and
``fastdiff info --kernels`` compile once per change.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.compiler import ASTSource

from ..kernel_report import parse_ptxas
from . import _compat
from . import attention as _attention
from . import group_norm_adagn as _group_norm_adagn
from . import layer_norm_modulate as _layer_norm_modulate
from . import sampler_step as _sampler_step

__all__ = [
    "ARCHS",
    "SHARED_LIMITS",
    "TritonBuild",
    "KernelFamily",
    "FAMILIES",
    "register_family",
    "attention_builds",
    "compile_build",
    "attention_report",
    "group_norm_adagn_builds",
    "compile_group_norm_adagn_build",
    "compile_sampler_step_build",
    "layer_norm_modulate_builds",
    "compile_layer_norm_modulate_build",
    "report",
    "format_triton_kernels",
    "cache_path",
    "main",
]

ARCHS = (80, 90)
# Largest dynamic shared memory one block may opt into (CUDA C Programming Guide, compute
# capabilities table): sm_80 (A100) 163 KB, sm_86/sm_89 99 KB, sm_90 227 KB. An sm_80 cubin also
# runs on sm_86/89, so a build must fit 99 KB to run on every GPU that can load it; the tuner skips
# the ones that do not fit the GPU at hand.
SHARED_LIMITS = {80: 166912, 86: 101376, 90: 232448}
HEAD_DIMS = (40, 80, 160)
_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}
# A SASS instruction line: "/*0a30*/   @!P0 HMMA.16816.F32 R4, R16, R20, R4 ;" -> "HMMA".
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_CUOBJDUMP_REGS = re.compile(r"REG:(\d+)")
# PTX division and square root that are not correctly rounded: what `/` and tl.sqrt compile to in
# float32 (div.full.f32 is within 2 ulp, sqrt.approx ~1 ulp); tl.div_rn/tl.sqrt_rn give div.rn/sqrt.rn.
_INEXACT_PTX = re.compile(r"\b((?:div\.(?:full|approx)|sqrt\.approx|rsqrt\.approx)(?:\.ftz)?\.f32)\b")


@dataclass
class TritonBuild:
    """One compiled configuration of one kernel for one GPU architecture."""

    kernel: str
    arch: str  # "sm_80", "sm_90a"
    dtype: str  # "float16"
    head_dim: int  # attention's D; 0 for other ops
    block_d: int  # attention's BLOCK_D; 0 for other ops
    config: str  # "M128-N64-w4-s3", "fused-C16-S1024-w16"
    layout: str  # "d-contig" | "n-contig" | "d-contig-int64" (attention), "nchw" | "channels_last" (group_norm_adagn)
    op: str = "attention"  # the KernelFamily it belongs to
    registers: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    cubin_registers: int = 0  # cuobjdump's count on Triton's own cubin: must equal ``registers``
    mma: list[str] = field(default_factory=list)  # tensor-core instructions in the SASS
    inexact_ptx: list[str] = field(default_factory=list)  # approximate division/sqrt forms in the PTX
    async_copies: bool = False  # cp.async in the PTX: global->shared copies in flight (pipelined loads)
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
    if layout in ("d-contig", "d-contig-int64"):
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
        if isinstance(value, torch.Tensor):  # each pointer in its tensor's dtype (tt: a fallback)
            signature[name] = "*" + _TT.get(value.dtype, tt)
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
                    layouts = ("d-contig", "n-contig", "d-contig-int64") if dtype == torch.float16 else ("d-contig",)
                    builds += [(arch, dtype, head_dim, config, layout) for layout in layouts]
    return builds


def _tool(name: str) -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    return str(cuda)


def _measure(kernel, args: list, constants: dict, arch: int, options: dict, row: dict) -> TritonBuild:
    """Compile ``kernel`` with the JIT's specialization of ``args`` for ``sm_<arch>`` and measure
    it: ``row`` gives the build's descriptive fields; the rest comes from Triton, ptxas and cuobjdump."""
    kernel = _compat.as_jit(kernel)
    signature, constexprs, attrs = _specialize(kernel, args, constants, "fp32")
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=_compat.GPUTarget("cuda", arch, 32),
        options=options,
    )
    seconds = time.perf_counter() - start
    gpu = _compat.sm_arch(arch)
    build = TritonBuild(
        kernel=compiled.metadata.name,
        arch=gpu,
        shared_bytes=int(compiled.metadata.shared),
        compile_seconds=round(seconds, 2),
        **row,
    )
    with tempfile.TemporaryDirectory(prefix="fastdiff-aot-") as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        # Triton's own ptxas flags (backends/nvidia/compiler.py make_cubin), so the counts are its cubin's.
        log = subprocess.run(
            [
                _tool("ptxas"),
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={gpu}",
                str(ptx),
                "-o",
                str(Path(tmp, "check.cubin")),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    parsed = parse_ptxas(log)
    if len(parsed) != 1:
        raise RuntimeError(f"aot: expected one entry in ptxas -v output for {gpu}, got:\n{log}")
    r = parsed[0]
    build.registers, build.stack_bytes = r.registers, r.stack_bytes
    build.spill_store_bytes, build.spill_load_bytes = r.spill_store_bytes, r.spill_load_bytes
    if m := _CUOBJDUMP_REGS.search(usage):
        build.cubin_registers = int(m[1])
    build.mma = sorted({op for op in _OPCODE.findall(sass) if "MMA" in op})
    ptx_text = compiled.asm["ptx"]
    build.inexact_ptx = sorted(set(_INEXACT_PTX.findall(ptx_text)))
    build.async_copies = "cp.async" in ptx_text
    return build


def compile_build(arch: int, dtype: torch.dtype, head_dim: int, config, layout: str) -> TritonBuild:
    """Compile one attention build for ``sm_<arch>`` and measure it (no GPU needed)."""
    q, k, v, out = _example_tensors(layout, dtype, head_dim)
    args = _attention.kernel_args(q, k, v, out, 1.0 / head_dim**0.5)
    constants = _attention.kernel_constants(
        head_dim,
        dtype,
        config,
        align=_attention.stride_align(q, k, v, out),
        int64_offsets=layout.endswith("-int64") or _attention.needs_int64_offsets(q, k, v, out),
    )
    row = dict(
        dtype=str(dtype).removeprefix("torch."),
        head_dim=head_dim,
        block_d=constants["BLOCK_D"],
        config=str(config),
        layout=layout,
        op="attention",
    )
    return _measure(
        _attention.KERNEL, args, constants, arch, {"num_warps": config.num_warps, "num_stages": config.num_stages}, row
    )


def group_norm_adagn_builds() -> list[tuple]:
    """(arch, dtype, layout, (B, C, S), G, plan, kernel) for every group_norm_adagn build."""
    builds = []
    for arch in ARCHS:
        for dtype in _group_norm_adagn.DTYPES:
            for layout, shape, groups, plan in _group_norm_adagn.AOT_PLANS:
                kernels = ("fused",) if plan.path == "fused" else ("stats", "apply")
                builds += [(arch, dtype, layout, shape, groups, plan, kernel) for kernel in kernels]
    return builds


def _group_norm_adagn_example(layout: str, dtype: torch.dtype, shape: tuple[int, int, int]):
    """Meta (B, C, S) views of x and out with the layout's strides, and every part in x's dtype."""
    B, C, S = shape
    if layout == "nchw":
        x3, out3 = (torch.empty(B, C, S, dtype=dtype, device="meta") for _ in range(2))
    else:  # channels_last: channels adjacent, (B, S, C) memory seen as (B, C, S)
        x3, out3 = (torch.empty(B, S, C, dtype=dtype, device="meta").transpose(1, 2) for _ in range(2))
    parts = {
        n: torch.empty((C,) if n in ("weight", "bias") else (B, C), dtype=dtype, device="meta")
        for n in _group_norm_adagn.PARTS
    }
    return x3, out3, parts


def compile_group_norm_adagn_build(
    arch: int, dtype: torch.dtype, layout: str, shape: tuple[int, int, int], groups: int, plan, kernel: str
) -> TritonBuild:
    """Compile one group_norm_adagn kernel of ``plan`` (every part present, SiLU) for ``sm_<arch>``."""
    x3, out3, parts = _group_norm_adagn_example(layout, dtype, shape)
    partials = torch.empty(shape[0] * groups * plan.splits * 3, dtype=torch.float32, device="meta")
    args = _group_norm_adagn.kernel_args(x3, out3, parts, partials, groups, 1e-5, plan)[kernel]
    constants = _group_norm_adagn.kernel_constants(parts, True, plan)[kernel]
    row = dict(
        dtype=str(dtype).removeprefix("torch."),
        head_dim=0,
        block_d=0,
        config=str(plan),
        layout=layout,
        op="group_norm_adagn",
    )
    return _measure(_group_norm_adagn.KERNELS[kernel], args, constants, arch, {"num_warps": plan.num_warps}, row)


def compile_sampler_step_build(arch: int, dtype: torch.dtype, variant: str) -> TritonBuild:
    """Compile one sampler_step build (:func:`fastdiff.triton.sampler_step.aot_builds`) for ``sm_<arch>``."""
    args, constants, config = _sampler_step.aot_example(dtype, variant)
    row = dict(
        dtype=str(dtype).removeprefix("torch."),
        head_dim=0,
        block_d=4 * config.block_q,
        config=str(config),
        layout=variant,
        op="sampler_step",
    )
    return _measure(_sampler_step.KERNEL, args, constants, arch, {"num_warps": config.num_warps}, row)


# (D, parts, rows per program): DiT-XL/2's 1152 features with scale/shift read in place from the
# (B, 6D) adaLN output, 4 tokens a program; and the largest row the kernel takes, with every part.
_LAYER_NORM_MODULATE_PLANS = (
    (1152, ("scale", "shift"), 4),
    (_layer_norm_modulate.MAX_FEATURES, ("weight", "bias", "scale", "shift"), 1),
)


def layer_norm_modulate_builds() -> list[tuple]:
    """(arch, dtype, D, parts, rows) for every layer_norm_modulate build."""
    return [
        (arch, dtype, d, parts, rows)
        for arch in ARCHS
        for dtype in _layer_norm_modulate.DTYPES
        for d, parts, rows in _LAYER_NORM_MODULATE_PLANS
    ]


def compile_layer_norm_modulate_build(
    arch: int, dtype: torch.dtype, features: int, parts: tuple[str, ...], rows: int
) -> TritonBuild:
    """Compile the layer_norm_modulate kernel for (8, 256, features) tokens on ``sm_<arch>``."""
    B, N, D = 8, 256, features
    x, y = (torch.empty(B, N, D, dtype=dtype, device="meta") for _ in range(2))
    modulation = torch.empty(B, 6 * D, dtype=torch.float32, device="meta")  # DiT's adaLN output
    given = {
        "weight": torch.empty(D, dtype=dtype, device="meta"),
        "bias": torch.empty(D, dtype=dtype, device="meta"),
        "scale": modulation[:, :D],
        "shift": modulation[:, D : 2 * D],
    }
    given = {name: t for name, t in given.items() if name in parts}

    def strides(name: str, n: int) -> tuple[int, ...]:
        return given[name].stride() if name in given else (0,) * n

    args = [
        x,
        y,
        *(given.get(name, x) for name in ("weight", "bias", "scale", "shift")),
        *x.stride(),
        *strides("weight", 1),
        *strides("bias", 1),
        *strides("scale", 2),
        *strides("shift", 2),
        N,
        D,
        1e-6,
    ]
    block_d = triton.next_power_of_2(D)
    constants = dict(
        HAS_WEIGHT="weight" in given,
        HAS_BIAS="bias" in given,
        HAS_SCALE="scale" in given,
        HAS_SHIFT="shift" in given,
        BLOCK_D=block_d,
        ROWS=rows,
        ROUND_BF16=False,
    )
    row = dict(
        dtype=str(dtype).removeprefix("torch."),
        head_dim=0,
        block_d=block_d,
        config=f"D{D}-rows{rows}-{'+'.join(parts)}",
        layout="contiguous",
        op="layer_norm_modulate",
    )
    return _measure(
        _layer_norm_modulate.KERNEL, args, constants, arch, {"num_warps": _layer_norm_modulate._num_warps(block_d)}, row
    )


def _ptxas_version() -> str:
    out = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


@dataclass(frozen=True)
class KernelFamily:
    """One op's Triton kernels in the AOT report.

    ``builds()`` lists hashable-by-repr descriptors, ``compile(*descriptor)`` compiles and measures
    one, ``sources`` are the functions whose source decides the code (hashed into the cache key with
    the build list), ``columns``/``cells`` are the table's op-specific header and row cells, and
    ``tensor_cores`` says whether every build must run its dots on tensor cores.
    """

    op: str
    builds: Callable[[], list[tuple]]
    compile: Callable[..., TritonBuild]
    sources: Callable[[], Sequence[Callable]]
    columns: str = ""
    cells: Callable[[TritonBuild], str] = lambda r: ""
    tensor_cores: bool = False

    def label(self, build: tuple) -> str:
        return " ".join(str(p).removeprefix("torch.") for p in build)


FAMILIES: dict[str, KernelFamily] = {}


def register_family(family: KernelFamily) -> KernelFamily:
    """Add (or replace) an op's kernels in the report; ``python -m fastdiff.triton.aot --op NAME`` compiles them."""
    FAMILIES[family.op] = family
    return family


register_family(
    KernelFamily(
        op="attention",
        builds=attention_builds,
        compile=compile_build,
        sources=lambda: (
            _attention.KERNEL.fn,
            _attention.kernel_constants,
            _attention.kernel_args,
            compile_build,
            _example_tensors,
            _attention.stride_align,
            _attention.needs_int64_offsets,
        ),
        columns="  D  BLOCK_D",
        cells=lambda r: f"{r.head_dim:3d}  {r.block_d:7d}",
        tensor_cores=True,
    )
)
register_family(
    KernelFamily(
        op="group_norm_adagn",
        builds=group_norm_adagn_builds,
        compile=compile_group_norm_adagn_build,
        sources=lambda: (
            *(k.fn for k in _group_norm_adagn.KERNELS.values()),
            _group_norm_adagn.kernel_constants,
            _group_norm_adagn.kernel_args,
            compile_group_norm_adagn_build,
            _group_norm_adagn_example,
        ),
    )
)

register_family(
    KernelFamily(
        op="sampler_step",
        builds=lambda: _sampler_step.aot_builds(),
        compile=compile_sampler_step_build,
        sources=lambda: (
            _sampler_step.KERNEL.fn,
            _sampler_step.kernel_constants,
            _sampler_step.kernel_args,
            _sampler_step.aot_example,
            compile_sampler_step_build,
        ),
    )
)

register_family(
    KernelFamily(
        op="layer_norm_modulate",
        builds=layer_norm_modulate_builds,
        compile=compile_layer_norm_modulate_build,
        sources=lambda: (
            _layer_norm_modulate.KERNEL.fn,
            _layer_norm_modulate._num_warps,
            compile_layer_norm_modulate_build,
        ),
    )
)


def _cache_key(family: KernelFamily, builds: Iterable) -> str:
    h = hashlib.sha256()
    # What decides the builds' code, not the modules' prose: edits elsewhere keep the cache.
    for fn in (*family.sources(), _measure, _specialize):
        h.update(inspect.getsource(fn).encode())
    h.update(triton.__version__.encode())
    h.update(_ptxas_version().encode())
    h.update(repr([tuple(str(p) for p in b) for b in builds]).encode())
    return h.hexdigest()[:16]


def cache_path(builds: Iterable | None = None, op: str = "attention") -> Path:
    """Where the report of ``op``'s builds (default: all of them) is cached."""
    family = FAMILIES[op]
    root = Path(os.environ.get("FASTDIFF_CACHE_DIR", Path.home() / ".cache" / "fastdiff"))
    key = _cache_key(family, family.builds() if builds is None else builds)
    return root / f"triton_aot_{op}_{key}.json"


def _compile_all(path: Path, op: str = "attention") -> list[TritonBuild]:
    family = FAMILIES[op]
    rows = []
    for build in family.builds():
        rows.append(family.compile(*build))
        print(f"aot: {family.label(build)}: {rows[-1].compile_seconds:.1f} s", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    tmp.replace(path)  # atomic: a concurrent reader sees no file or the whole of it
    return rows


def report(op: str | None = None, *, use_cache: bool = True, compile_missing: bool = True) -> list[TritonBuild]:
    """Every build of ``op`` (default: of every family) compiled and measured, from the cache if
    there; ``compile_missing=False`` skips what is not cached instead of compiling it.

    The builds run in a child process without TRITON_INTERPRET: compiling needs Triton's language
    functions in compiled mode, and a test session on a machine without a GPU runs them interpreted.
    """
    rows: list[TritonBuild] = []
    for name in FAMILIES if op is None else (op,):
        path = cache_path(op=name)
        if not (use_cache and path.exists()):
            if not compile_missing:
                continue
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            package_root = str(Path(__file__).resolve().parents[2])  # this fastdiff, not another install
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
            result = subprocess.run(
                [sys.executable, "-m", "fastdiff.triton.aot", "--op", name, "--write", str(path)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"aot: compiling the Triton builds of {name} failed:\n{result.stderr[-4000:]}")
        rows += [TritonBuild(**row) for row in json.loads(path.read_text())]
    return rows


def attention_report(*, use_cache: bool = True, compile_missing: bool = True) -> list[TritonBuild]:
    """Every attention build (:func:`attention_builds`): ``report("attention")``."""
    return report("attention", use_cache=use_cache, compile_missing=compile_missing)


def format_triton_kernels(rows: list[TritonBuild]) -> str:
    """The report as one table per op, one build per line, each with a summary line."""
    if not rows:
        return "  no Triton builds (triton not installed, or not compiled yet: python -m fastdiff.triton.aot)"
    lines = []
    for op, family in FAMILIES.items():
        mine = [r for r in rows if r.op == op]
        if not mine:
            continue
        width = max(22, *(len(r.kernel) for r in mine))
        lines.append(
            f"  {'kernel':<{width}}  arch    dtype   {family.columns}  config                  layout    "
            "regs  spill(B)  smem(B)  MMA"
        )
        for r in mine:
            cells = f" {family.cells(r)}  " if family.columns else "  "
            lines.append(
                f"  {r.kernel:<{width}}  {r.arch:<6}  {r.dtype:<8}{cells}{r.config:<22}  {r.layout:<13}  "
                f"{r.registers:4d}  {r.spills:8d}  {r.shared_bytes:7d}  {','.join(r.mma) or 'none'}"
            )
        spills = sum(r.spills for r in mine)
        summary = f"  {op}: {len(mine)} Triton builds, {spills} bytes of spills in all"
        if family.tensor_cores:
            summary += f", {sum(1 for r in mine if not r.mma)} without tensor-core MMA"
        lines.append(summary)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m fastdiff.triton.aot [--op NAME [--write PATH]]``: compile the builds, print the report."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastdiff.triton.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=list(FAMILIES), help="only this op's builds (default: every op's)")
    parser.add_argument("--write", type=Path, help="with --op: write the report as JSON here (the cache file)")
    args = parser.parse_args(argv)
    if args.write is not None and args.op is None:
        parser.error("--write needs --op")
    rows = []
    for op in FAMILIES if args.op is None else (args.op,):
        rows += _compile_all(args.write or cache_path(op=op), op)
    print(format_triton_kernels(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
