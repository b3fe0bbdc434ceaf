"""Instructor mode: grade a folder of submissions, each in its own process with a wall-time
and a memory limit, so that no submission can affect another.

``python -m utils.grading --batch SUBMISSIONS/ --out RESULTS/`` finds every ``*.ipynb`` under
the folder (the student is the file name without the lab name, or the sub-folder name), runs
``python -m utils.grading NOTEBOOK`` for each (``RLIMIT_AS`` on it and on its kernel, killed
with its kernel at the time limit), and writes ``RESULTS/STUDENT.json`` per submission,
``RESULTS/grades.csv`` (one row per submission, one column per part) and optionally a JUnit
XML file. Every submission gets a row: ``status`` is ``graded``, ``error`` (grading could not
run: the message says why) or ``killed`` (time or memory limit).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import LABS
from .notebook import ROOT


def student_of(notebook: Path, folder: Path) -> str:
    """``alice/lab1_attention.ipynb`` -> alice; ``bob_lab1_attention.ipynb`` -> bob."""
    relative = notebook.relative_to(folder)
    name = relative.stem
    for lab in LABS:
        name = name.replace(lab, "")
    name = name.strip("_- .")
    if len(relative.parts) > 1:
        name = "_".join([*relative.parts[:-1], name] if name else relative.parts[:-1])
    return name or relative.stem


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Jupyter starts kernels in their own session, so a
    process group does not hold them), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """Stop ``pid`` first (it cannot start another kernel meanwhile), then kill it and all
    its descendants."""
    os.kill(pid, signal.SIGSTOP)
    for process in [*_descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


def _limits(memory_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return apply


def grade_one(
    notebook: Path, report: Path, *, time_limit: float, memory_mb: int, cell_timeout: int,
    lab: str | None,
) -> dict:  # fmt: skip
    """Grade one notebook in a child process; returns its report with batch fields added."""
    command = [sys.executable, "-m", "utils.grading", str(notebook), "--report", str(report),
               "--cell-timeout", str(cell_timeout)] + (["--lab", lab] if lab else [])  # fmt: skip
    report.unlink(missing_ok=True)
    log = report.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as output:  # a file, not a pipe: a stray kernel cannot hold it open
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=output,
            stderr=output,
            preexec_fn=_limits(memory_mb * 2**20),
        )
        try:
            process.wait(timeout=time_limit)
            status, message = "graded", ""
        except subprocess.TimeoutExpired:
            _kill_tree(process.pid)  # the grader and its kernel
            process.wait()
            status, message = "killed", f"stopped at the wall-time limit of {time_limit:g} s"
    stderr = log.read_text(errors="replace")
    seconds = round(time.perf_counter() - start, 1)
    result = json.loads(report.read_text()) if status == "graded" and report.is_file() else {}
    if status == "graded" and not result:
        lines = [line for line in stderr.splitlines() if line.startswith("grading could not")]
        killed = process.returncode < 0 or "MemoryError" in stderr
        status = "killed" if killed else "error"
        message = lines[-1] if lines else (stderr.strip().splitlines() or ["no report"])[-1]
        if killed:
            message = f"ended by signal or memory limit ({memory_mb} MiB): {message}"
    guess = next((name for name in LABS if name in notebook.stem), None)
    result.setdefault("lab", lab or guess)
    result.update(notebook=str(notebook), status=status, message=message, seconds=seconds)
    result.setdefault("score", 0)
    result.setdefault("max_score", sum(p.max_score for p in LABS.get(result.get("lab"), [])))
    report.write_text(json.dumps(result, indent=2) + "\n")
    return result


def grade_folder(
    folder: Path, out: Path, *, time_limit: float = 600, memory_mb: int = 4096,
    cell_timeout: int = 60, jobs: int = 1, lab: str | None = None, progress=print,
) -> list[dict]:  # fmt: skip
    """Grade every notebook under ``folder`` into ``out``; returns one record per notebook."""
    notebooks = sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    out.mkdir(parents=True, exist_ok=True)
    students = [student_of(nb, folder) for nb in notebooks]
    records: list[dict] = [{} for _ in notebooks]
    done = 0

    def work(index: int) -> None:
        nonlocal done
        record = grade_one(
            notebooks[index], out / f"{students[index]}.json", time_limit=time_limit,
            memory_mb=memory_mb, cell_timeout=cell_timeout, lab=lab,
        )  # fmt: skip
        records[index] = dict(student=students[index], **record)
        done += 1
        bar = "#" * (20 * done // len(notebooks))
        progress(f"[{bar:20}] {done}/{len(notebooks)} {students[index]}: {_cell(record)}")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(work, range(len(notebooks))))
    write_csv(records, out / "grades.csv")
    return records


def _cell(record: dict) -> str:
    score = f"{record['score']:g}/{record['max_score']:g}"
    return score if record["status"] == "graded" else f"{record['status']}: {record['message']}"


def write_csv(records: list[dict], path: Path) -> None:
    """One row per submission: student, lab, status, one column per part, total, max."""
    labs = [lab for lab in LABS if any(r.get("lab") == lab for r in records)]
    parts = [p.name for lab in labs for p in LABS[lab]]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["student", "lab", "status", *parts, "total", "max_score", "message"])
        for r in records:
            scores = {p["part"]: p["score"] for p in r.get("parts", [])}
            cells = [f"{scores[p]:g}" if p in scores else "" for p in parts]
            writer.writerow([r["student"], r.get("lab", ""), r["status"], *cells,
                             f"{r['score']:g}", f"{r['max_score']:g}", r["message"]])  # fmt: skip


def summary_table(records: list[dict]) -> str:
    width = max([7, *(len(r["student"]) for r in records)])
    lines = [f"{'student':{width}}  {'lab':22} {'score':>7} {'time':>6}  status"]
    for r in records:
        score = f"{r['score']:g}/{r['max_score']:g}"
        lines.append(f"{r['student']:{width}}  {r.get('lab', '?'):22} {score:>7} "
                     f"{r['seconds']:5.0f}s  {_cell(r)[:90]}")  # fmt: skip
    return "\n".join(lines)


__all__ = ["grade_folder", "grade_one", "student_of", "summary_table", "write_csv"]
