"""Grade a whole lab notebook: execute it in a fresh kernel, then grade every part there.

The notebook runs top to bottom with nbclient (errors in a cell are recorded and execution
goes on; a cell running past its time limit is interrupted and recorded). Then one more
cell, run in the same kernel, grades each part of the lab with the objects the notebook
defined (:func:`utils.grading.grade_namespace`) and prints the results as JSON, which this
process reads back. Learner code therefore never runs in the grading process itself.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

from . import LABS

ROOT = Path(__file__).resolve().parents[2]
MARKER = "@@GRADING-RESULTS@@"
GRADING_CELL = """\
import json as _grading_json
import sys as _grading_sys
_grading_sys.path.insert(0, {root!r})
from utils.grading import grade_namespace as _grade_namespace
print({marker!r} + _grading_json.dumps(
    [_r.to_dict() for _r in _grade_namespace({lab!r}, globals())]))"""


class GradingError(RuntimeError):
    """Grading itself could not run (not a low score)."""


def lab_of(path: Path) -> str:
    if path.stem not in LABS:
        raise GradingError(
            f"cannot tell which lab {path.name} is: its name must be one of {sorted(LABS)} "
            "(or pass --lab)"
        )
    return path.stem


def _cell_errors(cell, index: int) -> list[dict]:
    return [
        dict(cell=index, error=f"{out.get('ename', '')}: {str(out.get('evalue', ''))[:300]}")
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


def grade_notebook(
    path: str | Path,
    *,
    lab: str | None = None,
    cell_timeout: int = 600,
    kernel_name: str = "python3",
) -> dict:
    """Execute ``path`` in a fresh kernel and grade it; returns the JSON-ready report.

    Each notebook cell may run ``cell_timeout`` seconds; grading gets the sum of the parts'
    time limits plus a minute. Raises :class:`GradingError` when grading cannot run.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise GradingError(f"no such notebook: {path}")
    lab = lab or lab_of(path)
    if lab not in LABS:
        raise GradingError(f"unknown lab {lab!r}; labs are {sorted(LABS)}")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as error:
        raise GradingError(f"cannot read {path.name} as a notebook: {error}") from error
    client = NotebookClient(
        nb,
        timeout=cell_timeout,
        kernel_name=kernel_name,
        allow_errors=True,
        interrupt_on_timeout=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    errors: list[dict] = []
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except DeadKernelError as error:
                raise GradingError(f"the kernel died in cell {index}: {error}") from error
            errors += _cell_errors(cell, index)
        executed = time.perf_counter() - start
        grading = nbformat.v4.new_code_cell(
            GRADING_CELL.format(root=str(ROOT), marker=MARKER, lab=lab)
        )
        nb.cells.append(grading)
        client.timeout = int(sum(part.timeout for part in LABS[lab]) + 60)
        try:
            client.execute_cell(grading, len(nb.cells) - 1)
        except DeadKernelError as error:
            raise GradingError(f"the kernel died while grading: {error}") from error
    text = "".join(o.get("text", "") for o in grading.outputs if o.get("name") == "stdout")
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise GradingError(f"the grading cell produced no results: {_cell_errors(grading, -1)}")
    parts = json.loads(lines[-1][len(MARKER) :])
    return dict(
        notebook=str(path),
        lab=lab,
        graded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        score=sum(p["score"] for p in parts),
        max_score=sum(p["max_score"] for p in parts),
        parts=parts,
        notebook_errors=errors,
        execution_seconds=round(executed, 1),
        total_seconds=round(time.perf_counter() - start, 1),
    )


def score_table(report: dict) -> str:
    """A plain-text table: one row per part, with the first problem of each."""
    lines = [f"{report['lab']}: {report['notebook']}", f"{'part':28} {'score':>9}  first problem"]
    for part in report["parts"]:
        problem = next((t for t in part["tests"] if t["status"] != "PASS"), None)
        note = "" if problem is None else f"{problem['status']}: {problem['message']}"
        note = note.splitlines()[0][:100] if note else "all checks pass"
        score = f"{part['score']:g}/{part['max_score']:g}"
        lines.append(f"{part['part']:28} {score:>9}  {note}")
    total = f"{report['score']:g}/{report['max_score']:g}"
    lines.append(f"{'total':28} {total:>9}")
    for error in report["notebook_errors"]:
        lines.append(f"note: cell {error['cell']} raised {error['error'][:120]}")
    return "\n".join(lines)
