"""Notebook hygiene: what nbval cannot see (it only compares outputs that are stored)."""

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT

CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
LABS = sorted((ROOT / "labs").glob("*.ipynb"))
EXECUTED = CHAPTERS + SOLUTIONS
MAX_BYTES = 2_500_000


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def markdown(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_there_is_a_chapter_one():
    assert ROOT / "chapters" / "01_attention.ipynb" in CHAPTERS


@pytest.mark.parametrize("path", EXECUTED, ids=ids(EXECUTED))
def test_executed_top_to_bottom_in_a_fresh_kernel(path):
    counts = [c["execution_count"] for c in code_cells(load(path))]
    assert counts == list(range(1, len(counts) + 1)), f"execution counts {counts}"


@pytest.mark.parametrize("path", EXECUTED, ids=ids(EXECUTED))
def test_no_error_outputs_and_small_file(path):
    errors = [
        o.get("ename")
        for c in code_cells(load(path))
        for o in c.get("outputs", [])
        if o["output_type"] == "error"
    ]
    assert not errors, f"stored error outputs: {errors}"
    assert path.stat().st_size < MAX_BYTES, f"{path.stat().st_size / 1e6:.1f} MB"


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_chapter_structure(path):
    text = markdown(load(path))
    assert len(re.findall(r"^# ", text, flags=re.MULTILINE)) == 1, "one title per chapter"
    for heading in ("## Learning objectives", "## Exercises", "## References"):
        assert heading in text, f"missing '{heading}'"
    assert "{cite" in text, "chapters cite their sources with {cite}"


@pytest.mark.parametrize("path", EXECUTED + LABS, ids=ids(EXECUTED + LABS))
def test_no_absolute_paths_in_sources(path):
    sources = "\n".join("".join(c["source"]) for c in load(path)["cells"])
    assert not re.search(r"['\"](/work|/home|/tmp|/Users|C:\\)", sources)


@pytest.mark.parametrize("path", LABS, ids=ids(LABS))
def test_labs_are_stored_unexecuted(path):
    for cell in code_cells(load(path)):
        assert cell["execution_count"] is None and not cell["outputs"]
