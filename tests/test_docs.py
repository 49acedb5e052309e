"""The README's front-door commands and CI agree, and the tree passes ruff."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = [c for c in _readme_commands() if c.startswith("pip install")]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "fastdiff sample" in main_job
    assert tests.endswith("pytest tests")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    # `|| exit $?` only makes a failure before pytest stop CI (set -e ignores it inside an && list).
    assert tests in ci or f"{tests} || exit $?" in ci, "the README's test command must appear verbatim in .ci/run"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean():
    proc = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_version_is_written_in_one_place():
    """pyproject.toml reads it from fastdiff.__version__; an installed fastdiff reports the same."""
    import importlib.metadata

    import fastdiff

    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]\n", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"(?m)^version\s*=", project), "pyproject.toml's [project] must not write the version"
    assert 'version = { attr = "fastdiff.__version__" }' in pyproject
    try:
        installed = importlib.metadata.version("fastdiff")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fastdiff is not installed (pip install -e .): only the source was checked")
    assert installed == fastdiff.__version__


def test_docs_link_only_to_files_in_the_repository():
    """The README and docs/ link to files that exist here (none to the team's material outside it)."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (page.parent / target).resolve().exists(), f"{page.relative_to(ROOT)} links to {target}"
            assert (page.parent / target).resolve().is_relative_to(ROOT), f"{page.relative_to(ROOT)}: {target}"
