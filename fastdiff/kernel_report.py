"""Resource usage of every compiled GPU kernel: registers, spills, stack and shared memory.

The build keeps nvcc's ``-Xptxas -v`` output (``fastdiff/_ptxas_report.txt``, installed with the
package); this module parses it into one row per kernel and architecture for
``fastdiff info --kernels`` and for the tests that require zero spills.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KernelResources", "parse_ptxas", "native_kernels", "format_kernels", "REPORT_PATH"]

REPORT_PATH = Path(__file__).with_name("_ptxas_report.txt")

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_USAGE = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


@dataclass
class KernelResources:
    source: str
    kernel: str  # mangled name
    arch: str  # "sm_80"
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0

    @property
    def spills(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


def parse_ptxas(text: str) -> list[KernelResources]:
    """Rows from ptxas -v output; "## <source>" lines (written by setup.py) name the file."""
    rows: list[KernelResources] = []
    source = ""
    current: KernelResources | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            source = line[3:].strip()
            continue
        entry = _ENTRY.search(line)
        if entry:
            current = KernelResources(source, entry["name"], entry["arch"])
            rows.append(current)
            continue
        if current is None:
            continue
        if frame := _FRAME.search(line):
            current.stack_bytes = int(frame["stack"])
            current.spill_store_bytes = int(frame["stores"])
            current.spill_load_bytes = int(frame["loads"])
        if usage := _USAGE.search(line):
            current.registers = int(usage["regs"])
            if smem := _SMEM.search(line):
                current.shared_bytes = int(smem["smem"])
    return rows


def native_kernels() -> list[KernelResources]:
    """The kernels of the installed fastdiff._C ([] when it has no CUDA part or no report)."""
    return parse_ptxas(REPORT_PATH.read_text()) if REPORT_PATH.exists() else []


def _short_names(mangled: list[str]) -> dict[str, str]:
    """Readable kernel names: demangled by c++filt when present, namespaces and arguments dropped."""
    names = dict(zip(mangled, mangled, strict=True))
    if mangled and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=False)
        demangled = out.stdout.splitlines()
        if out.returncode == 0 and len(demangled) == len(mangled):
            for m, d in zip(mangled, demangled, strict=True):
                d = d.replace("(anonymous namespace)::", "").removeprefix("void ")
                d = d.split("(", 1)[0]  # drop the argument list
                names[m] = re.sub(r"\b\w+::", "", d)  # and the namespaces
    return names


def format_kernels(rows: list[KernelResources]) -> str:
    if not rows:
        return "  no CUDA kernels compiled (see 'CUDA kernels' above for why)"
    names = _short_names([r.kernel for r in rows])
    width = max(len(names[r.kernel]) for r in rows)
    lines = [f"  {'kernel':<{width}}  arch    regs  spill(B)  stack(B)  smem(B)  source"]
    for r in sorted(rows, key=lambda r: (r.source, names[r.kernel], r.arch)):
        lines.append(
            f"  {names[r.kernel]:<{width}}  {r.arch:<6} {r.registers:5d}  {r.spills:8d}  {r.stack_bytes:8d}  "
            f"{r.shared_bytes:7d}  {r.source}"
        )
    total_spills = sum(r.spills for r in rows)
    lines.append(f"  {len(rows)} kernel builds, {total_spills} bytes of spills in all")
    return "\n".join(lines)
