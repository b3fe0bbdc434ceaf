"""Numbers quoted in a chapter's prose come from its outputs through MyST-NB's glue.

Heuristic: in a Markdown cell that follows code, a number with a decimal point or a unit
(``2.18``, ``37 %``, ``105 s``, ``3 MB``, ``1.40x``) outside math, code and glue roles is a
*quoted* number. Each must be glued (``{glue:text}``), be a literature constant in LITERATURE
(with the reason), or be one of the older quotes recorded in ``tests/unglued_numbers.json``,
which may only shrink: a new quote that is not glued fails this test.
"""

import json
import re
from pathlib import Path

import nbformat
import pytest

from utils import glue as glue_module

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "tests" / "unglued_numbers.json"
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))

UNIT = r"(?:%|×|x\b|ms\b|s\b|min\b|MB\b|GB\b|MiB\b|GiB\b|KB\b|kB\b|M\b|B\b|T\b|bits\b|nats\b)"
NUMBER = re.compile(rf"(?<![\w.])\d[\d,]*(?:\.\d+\s?{UNIT}?|\s?{UNIT})")
NOT_PROSE = re.compile(
    r"```.*?```|\$\$.*?\$\$|\$[^$\n]+\$|`[^`\n]*`|\{[a-z:]+\}`[^`]*`|\]\([^)]*\)|^\|.*\|$",
    re.DOTALL | re.MULTILINE,
)

# Constants quoted from the literature, not computed by the notebook (reason in each entry).
LITERATURE = {
    "0.076": "Kaplan et al.'s exponent alpha_N, quoted from the paper",
    "1.4T": "Chinchilla's training tokens, from Hoffmann et al.",
    "300B": "Gopher's training tokens, from Hoffmann et al.",
    "1.88": "nanoGPT README's documented validation loss for its CPU recipe",
    "135M": "part of the model's name, SmolLM2-135M",
    "30 s": "Whisper's input window, from Radford et al. (2023)",
    "160 GB": "RoBERTa's training text, from Liu et al. (2019)",
    "16 GB": "BERT's training text, as reported by Liu et al. (2019)",
}


def quoted_numbers(markdown: str) -> list[str]:
    """The numbers a Markdown text quotes in its prose (math, code, roles and tables removed)."""
    return [match.group(0).strip() for match in NUMBER.finditer(NOT_PROSE.sub(" ", markdown))]


def unglued_quotes(notebook: nbformat.NotebookNode) -> list[str]:
    """Quoted numbers of the Markdown cells that follow a code cell, minus LITERATURE."""
    quotes, after_code = [], False
    for cell in notebook.cells:
        if cell.cell_type == "code":
            after_code = True
        elif after_code:
            quotes += [q for q in quoted_numbers(cell.source) if q not in LITERATURE]
    return quotes


def test_quoted_numbers_heuristic():
    text = (
        "Loss 2.18 against 2.68, 37 % more time, 105 s, a 3 MB file, 1.40x slower, "
        "{glue:text}`ratio:.2f`x, $\\alpha = 0.34$, `lr=1e-3`, 12 layers, Exercise 2."
    )
    assert quoted_numbers(text) == ["2.18", "2.68", "37 %", "105 s", "3 MB", "1.40x"]


def test_only_cells_after_code_count():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("An introduction that announces 2.5x."),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_markdown_cell("The result is 0.93 (alpha 0.076)."),
    ]
    assert unglued_quotes(notebook) == ["0.93"]


def test_glue_is_a_no_op_without_myst_nb(monkeypatch):
    monkeypatch.setattr(glue_module, "_myst_glue", None)
    assert glue_module.glue("share", 0.5) is None


def test_glue_stores_the_value_for_the_book(monkeypatch):
    stored = []
    monkeypatch.setattr(
        glue_module,
        "_myst_glue",
        lambda name, value, display: stored.append((name, value, display)),
    )
    glue_module.glue("ch5_embedding_share", 0.516)
    assert stored == [("ch5_embedding_share", 0.516, False)]


def test_glue_rejects_names_the_markdown_cannot_quote():
    with pytest.raises(ValueError, match="identifier"):
        glue_module.glue("embedding share", 0.5)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.stem)
def test_no_new_unglued_numbers(path):
    recorded = json.loads(LEDGER.read_text())[path.stem]
    new = list(unglued_quotes(nbformat.read(path, as_version=4)))
    stale = []
    for quote in recorded:
        if quote in new:
            new.remove(quote)
        else:
            stale.append(quote)
    assert not new, (
        f"{path.name} quotes {new} in prose after code without glue: glue them from the "
        "outputs (utils.glue.glue and {glue:text}), or add a literature constant to LITERATURE"
    )
    assert not stale, f"{LEDGER.name} still lists {stale} for {path.name}: remove them"
