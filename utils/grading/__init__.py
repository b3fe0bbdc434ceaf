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

from . import lab1, lab2, lab3
from .core import Part, PartResult, Status, TestResult, run_part

LABS: dict[str, list[Part]] = {
    "lab1_attention": lab1.PARTS,
    "lab2_rope": lab2.PARTS,
    "lab3_flash_attention": lab3.PARTS,
}
PARTS: dict[str, Part] = {part.name: part for parts in LABS.values() for part in parts}


def grade(part_name: str, obj: object) -> PartResult:
    """Grade ``obj`` as the part called ``part_name``; returns the result without printing."""
    if part_name not in PARTS:
        raise ValueError(f"unknown part {part_name!r}; parts are {sorted(PARTS)}")
    return run_part(PARTS[part_name], obj)


def check(part_name: str, obj: object) -> None:
    """Self-check for a notebook cell: grade ``obj`` and print the report (use :func:`grade`
    for the result itself)."""
    print(grade(part_name, obj).report())


def grade_namespace(lab: str, namespace: dict) -> list[PartResult]:
    """Grade every part of ``lab`` with the objects the notebook defined under each part's
    entry name (a missing name is NOT IMPLEMENTED)."""
    if lab not in LABS:
        raise ValueError(f"unknown lab {lab!r}; labs are {sorted(LABS)}")
    results = []
    for part in LABS[lab]:
        if part.entry in namespace:
            results.append(run_part(part, namespace[part.entry]))
            continue
        result = PartResult(part.name, part.title)
        message = f"the notebook defines no `{part.entry}`"
        for test in part.tests:
            result.tests.append(
                TestResult(test.name, Status.NOT_IMPLEMENTED, 0, test.points, message)
            )
        results.append(result)
    return results


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
