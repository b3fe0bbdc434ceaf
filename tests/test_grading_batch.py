"""Instructor mode: a folder of lab-2 submissions, solved, shipped, hostile (calls os._exit
with its self-checks deleted and `check` redefined, kills its kernel, loops ignoring
interrupts, allocates beyond the memory limit, imports a module the grading environment
lacks, is not a notebook), all copied away from the
course, graded with `python -m utils.grading --batch` in one run: every one gets a row, a
JSON report and the intended score, within the stated limits."""

import csv
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from utils.grading import LABS

ROOT = Path(__file__).resolve().parents[1]
FULL = sum(p.max_score for p in LABS["lab2_rope"])
TIME_LIMIT, CELL_TIMEOUT, MEMORY_MB = 120, 10, 3072


def _with_cell(source: str, after: int = 2) -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / "solutions" / "lab2_rope.ipynb", as_version=4)
    nb.cells.insert(after + 1, nbformat.v4.new_code_cell(source))
    return nb


def _exits_without_checks() -> nbformat.NotebookNode:
    """Calls os._exit in a cell, deleted its self-check cells and redefined `check`."""
    nb = _with_cell("import os\nos._exit(1)")
    nb.cells = [c for c in nb.cells if not c.source.startswith("check(")]
    nb.cells.append(nbformat.v4.new_code_cell("def check(*args):\n    print('27 / 27 points')"))
    return nb


SUBMISSIONS = {  # file name -> (notebook, status, score)
    "alice_lab2_rope.ipynb": (nbformat.read(ROOT / "solutions" / "lab2_rope.ipynb", 4),
                              "graded", FULL),
    "bob_lab2_rope.ipynb": (nbformat.read(ROOT / "labs" / "lab2_rope.ipynb", 4), "graded", 0),
    "carol/lab2_rope.ipynb": (_exits_without_checks(), "graded", FULL),
    "dave_lab2_rope.ipynb": (
        _with_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"), "graded", FULL),
    "erin_lab2_rope.ipynb": (_with_cell(
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"),
        "graded", FULL),
    "frank_lab2_rope.ipynb": (_with_cell("hog = torch.ones(2**31)  # 8 GiB"), "graded", FULL),
    "ivan_lab2_rope.ipynb": (_with_cell("import no_such_module"), "error", 0),
}  # fmt: skip


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    for name, (nb, _, _) in SUBMISSIONS.items():
        (folder / name).parent.mkdir(exist_ok=True)
        nbformat.write(nb, folder / name)
    (folder / "heidi_lab2_rope.ipynb").write_text("{ not a notebook")
    out, junit = folder.parent / "results", folder.parent / "grades.xml"
    command = [sys.executable, "-m", "utils.grading", "--batch", str(folder), "--out", str(out),
               "--time-limit", str(TIME_LIMIT), "--cell-timeout", str(CELL_TIMEOUT),
               "--memory-limit", str(MEMORY_MB), "--jobs", "2", "--junit", str(junit)]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return result, out, junit, time.perf_counter() - start


def test_every_submission_gets_a_row_and_its_score(batch):
    result, out, _, seconds = batch
    assert result.returncode == 0, result.stderr
    rows = {r["student"]: r for r in csv.DictReader((out / "grades.csv").open())}
    expected = {Path(n).parent.name if "/" in n else n.split("_")[0]: v[1:]
                for n, v in SUBMISSIONS.items()}  # fmt: skip
    expected["heidi"] = ("error", 0)
    assert sorted(rows) == sorted(expected)
    for student, (status, score) in expected.items():
        row = rows[student]
        assert (row["status"], float(row["total"])) == (status, score), row
        report = json.loads((out / f"{student}.json").read_text())
        assert report["status"] == status and report["seconds"] < TIME_LIMIT
    assert "cannot read heidi_lab2_rope.ipynb as a notebook" in rows["heidi"]["message"]
    assert "could not import what it needs" in rows["ivan"]["message"]
    assert "no_such_module" in rows["ivan"]["message"]
    assert rows["alice"]["apply_rope"] == "9" and rows["bob"]["apply_rope"] == "0"
    assert seconds < TIME_LIMIT * len(expected) / 2
    assert "8/8" in result.stderr and "alice" in result.stdout  # progress bar, summary table


def test_hostile_cells_are_recorded(batch):
    out = batch[1]

    def errors(student):
        return [e["error"] for e in json.loads((out / f"{student}.json").read_text())[
            "notebook_errors"]]  # fmt: skip

    assert any("os._exit(1) was called" in e for e in errors("carol"))
    assert any("KernelDied: this cell ended the kernel" in e for e in errors("dave"))
    assert any(f"ran past {CELL_TIMEOUT} s and ignored the interrupt" in e for e in errors("erin"))
    assert any("allocate" in e or "MemoryError" in e for e in errors("frank"))
    assert errors("alice") == []


def test_junit_report(batch):
    root = ET.parse(batch[2]).getroot()
    suites = {s.get("name").split(" ")[0]: s for s in root}
    assert int(suites["alice"].get("tests")) > 20 and suites["alice"].get("failures") == "0"
    assert int(suites["bob"].get("errors")) == 5  # one NOT IMPLEMENTED per part
    assert suites["heidi"].find("testcase/error") is not None


def test_wall_time_limit_kills_the_submission_and_its_kernel(tmp_path):
    from utils.grading.batch import grade_one

    notebook = tmp_path / "lab2_rope.ipynb"
    nbformat.write(_with_cell("import time\ntime.sleep(600)"), notebook)
    start = time.perf_counter()
    record = grade_one(notebook, tmp_path / "r.json", time_limit=8, memory_mb=MEMORY_MB,
                       cell_timeout=600, lab=None)  # fmt: skip
    assert time.perf_counter() - start < 20
    assert record["status"] == "killed" and record["score"] == 0 and record["max_score"] == FULL
    assert "wall-time limit of 8 s" in record["message"]
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "killed"
    time.sleep(0.5)
    left = [p for p in Path("/proc").glob("[0-9]*/cwd") if _cwd(p) == str(tmp_path)]
    assert left == [], "the submission's kernel outlived the limit"


def _cwd(link: Path) -> str:
    try:
        return str(link.readlink())
    except OSError:
        return ""
