"""python -m utils.grading NOTEBOOK [--report PATH] [--junit FILE]: execute a lab in a fresh
kernel, grade every part, print a score table and write a JSON report. Exits 0 whatever the
score; 2 when grading itself cannot run.

python -m utils.grading --batch FOLDER [--out DIR] [--time-limit S] [--memory-limit MB]
[--jobs N] [--junit FILE]: grade every notebook under FOLDER, each in its own process with
those limits; one JSON per submission and grades.csv in DIR, a summary table on stdout.
Exits 0 when every submission has a row."""

import argparse
import json
import sys
from pathlib import Path

from .batch import grade_folder, summary_table
from .junit import junit_xml
from .notebook import CELL_TIMEOUT, GradingError, grade_notebook, score_table


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.grading", description=__doc__)
    parser.add_argument("notebook", type=Path, nargs="?")
    parser.add_argument("--batch", type=Path, help="grade every notebook under this folder")
    parser.add_argument("--out", type=Path, default=Path("grades"), help="batch results folder")
    parser.add_argument("--lab", help="lab name if the file is renamed, e.g. lab3_flash_attention")
    parser.add_argument("--report", type=Path, help="JSON report path (default: NAME.grade.json)")
    parser.add_argument("--junit", type=Path, help="also write a JUnit XML report here")
    parser.add_argument(
        "--cell-timeout", type=int, default=CELL_TIMEOUT, help="seconds per notebook cell"
    )
    parser.add_argument(
        "--time-limit", type=float, default=600, help="batch: seconds per submission"
    )
    parser.add_argument(
        "--memory-limit", type=int, default=4096, help="batch: MiB of address space per process"
    )
    parser.add_argument("--jobs", type=int, default=1, help="batch: submissions graded at once")
    args = parser.parse_args()
    if args.batch is not None:
        if not args.batch.is_dir():
            print(f"grading could not run: no such folder: {args.batch}", file=sys.stderr)
            return 2
        records = grade_folder(
            args.batch.resolve(), args.out.resolve(), time_limit=args.time_limit,
            memory_mb=args.memory_limit, cell_timeout=args.cell_timeout, jobs=args.jobs,
            lab=args.lab, progress=lambda line: print(line, file=sys.stderr, flush=True),
        )  # fmt: skip
        print(summary_table(records))
        print(f"results: {args.out / 'grades.csv'} and one JSON per submission in {args.out}")
        if args.junit:
            args.junit.write_text(junit_xml(records))
        return 0
    if args.notebook is None:
        parser.error("give a NOTEBOOK or --batch FOLDER")
    try:
        report = grade_notebook(args.notebook, lab=args.lab, cell_timeout=args.cell_timeout)
    except GradingError as error:
        print(f"grading could not run: {error}", file=sys.stderr)
        return 2
    print(score_table(report))
    path = args.report or Path(f"{args.notebook.stem}.grade.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    if args.junit:
        args.junit.write_text(junit_xml([report]))
    print(f"report: {path} (graded in {report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
