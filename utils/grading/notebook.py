"""Grade a whole lab notebook: execute it in a fresh kernel, then grade every part there.

The notebook runs top to bottom with nbclient after a prelude cell (errors in a cell are
recorded and execution goes on; a cell running past its time limit is interrupted and
recorded). Then one cell per part, run in the same kernel, grades that part with the object
the notebook defined under the part's name (self-check cells, edited, deleted or with
``check`` redefined, play no role) and prints the result as JSON, which this process reads
back. Learner code therefore never runs in the grading process itself.
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
from .core import NOT_RUN, PartResult, Status, TestResult

ROOT = Path(__file__).resolve().parents[2]
MARKER = "@@GRADING-RESULT@@"
CELL_TIMEOUT = 60
"""Default seconds per notebook cell: the slowest cell of a solved lab takes a few seconds."""

# Runs before the notebook's first cell: the course is importable wherever the notebook lies
# (its own setup cell then finds `utils` already imported), torch's pristine state is
# snapshotted before learner code, os._exit raises SystemExit (which IPython survives) in
# the kernel process, and check() cells only say that grading comes at the end.
PRELUDE = """\
import sys as _grading_sys
_grading_sys.path.insert(0, {root!r})
import utils.grading as _grading
_grading.prepare_kernel()"""
GRADING_CELL = """\
print({marker!r} + _grading.grade_part_json({part!r}, globals()), flush=True)"""
PROBE_TIMEOUT = 5


class GradingError(RuntimeError):
    """Grading itself could not run (not a low score): the notebook is missing or unreadable,
    the lab unknown, or the grading environment lacks what the notebook imports."""


def lab_of(path: Path, nb=None) -> str:
    """The lab a notebook is: a lab name inside its file name, else its title "# Lab N"."""
    names = [lab for lab in LABS if lab in path.stem]
    if len(names) == 1:
        return names[0]
    for cell in (nb.cells if nb is not None else [])[:1]:
        for lab in LABS:
            if cell.cell_type == "markdown" and cell.source.startswith(f"# Lab {lab[3]}"):
                return lab
    raise GradingError(
        f"cannot tell which lab {path.name} is: its name must contain one of {sorted(LABS)}, "
        "or its title read '# Lab N' (or pass --lab)"
    )


def _cell_errors(cell, index: int) -> list[dict]:
    return [
        dict(cell=index, error=f"{out.get('ename', '')}: {str(out.get('evalue', ''))[:300]}")
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


def _import_failures(errors: list[dict]) -> list[dict]:
    return [e for e in errors if e["error"].startswith(("ModuleNotFoundError", "ImportError"))]


class _Run:
    """One kernel running the prelude, the notebook's cells (minus those in ``skip``), then
    one grading cell per part still to grade."""

    def __init__(self, nb, folder: Path, cell_timeout: int, kernel_name: str) -> None:
        self.nb, self.cell_timeout = nb, cell_timeout
        self.client = NotebookClient(
            nb,
            timeout=cell_timeout,
            kernel_name=kernel_name,
            allow_errors=True,
            interrupt_on_timeout=True,
            error_on_timeout={"ename": "CellTimeout", "evalue": "", "traceback": []},
            resources={"metadata": {"path": str(folder)}},
            shutdown_kernel="immediate",
            iopub_timeout=2,
        )

    def execute(self, source: str, timeout: int) -> tuple[dict, bool]:
        """Run one cell; returns (cell, finished in time). Raises DeadKernelError."""
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        self.client.timeout = timeout
        start = time.perf_counter()
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        return cell, time.perf_counter() - start < timeout

    def responsive(self) -> bool:
        try:
            return self.execute("pass", PROBE_TIMEOUT)[1]
        except DeadKernelError:
            return False


def grade_notebook(
    path: str | Path,
    *,
    lab: str | None = None,
    cell_timeout: int = CELL_TIMEOUT,
    kernel_name: str = "python3",
) -> dict:
    """Execute ``path`` in a fresh kernel and grade it; returns the JSON-ready report.

    Each notebook cell may run ``cell_timeout`` seconds (then it is interrupted and recorded);
    each part's grading gets its tests' time limits plus half a minute. A cell that ends the
    kernel (os._exit from C, exit(), a crash, memory exhaustion) or ignores the interrupt is
    recorded and the notebook runs again in a fresh kernel without it; a part whose grading
    ends the kernel scores 0 with that message. Raises :class:`GradingError` when grading
    cannot run, including a failed import (the grading environment lacks something).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise GradingError(f"no such notebook: {path}")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as error:
        raise GradingError(f"cannot read {path.name} as a notebook: {error}") from error
    lab = lab or lab_of(path, nb)
    if lab not in LABS:
        raise GradingError(f"unknown lab {lab!r}; labs are {sorted(LABS)}")
    code = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    start = time.perf_counter()
    skip: dict[int, str] = {}
    parts: dict[str, dict] = {}
    executed = 0.0
    for _ in range(len(code) + len(LABS[lab]) + 1):
        todo = [p for p in LABS[lab] if p.name not in parts]
        if not todo:
            break
        run = _Run(nbformat.v4.new_notebook(), path.parent, cell_timeout, kernel_name)
        errors: list[dict] = []
        current: int | str = -1
        try:
            with run.client.setup_kernel():
                cell, _ = run.execute(PRELUDE.format(root=str(ROOT)), 120)
                if _cell_errors(cell, -1):
                    raise GradingError(f"the course does not import: {_cell_errors(cell, -1)}")
                for index, source in code:
                    if index in skip:
                        continue
                    current = index
                    cell, in_time = run.execute(source, cell_timeout)
                    errors += _cell_errors(cell, index)
                    if not in_time:
                        errors.append(
                            dict(cell=index, error=f"CellTimeout: ran past {cell_timeout} s")
                        )
                        if not run.responsive():
                            skip[index] = f"ran past {cell_timeout} s and ignored the interrupt"
                            raise DeadKernelError("unresponsive")
                failures = _import_failures(errors)
                if failures:
                    raise GradingError(
                        f"{path.name} could not import what it needs, so it is not graded "
                        f"(install it in the grading environment): {failures}"
                    )
                executed = time.perf_counter() - start
                for part in todo:
                    current = part.name
                    limit = int(part.timeout * len(part.tests) + 30)
                    cell, _ = run.execute(GRADING_CELL.format(marker=MARKER, part=part.name), limit)
                    parts[part.name] = _part_result(cell, part)
        except DeadKernelError:
            if current == -1:
                raise GradingError("the kernel died while importing the course") from None
            if isinstance(current, int):
                skip.setdefault(current, "ended the kernel")
            else:
                parts[current] = _dead_part(LABS[lab], current)
            continue
        break
    notebook_errors = errors + [
        dict(cell=i, error=f"KernelDied: this cell {why}; the notebook was run again without it")
        for i, why in sorted(skip.items())
    ]
    results = [parts[p.name] for p in LABS[lab] if p.name in parts]
    return dict(
        notebook=str(path),
        lab=lab,
        graded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        score=sum(p["score"] for p in results),
        max_score=sum(p.max_score for p in LABS[lab]),
        parts=results,
        notebook_errors=sorted(notebook_errors, key=lambda e: e["cell"]),
        execution_seconds=round(executed, 1),
        total_seconds=round(time.perf_counter() - start, 1),
    )


def _part_result(cell, part) -> dict:
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    if lines:
        return json.loads(lines[-1][len(MARKER) :])
    problem = _cell_errors(cell, -1) or "no result (interrupted after its time limit)"
    return _failed_part(part, Status.ERROR, f"grading this part failed: {problem}")


def _dead_part(parts, name: str) -> dict:
    part = next(p for p in parts if p.name == name)
    return _failed_part(
        part,
        Status.ERROR,
        "the kernel died while this part was graded (your code ended the process, crashed "
        "it or used too much memory)",
    )


def _failed_part(part, status: Status, message: str) -> dict:
    result = PartResult(part.name, part.title)
    for test in part.tests:
        result.tests.append(TestResult(test.name, status, 0, test.points, message))
        status, message = Status.SKIPPED, NOT_RUN
    return result.to_dict()


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
