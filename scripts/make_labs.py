"""Generate the learner notebooks in ``labs/`` from the solutions in ``solutions/`` (`make labs`).

The solutions are the one source of truth. In every code cell, each block between a line
``### BEGIN SOLUTION`` and a line ``### END SOLUTION`` (markers included) becomes a stub at
the marker's indentation::

    # YOUR CODE HERE
    raise NotImplementedError("<function name>: your code here")

Outputs, execution counts and saved widget state are cleared, and " (solution)" is dropped
from the title. Labs are stored unexecuted.

    python scripts/make_labs.py            # write labs/
    python scripts/make_labs.py --check    # exit 1 if a committed lab differs
"""

import argparse
import copy
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
DEF = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)")


def _source(cell: dict) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def stub_solutions(source: str) -> str:
    """Replace each marked solution block of a code cell's source with a stub."""
    lines, out, inside, owner = source.split("\n"), [], False, "this exercise"
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"line {number}: {BEGIN} inside another solution block")
            indent = line[: len(line) - len(line.lstrip())]
            if not indent:
                raise ValueError(f"line {number}: solution blocks must be inside a function")
            out += [
                f"{indent}# YOUR CODE HERE",
                f'{indent}raise NotImplementedError("{owner}: your code here")',
            ]
            inside = True
        elif stripped == END:
            if not inside:
                raise ValueError(f"line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            match = DEF.match(line)
            owner = match.group(1) if match else owner
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without {END}")
    return "\n".join(out)


def make_lab(solution: dict) -> dict:
    """The learner version of a solution notebook (a JSON dict)."""
    lab = copy.deepcopy(solution)
    lab["metadata"].pop("widgets", None)
    for cell in lab["cells"]:
        if cell["cell_type"] == "code":
            cell["source"] = stub_solutions(_source(cell))
            cell["outputs"], cell["execution_count"] = [], None
            cell["metadata"].pop("execution", None)
    first = lab["cells"][0]
    first["source"] = _source(first).replace(" (solution)", "", 1)
    return lab


def render(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    stale = []
    for solution in sorted((ROOT / "solutions").glob("*.ipynb")):
        target = ROOT / "labs" / solution.name
        text = render(make_lab(json.loads(solution.read_text())))
        if target.exists() and target.read_text() == text:
            continue
        stale.append(target)
        if not args.check:
            target.write_text(text)
    for path in stale:
        print(f"{'differs' if args.check else 'written'}: {path.relative_to(ROOT)}")
    sys.exit(1 if args.check and stale else 0)


if __name__ == "__main__":
    main()
