"""Write the course setup cell as the first code cell of every notebook.

The cell makes ``utils`` importable: in Colab it clones the repository (address taken from
``_config.yml``, its one home) and installs what Colab lacks (``requirements-colab.txt``, then
the packages that ship weights, ``requirements-nodeps.txt`` without their dependencies; Colab's
own torch is kept); elsewhere it only puts the repository root on ``sys.path``.
Run it after adding a notebook or changing the address:

    python scripts/sync_setup_cell.py            # all notebooks
    python scripts/sync_setup_cell.py --check    # exit 1 if any notebook differs
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIRS = ("chapters", "labs", "solutions")
MARKER = "# Course setup"

TEMPLATE = """\
# Course setup: in Colab, fetch the course and what Colab lacks; everywhere, make `utils` importable
import os
import subprocess
import sys

REPO_URL = "{url}"
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB and not os.path.isdir("course"):
    subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, "course"], check=True)
    pip = ["pip", "install", "-q"]  # Colab's own torch stays: neither file names it
    subprocess.run([*pip, "-r", "course/requirements-colab.txt"], check=True)
    subprocess.run([*pip, "--no-deps", "-r", "course/requirements-nodeps.txt"], check=True)
sys.path.insert(0, os.path.abspath("course" if IN_COLAB else ".."))"""


def repository_url() -> str:
    config = (ROOT / "_config.yml").read_text()
    match = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", config, flags=re.MULTILINE)
    if not match:
        raise SystemExit("_config.yml has no repository.url")
    return match.group(1)


def setup_cell_source() -> str:
    return TEMPLATE.format(url=repository_url())


def notebooks() -> list[Path]:
    return sorted(p for d in NOTEBOOK_DIRS for p in (ROOT / d).glob("*.ipynb"))


def sync(path: Path, check: bool) -> bool:
    """Return True if the notebook already had the current setup cell."""
    nb = json.loads(path.read_text())
    source = setup_cell_source()
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    first = code_cells[0] if code_cells else None
    if first is not None and "".join(first["source"]) == source:
        return True
    if check:
        return False
    lines = source.splitlines(keepends=True)  # as nbformat stores it: a list of lines
    if first is not None and "".join(first["source"]).startswith(MARKER):
        first["source"] = source if isinstance(first["source"], str) else lines  # keep the form
    else:
        cell = {"cell_type": "code", "execution_count": None, "id": "course-setup", "metadata": {}}
        cell["outputs"] = []
        cell["source"] = lines
        index = nb["cells"].index(first) if first is not None else len(nb["cells"])
        nb["cells"].insert(index, cell)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = [p for p in (args.paths or notebooks()) if not sync(p, args.check)]
    for path in stale:
        print(f"{'differs' if args.check else 'updated'}: {path}")
    sys.exit(1 if args.check and stale else 0)


if __name__ == "__main__":
    main()
