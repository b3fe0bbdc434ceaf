"""The lab grader: solutions score full marks, shipped labs score zero with "not implemented",
labs are generated from solutions, and each broken submission in broken_submissions.py gets
the intended failing check and message. Notebooks are graded once per session (module-scoped
fixtures); broken submissions go through the grader's Python API.
"""

import dataclasses
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.nn.functional as F
from broken_submissions import CASES, softmax_prints_a_lot

from utils.grading import LABS, PARTS, Status, check, grade, grade_namespace
from utils.grading.core import GradingTimeout, run_part, time_limit
from utils.grading.notebook import grade_notebook

ROOT = Path(__file__).resolve().parents[1]
LAB_NAMES = sorted(LABS)


def load_make_labs():
    spec = importlib.util.spec_from_file_location("make_labs", ROOT / "scripts" / "make_labs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def solution_reports():
    return {name: grade_notebook(ROOT / "solutions" / f"{name}.ipynb") for name in LAB_NAMES}


@pytest.fixture(scope="module")
def lab_reports(tmp_path_factory):
    """lab3 through the command line (exit status, table, JSON file); the others by the API."""
    folder = tmp_path_factory.mktemp("reports")
    reports = {
        name: grade_notebook(ROOT / "labs" / f"{name}.ipynb")
        for name in LAB_NAMES
        if name != "lab3_flash_attention"
    }
    report = folder / "lab3.json"
    command = [sys.executable, "-m", "utils.grading", "labs/lab3_flash_attention.ipynb",
               "--report", str(report)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    reports["lab3_flash_attention"] = json.loads(report.read_text())
    return reports, result


@pytest.mark.parametrize("name", LAB_NAMES)
def test_solution_scores_full_marks(solution_reports, name):
    report = solution_reports[name]
    assert report["notebook_errors"] == []
    failures = [(p["part"], t["name"], t["message"]) for p in report["parts"] for t in p["tests"]
                if t["status"] != "PASS"]  # fmt: skip
    assert failures == []
    assert report["score"] == report["max_score"] == sum(p.max_score for p in LABS[name]) > 0
    assert [p["part"] for p in report["parts"]] == [p.name for p in LABS[name]]


@pytest.mark.parametrize("name", LAB_NAMES)
def test_shipped_lab_runs_and_scores_zero(lab_reports, name):
    report = lab_reports[0][name]
    assert report["notebook_errors"] == []  # the lab executes top to bottom
    assert report["score"] == 0 and report["max_score"] > 0
    for part in report["parts"]:
        first = next(t for t in part["tests"] if t["status"] != "PASS")
        assert first["status"] == "NOT IMPLEMENTED", part
        assert "still raises NotImplementedError" in first["message"]


def test_command_line_grading(lab_reports):
    reports, result = lab_reports
    assert result.returncode == 0, result.stderr
    assert "online_softmax" in result.stdout and "NOT IMPLEMENTED" in result.stdout
    assert "total" in result.stdout and "0/43" in result.stdout
    report = reports["lab3_flash_attention"]
    assert report["lab"] == "lab3_flash_attention" and report["total_seconds"] > 0
    assert {"part", "title", "score", "max_score", "tests"} <= report["parts"][0].keys()


def test_command_line_reports_when_it_cannot_grade(tmp_path):
    command = [sys.executable, "-m", "utils.grading", str(tmp_path / "missing.ipynb")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "grading could not run: no such notebook" in result.stderr


@pytest.mark.parametrize("name", LAB_NAMES)
def test_labs_are_generated_from_solutions(name):
    make_labs = load_make_labs()
    solution = json.loads((ROOT / "solutions" / f"{name}.ipynb").read_text())
    expected = make_labs.render(make_labs.make_lab(solution))
    assert (ROOT / "labs" / f"{name}.ipynb").read_text() == expected, "run `make labs`"
    lab = json.loads(expected)
    code = [c for c in lab["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert not any("### BEGIN SOLUTION" in c["source"] for c in code)
    assert (
        lab["cells"][0]["source"].startswith("# Lab ")
        and "(solution)" not in lab["cells"][0]["source"].splitlines()[0]
    )


def test_stub_replaces_each_solution_block():
    make_labs = load_make_labs()
    source = (
        "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n\n"
        "class C:\n    def g(self):\n        ### BEGIN SOLUTION\n        pass\n"
        "        ### END SOLUTION"
    )
    assert make_labs.stub_solutions(source) == (
        "def f(x):\n    y = 1\n    # YOUR CODE HERE\n"
        '    raise NotImplementedError("f: your code here")\n\n'
        "class C:\n    def g(self):\n        # YOUR CODE HERE\n"
        '        raise NotImplementedError("g: your code here")'
    )
    with pytest.raises(ValueError, match="without"):
        make_labs.stub_solutions("def f():\n    ### BEGIN SOLUTION\n    pass")
    with pytest.raises(ValueError, match="inside a function"):
        make_labs.stub_solutions("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_submission_gets_the_intended_message(case):
    _, part_name, submission, test_name, status, words = case
    part = PARTS[part_name]
    if status == "TIMEOUT":
        part = dataclasses.replace(part, timeout=1)
    start = time.perf_counter()
    result = run_part(part, submission)
    first = next(t for t in result.tests if t.status is not Status.PASS)
    assert first.name.startswith(test_name), result.report()
    assert first.status.value == status, result.report()
    for word in words:
        assert word in first.message, result.report()
    assert first.points == 0 and result.score < result.max_score
    later = result.tests[result.tests.index(first) + 1 :]
    assert all(t.status is Status.SKIPPED and t.points == 0 for t in later)
    if status == "TIMEOUT":
        assert time.perf_counter() - start < 5


def test_forbidden_functions_are_restored():
    original = F.scaled_dot_product_attention
    run_part(PARTS["flash_forward"], next(c[2] for c in CASES if c[0] == "flash calling SDPA"))
    assert F.scaled_dot_product_attention is original


def test_printing_is_captured(capsys):
    check("softmax", softmax_prints_a_lot)
    out = capsys.readouterr().out
    assert "11 / 11 points" in out and len(out) < 5000  # the 1.2 MB per call never shows


def test_time_limit_interrupts_sleep_and_works_off_the_main_thread():
    start = time.perf_counter()
    with pytest.raises(GradingTimeout), time_limit(0.2):
        time.sleep(5)
    assert time.perf_counter() - start < 1

    outcome = []

    def spin():
        try:
            with time_limit(0.2):
                while True:
                    pass
        except GradingTimeout:
            outcome.append("stopped")

    thread = threading.Thread(target=spin)
    thread.start()
    thread.join(5)
    assert outcome == ["stopped"]


def test_missing_definitions_are_not_implemented():
    results = grade_namespace("lab2_rope", {"rotate_half": "not a function"})
    assert results[0].tests[0].status is Status.FAIL
    assert "should be a function, got a str" in results[0].tests[0].message
    for result in results[1:]:
        assert {t.status for t in result.tests} == {Status.NOT_IMPLEMENTED}
        assert "the notebook defines no" in result.tests[0].message


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown part 'flash'"):
        grade("flash", print)
    with pytest.raises(ValueError, match="unknown lab"):
        grade_namespace("lab9", {})
