"""Lab 4 (LoRA, SFT, DPO) grader: the solution scores full marks and the generated lab zero
(both graded by the command line in batch mode), each broken submission in
broken_submissions_lab4.py gets the intended failing check and message, correct but unusual
submissions get full marks, nothing leaks out of a graded call, and the grader's own float64
references agree with independent ones (peft's LoRA layer, F.cross_entropy, loops, closed
forms).
"""

import csv
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from broken_submissions_lab4 import CASES, LoRALinear, dpo_log_of_sigmoid
from torch import nn

from utils.grading import LABS, PARTS, Status, grade, grade_namespace
from utils.grading import reference_lab4 as ref
from utils.grading.core import run_part

ROOT = Path(__file__).resolve().parents[1]
LAB = "lab4_lora_dpo"


def solution_namespace() -> dict:
    """The notebook's imports cell and every cell holding a solution, run in order."""
    cells = nbformat.read(ROOT / "solutions" / f"{LAB}.ipynb", as_version=4).cells
    code = [c.source for c in cells if c.cell_type == "code"]
    namespace: dict = {}
    for source in [code[1]] + [s for s in code if "### BEGIN SOLUTION" in s]:
        exec(compile(source, f"<{LAB}>", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The solution (alice) and the generated lab (bob) graded by `python -m utils.grading
    --batch`, each in its own process."""
    folder = tmp_path_factory.mktemp("submissions")
    shutil.copy(ROOT / "solutions" / f"{LAB}.ipynb", folder / f"alice_{LAB}.ipynb")
    (folder / "bob").mkdir()
    shutil.copy(ROOT / "labs" / f"{LAB}.ipynb", folder / "bob" / f"{LAB}.ipynb")
    out = tmp_path_factory.mktemp("grades")
    command = [sys.executable, "-m", "utils.grading", "--batch", str(folder), "--out", str(out),
               "--jobs", "2", "--time-limit", "300", "--cell-timeout", "60"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    reports = {s: json.loads((out / f"{s}.json").read_text()) for s in ("alice", "bob")}
    with (out / "grades.csv").open() as file:
        rows = {row["student"]: row for row in csv.DictReader(file)}
    return result, reports, rows


def test_solution_scores_full_marks(batch):
    result, reports, rows = batch
    assert result.returncode == 0, result.stderr
    report = reports["alice"]
    assert report["status"] == "graded" and report["lab"] == LAB
    assert report["notebook_errors"] == []
    failures = [(p["part"], t["name"], t["message"]) for p in report["parts"] for t in p["tests"]
                if t["status"] != "PASS"]  # fmt: skip
    assert failures == []
    assert report["score"] == report["max_score"] == sum(p.max_score for p in LABS[LAB]) == 42
    assert [p["part"] for p in report["parts"]] == [p.name for p in LABS[LAB]]
    assert rows["alice"]["total"] == "42" and rows["alice"]["dpo_loss"] == "10"


def test_generated_lab_runs_and_scores_zero(batch):
    _, reports, rows = batch
    report = reports["bob"]
    assert report["status"] == "graded" and report["lab"] == LAB
    assert report["notebook_errors"] == []  # the lab runs top to bottom before any answer
    assert report["score"] == 0 and report["max_score"] == 42
    for part in report["parts"]:
        first = next(t for t in part["tests"] if t["status"] != "PASS")
        assert first["status"] == "NOT IMPLEMENTED", part
        assert "still raises NotImplementedError" in first["message"]
    assert rows["bob"]["total"] == "0" and rows["bob"]["lab"] == LAB


def test_solution_functions_score_full_marks_through_the_api():
    results = grade_namespace(LAB, solution_namespace())
    assert [r.score for r in results] == [p.max_score for p in LABS[LAB]], [
        r.report() for r in results
    ]


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
    assert time.perf_counter() - start < 10


def test_broken_submissions_cover_every_part():
    assert {c[1] for c in CASES} == {p.name for p in LABS[LAB]} and len(CASES) >= 8


# ----------------------------------------------------------------- correct but unusual


class LoRAMergedInForward(LoRALinear):
    """Folds the update into the weight on every call (exact at initialisation too)."""

    def forward(self, x):
        return F.linear(x, self.merged_weight(), self.base.bias)


def sft_loss_by_logsumexp(logits, labels):
    logits, targets = logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    picked = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    nll = torch.logsumexp(logits, -1) - picked
    return torch.where(keep, nll, 0.0).sum() / keep.sum()


def sequence_logprobs_by_cross_entropy(logits, labels):
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    return -nll.sum(-1)  # ignored targets give 0


def dpo_by_softplus(pc, pr, rc, rr, beta=0.1):
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return F.softplus(rejected - chosen).mean(), chosen, rejected


@pytest.mark.parametrize(
    "part, submission",
    [("lora_linear", LoRAMergedInForward), ("sft_loss", sft_loss_by_logsumexp),
     ("sequence_logprobs", sequence_logprobs_by_cross_entropy), ("dpo_loss", dpo_by_softplus)],
    ids=["merged in forward", "logsumexp", "cross_entropy none", "softplus"],
)  # fmt: skip
def test_unusual_but_correct_submission_gets_full_marks(part, submission):
    result = grade(part, submission)
    assert result.score == result.max_score > 0, result.report()


# ------------------------------------------------------------------------- no leaks


def dpo_patches_everything(pc, pr, rc, rr, beta=0.1):
    F.logsigmoid = lambda x: x  # every later logsigmoid would be wrong
    torch.set_grad_enabled(False)
    sys.setprofile(None)  # forbidden: the grader's call watch
    return dpo_log_of_sigmoid(pc, pr, rc, rr, beta)


def test_nothing_leaks_out_of_a_graded_call():
    logsigmoid, meta_path = F.logsigmoid, list(sys.meta_path)
    modules = {name for name in sys.modules if name.split(".")[0] in ("peft", "trl")}
    result = grade("dpo_loss", dpo_patches_everything)
    assert result.tests[1].status is Status.FORBIDDEN, result.report()
    assert "sys.setprofile" in result.tests[1].message
    assert F.logsigmoid is logsigmoid and torch.is_grad_enabled()
    assert sys.getprofile() is None and sys.meta_path == meta_path
    assert modules <= set(sys.modules)
    results = grade_namespace(LAB, solution_namespace())
    assert [r.score for r in results] == [p.max_score for p in LABS[LAB]]


def test_peft_objects_imported_before_grading_are_forbidden():
    """`import peft` at the top of a notebook succeeds; calling it while graded does not."""
    peft = pytest.importorskip("peft")

    class LoRAThroughPeft(LoRALinear):
        def __init__(self, base, rank, alpha):
            super().__init__(base, rank, alpha)
            self.config = peft.LoraConfig(r=rank, lora_alpha=alpha)

    result = grade("lora_linear", LoRAThroughPeft)
    assert result.tests[1].status is Status.FORBIDDEN, result.report()
    assert "must not use `peft`" in result.tests[1].message
    assert "peft" in sys.modules  # hidden during the call only


# ------------------------------------------------- the grader's references, independently


def test_reference_lora_matches_peft():
    """Same weights in peft's LoRA layer: same output, gradients and merged weight."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    layer = wrapped.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, 12)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    out64 = ref.lora_linear(x, base.weight, base.bias, a, b, 8 / 4)
    torch.testing.assert_close(wrapped(x), out64.float(), atol=1e-5, rtol=1e-5)
    expected = ref.merged_weight(base.weight, a, b, 2.0).float()
    merged = wrapped.merge_and_unload()[0].weight
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)


def test_reference_sft_loss_and_logprobs_against_builtins_and_loops():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 6))
    labels[0, :2], labels[1, :4], labels[2, 5:] = -100, -100, -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ref.sft_loss(logits, labels), expected, atol=1e-12, rtol=0)
    sums = [sum(math.log(torch.softmax(logits[b, t], -1)[labels[b, t + 1]].item())
                for t in range(5) if labels[b, t + 1] != -100) for b in range(3)]  # fmt: skip
    torch.testing.assert_close(
        ref.sequence_logprobs(logits, labels), torch.tensor(sums, dtype=torch.float64)
    )
    ids, mask = torch.arange(1, 7).repeat(2, 1), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    assert ref.sft_labels(ids, torch.tensor([2, 1]), mask).tolist() == [
        [-100, -100, 3, 4, 5, 6],
        [-100, 2, 3, 4, -100, -100],
    ]


def test_reference_dpo_against_a_hand_worked_example():
    # log-ratios chosen (1, 0), rejected (-1, 1); beta 0.5: margins (1, -0.5)
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -2.0])
    loss, chosen, rejected = ref.dpo(pc, pr, rc, rr, 0.5)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]
    same = ref.dpo(pc, pr, pc, pr, 3.0)
    assert same[0].item() == pytest.approx(math.log(2), abs=1e-12)
