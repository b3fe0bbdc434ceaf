"""Self-checks and grading for the course labs.

In a lab notebook, one call per part prints each test as PASS/FAIL/... with a message and the
points earned::

    from utils.grading import check
    check("flash_forward", flash_forward)

From the command line, a whole lab is executed in a fresh kernel and graded (score table on
stdout, JSON report on disk)::

    python -m utils.grading labs/lab3_flash_attention.ipynb

See ``labs/index.md`` for what the checks do and :mod:`utils.grading.core` for the machinery.
"""

from __future__ import annotations

import json
import os

from . import lab1, lab2, lab3, lab4
from .core import Part, PartResult, Status, TestResult, run_part

LABS: dict[str, list[Part]] = {
    "lab1_attention": lab1.PARTS,
    "lab2_rope": lab2.PARTS,
    "lab3_flash_attention": lab3.PARTS,
    "lab4_lora_dpo": lab4.PARTS,
}
PARTS: dict[str, Part] = {part.name: part for parts in LABS.values() for part in parts}


def grade(part_name: str, obj: object) -> PartResult:
    """Grade ``obj`` as the part called ``part_name``; returns the result without printing."""
    if part_name not in PARTS:
        raise ValueError(f"unknown part {part_name!r}; parts are {sorted(PARTS)}")
    return run_part(PARTS[part_name], obj)


DEFER_CHECKS = False
"""True in a kernel run by the command-line grader: it grades every part at the end."""


def check(part_name: str, obj: object) -> None:
    """Self-check for a notebook cell: grade ``obj`` and print the report (use :func:`grade`
    for the result itself)."""
    if DEFER_CHECKS:
        print(f"check({part_name!r}): the command-line grader grades every part at the end")
        return
    print(grade(part_name, obj).report())


def prepare_kernel() -> None:
    """Called by the command-line grader's first cell: defer the self-checks, and make
    ``os._exit`` in this process raise SystemExit (IPython reports it and goes on) so that a
    cell calling it cannot end the kernel. Child processes keep the real ``os._exit``."""
    global DEFER_CHECKS
    DEFER_CHECKS = True
    real_exit, kernel = os._exit, os.getpid()

    def guarded_exit(status: int) -> None:
        if os.getpid() != kernel:
            real_exit(status)
        raise SystemExit(f"os._exit({status}) was called; the grader kept the kernel alive")

    os._exit = guarded_exit


def grade_part_json(part_name: str, namespace: dict) -> str:
    """The command-line grader's per-part cell: grade what ``namespace`` defines, as JSON."""
    part = PARTS[part_name]
    return json.dumps(grade_namespace_part(part, namespace).to_dict())


def grade_namespace_part(part: Part, namespace: dict) -> PartResult:
    if part.entry in namespace:
        return run_part(part, namespace[part.entry])
    result = PartResult(part.name, part.title)
    message = f"the notebook defines no `{part.entry}`"
    for test in part.tests:
        result.tests.append(TestResult(test.name, Status.NOT_IMPLEMENTED, 0, test.points, message))
    return result


def grade_namespace(lab: str, namespace: dict) -> list[PartResult]:
    """Grade every part of ``lab`` with the objects the notebook defined under each part's
    entry name (a missing name is NOT IMPLEMENTED)."""
    if lab not in LABS:
        raise ValueError(f"unknown lab {lab!r}; labs are {sorted(LABS)}")
    return [grade_namespace_part(part, namespace) for part in LABS[lab]]


__all__ = [
    "LABS",
    "PARTS",
    "Part",
    "PartResult",
    "Status",
    "TestResult",
    "check",
    "grade",
    "grade_namespace",
]
