"""Binder builds the environment the book was made with.

repo2docker reads only `binder/` when it exists: its `requirements.txt` (pip, with nested `-r`
files resolved against the file that names them), `runtime.txt` (Python) and `postBuild`.
"""

import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path

from conftest import ROOT

BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def read_requirements(path: Path) -> tuple[list[str], list[str]]:
    """(requirement lines, option lines) of a pip requirements file, following `-r` includes."""
    requirements, options = [], []
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            nested = read_requirements(path.parent / line.split(maxsplit=1)[1])
            requirements += nested[0]
            options += nested[1]
        elif line.startswith("-"):
            options.append(line)
        else:
            requirements.append(line)
    return requirements, options


def test_binder_installs_exactly_the_pinned_requirements():
    binder, options = read_requirements(BINDER / "requirements.txt")
    pinned, _ = read_requirements(ROOT / "requirements.txt")
    assert binder == pinned
    assert all(re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[0-9][0-9A-Za-z.+]*", r) for r in pinned), pinned


def test_the_pins_are_the_environment_the_book_was_built_with():
    """What Binder installs is what is installed here (torch as its CPU build)."""
    binder, _ = read_requirements(BINDER / "requirements.txt")
    nodeps, _ = read_requirements(ROOT / "requirements-nodeps.txt")
    for requirement in binder + nodeps:
        name, version = requirement.split("==")
        installed = importlib.metadata.version(name)
        assert installed in (version, f"{version}+cpu"), (
            f"{name}: pinned {version}, has {installed}"
        )


def test_binder_takes_torch_from_the_cpu_index():
    binder, options = read_requirements(BINDER / "requirements.txt")
    assert "torch==2.13.0" in binder
    assert f"--extra-index-url {CPU_INDEX}" in options


def test_binder_installs_the_no_deps_packages_without_dependencies():
    commands = [shlex.split(line) for line in (BINDER / "postBuild").read_text().splitlines()]
    assert ["pip", "install", "--no-deps", "-r", "requirements-nodeps.txt"] in commands
    nodeps, _ = read_requirements(ROOT / "requirements-nodeps.txt")
    assert nodeps and all("==" in r for r in nodeps)


def test_binder_python_is_the_course_python():
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    assert (BINDER / "runtime.txt").read_text().strip() == f"python-3.{target.removeprefix('py3')}"
