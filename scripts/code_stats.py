"""Readability figures for ``utils/`` (outside the grader): the longest functions, the lines
of each model class, ``MultiHeadAttention.forward``'s length and the ``# fmt: skip`` count.

Usage: ``python scripts/code_stats.py [--most N]``. Lines are source lines of the definition
(decorators excluded, docstring included), as ``ast`` reports them.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("GPT", "Llama", "Bert", "BertForMaskedLM", "EncoderDecoder", "Transformer", "T5")


def source_files() -> list[Path]:
    """Every ``utils/**/*.py`` outside ``utils/grading``."""
    utils = ROOT / "utils"
    return sorted(p for p in utils.rglob("*.py") if "grading" not in p.relative_to(utils).parts)


def definitions(path: Path) -> list[tuple[str, ast.AST]]:
    """(qualified name, node) of every function and class in ``path``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                found.append((name, child))
                visit(child, f"{name}.")

    visit(ast.parse(path.read_text()), "")
    return found


def length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--most", type=int, default=10, help="how many long functions to list")
    args = parser.parse_args()
    functions, classes, skips = [], {}, 0
    for path in source_files():
        rel = path.relative_to(ROOT)
        skips += path.read_text().count("# fmt: skip")
        for name, node in definitions(path):
            if isinstance(node, ast.ClassDef):
                classes[name] = (length(node), rel)
            else:
                functions.append((length(node), f"{rel}:{node.lineno} {name}"))
    functions.sort(reverse=True)
    print(f"longest functions in utils/ (outside utils/grading), top {args.most}:")
    for lines, where in functions[: args.most]:
        print(f"  {lines:4d}  {where}")
    print(f"functions longer than 60 lines: {sum(n > 60 for n, _ in functions)}")
    print("model classes (lines):")
    for name in MODELS:
        lines, rel = classes.get(name, (0, "missing"))
        print(f"  {lines:4d}  {name} ({rel})")
    mha = [n for n, where in functions if where.endswith(" MultiHeadAttention.forward")]
    print(f"MultiHeadAttention.forward: {mha[0] if mha else 'missing'} lines")
    print(f"'# fmt: skip' markers: {skips}")


if __name__ == "__main__":
    main()
