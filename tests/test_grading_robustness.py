"""The grader through its Python API: correct but unusual submissions get full marks, and a
harmful submission graded first leaks nothing into the parts graded after it (the solution
notebooks' own functions, graded in the same process, still get full marks)."""

import math
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from broken_submissions import (
    attention_on_meta_device,
    attention_turns_gradients_off,
    rope_cos_sin_float64_default,
    softmax_patches_torch,
)
from unusual_submissions import CASES

from utils.attention import causal_mask
from utils.grading import LABS, PARTS, grade, grade_namespace

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_unusual_but_correct_submission_gets_full_marks(case):
    _, part, submission = case
    result = grade(part, submission)
    assert result.score == result.max_score > 0, result.report()


def solution_namespace(lab: str) -> dict:
    """The functions of solutions/LAB.ipynb: its cells holding a solution, run in order."""
    namespace = {"math": math, "torch": torch, "nn": torch.nn, "causal_mask": causal_mask}
    for cell in nbformat.read(ROOT / "solutions" / f"{lab}.ipynb", as_version=4).cells:
        if "### BEGIN SOLUTION" in cell.source and "triton" not in cell.source:
            exec(compile(cell.source, f"<{lab}>", "exec"), namespace)
    return namespace


def _matmul_zeros(a, b):
    return torch.zeros(a.shape[:-1] + b.shape[-1:])


def _patch_everything(x, dim=-1):
    torch.matmul = _matmul_zeros
    torch.Tensor.__matmul__ = _matmul_zeros
    torch.Tensor.softmax = lambda self, dim=-1: self  # shadows the C method
    F.softmax = lambda x, dim=-1, **kw: x
    del torch.Tensor.__rmatmul__
    torch.use_deterministic_algorithms(True)
    torch.autograd.set_detect_anomaly(True)
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)
    return x


HARMFUL = [
    ("gradients off", "attention", attention_turns_gradients_off),
    ("default dtype float64", "rope_cos_sin", rope_cos_sin_float64_default),
    ("torch.softmax patched", "softmax", softmax_patches_torch),
    ("default device meta", "attention", attention_on_meta_device),
    ("everything patched", "softmax", _patch_everything),
]


@pytest.mark.parametrize("lab", ["lab1_attention", "lab2_rope"])
@pytest.mark.parametrize("harm", HARMFUL, ids=[h[0] for h in HARMFUL])
def test_nothing_leaks_into_the_next_parts(lab, harm):
    _, part, submission = harm
    dtype, matmul = torch.get_default_dtype(), torch.matmul
    grade(part, submission)
    assert torch.get_default_dtype() is dtype and torch.matmul is matmul
    assert torch.is_grad_enabled() and not torch.is_anomaly_enabled()
    results = grade_namespace(lab, solution_namespace(lab))
    assert [r.score for r in results] == [p.max_score for p in LABS[lab]], [
        r.report() for r in results
    ]


def test_flash_parts_after_harm():
    grade("softmax", _patch_everything)
    namespace = solution_namespace("lab3_flash_attention")
    for part in ("online_softmax", "flash_forward", "flash_backward"):
        entry = namespace[PARTS[part].entry]
        result = grade(part, entry)
        assert result.score == result.max_score, result.report()


def test_each_part_starts_clean_and_the_caller_keeps_its_state():
    """A notebook cell that patched torch before the check: the part is graded on the
    pristine torch, and the notebook gets its own (patched) state back."""
    solution = solution_namespace("lab1_attention")["attention"]
    original = torch.matmul
    try:
        torch.set_default_dtype(torch.float64)
        torch.matmul = _matmul_zeros
        result = grade("attention", solution)
        assert torch.get_default_dtype() is torch.float64 and torch.matmul is _matmul_zeros
    finally:
        torch.matmul = original
        torch.set_default_dtype(torch.float32)
    assert result.score == result.max_score, result.report()
