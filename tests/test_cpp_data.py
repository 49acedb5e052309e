"""The C++ tests' expected values (tests/cpp/data/common_cases.txt) are what tests/cpp/make_data.py
writes from the current Python samplers and Philox oracle, byte for byte: a change on the Python side
that moves a value fails here until the file is regenerated (and the C++ tests, built with CMake and
run by ctest, then check the kernels' shared arithmetic against it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fastdiff

CPP = Path(__file__).resolve().parent / "cpp"
DATA = CPP / "data" / "common_cases.txt"


def test_checked_in_data_is_current(tmp_path):
    out = tmp_path / "common_cases.txt"
    # The script imports the fastdiff this session imported (a worktree's, with PYTHONPATH).
    root = str(Path(fastdiff.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, str(CPP / "make_data.py"), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = out.read_bytes(), DATA.read_bytes()
    if got != want:
        new, old = got.decode().splitlines(), want.decode().splitlines()
        first = next((i for i, (a, b) in enumerate(zip(new, old, strict=False)) if a != b), min(len(new), len(old)))
        detail = (
            f"line {first + 1}:\n  checked in: {old[first] if first < len(old) else '<end of file>'}\n"
            f"  generated:  {new[first] if first < len(new) else '<end of file>'}"
        )
        path = DATA.relative_to(CPP.parent.parent)
        raise AssertionError(
            f"{path} is stale; regenerate it with `python tests/cpp/make_data.py {path}` and rerun ctest. "
            f"First difference at {detail}"
        )
