"""python -m utils.grading NOTEBOOK [--report PATH]: execute a lab in a fresh kernel, grade
every part, print a score table and write a JSON report. Exits 0 whatever the score; 2 when
grading itself cannot run."""

import argparse
import json
import sys
from pathlib import Path

from .notebook import GradingError, grade_notebook, score_table


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.grading", description=__doc__)
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--lab", help="lab name if the file is renamed, e.g. lab3_flash_attention")
    parser.add_argument("--report", type=Path, help="JSON report path (default: NAME.grade.json)")
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds per notebook cell")
    args = parser.parse_args()
    try:
        report = grade_notebook(args.notebook, lab=args.lab, cell_timeout=args.cell_timeout)
    except GradingError as error:
        print(f"grading could not run: {error}", file=sys.stderr)
        return 2
    print(score_table(report))
    path = args.report or Path(f"{args.notebook.stem}.grade.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path} (graded in {report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
