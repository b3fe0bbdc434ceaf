"""Numbers quoted in a chapter's prose come from its outputs through MyST-NB's glue.

Heuristic: in a Markdown cell that follows code, a number with a decimal point or a unit
(``2.18``, ``37 %``, ``105 s``, ``3 MB``, ``1.40x``) outside math, code and glue roles is a
*quoted* number (a decade such as "1960s" is a date, not a measurement). Each must be glued
(``{glue:text}``), or be traced to where it was not computed by the notebook: a literature
constant in LITERATURE (with the reason) quoted in a paragraph that cites its source
(``{cite}``), or a measurement in MEASURED quoted in a paragraph that names the
``benchmarks/`` script that made it. The older quotes recorded in ``tests/unglued_numbers.json``
may only shrink: a new quote that is not glued fails this test.
"""

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from utils import glue as glue_module

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "tests" / "unglued_numbers.json"
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))

UNIT = r"(?:%|×|x\b|ms\b|s\b|min\b|MB\b|GB\b|MiB\b|GiB\b|KB\b|kB\b|M\b|B\b|T\b|bits\b|nats\b)"
NUMBER = re.compile(rf"(?<![\w.])(?!\d{{3}}0s\b)\d[\d,]*(?:\.\d+\s?{UNIT}?|\s?{UNIT})")
NAMED = r"\b[A-Z][A-Za-z0-9]*(?:-[A-Za-z0-9.]*\d[A-Za-z0-9.]*)+"  # SmolLM2-135M, GPT-4V
NOT_PROSE = re.compile(
    NAMED + r"|```.*?```|\$\$.*?\$\$|\$[^$\n]+\$|`[^`\n]*`|\{[a-z:]+\}`[^`]*`|\]\([^)]*\)|^\|.*\|$",
    re.DOTALL | re.MULTILINE,
)

# Constants quoted from the literature, not computed by the notebook (reason in each entry);
# exempt only in a paragraph that cites its source.
LITERATURE = {
    "65 M": "the base Transformer's parameter count, as reported by Vaswani et al. (2017)",
    "0.076": "Kaplan et al.'s exponent alpha_N, quoted from the paper",
    "1.4T": "Chinchilla's training tokens, from Hoffmann et al.",
    "300B": "Gopher's training tokens, from Hoffmann et al.",
    "1.88": "nanoGPT README's documented validation loss for its CPU recipe",
    "30 s": "Whisper's input window, from Radford et al. (2023)",
    "15 %": "BERT's masking rate (Devlin et al. 2019), T5's corruption rate (Raffel et al.)",
    "80 %": "BERT's share of chosen tokens replaced by [MASK] (Devlin et al. 2019)",
    "10 %": "BERT's shares of chosen tokens made random / left unchanged (Devlin et al. 2019)",
    "70B": "Chinchilla's parameters (Hoffmann et al. 2022), Llama 2's largest (Touvron et al.)",
    "280B": "Gopher's parameters, from Hoffmann et al. (2022)",
    "2.0": "SQuAD 2.0, the data set's version (Rajpurkar et al. 2018)",
    "0.4": "the best WNUT-17 systems' entity F1 (Derczynski et al. 2017)",
    "0.42": "the best WNUT-17 system's entity F1, 41.86 (Derczynski et al. 2017)",
    "0.565": "BERTweet's WNUT-17 entity F1 (Nguyen et al. 2020)",
    "88.5": "BERT-base's SQuAD 1.1 dev F1 (Devlin et al. 2019)",
    "1.1": "SQuAD 1.1, the data set's version (Rajpurkar et al. 2016, via Devlin et al. 2019)",
    "7.5B": "the ZeRO paper's example model, from Rajbhandari et al. (2020)",
    "7B": "Llama 2's smallest size (Touvron et al. 2023)",
    "80 GB": "an H100's memory, from NVIDIA's datasheet",
    "100B": "the scale from which chain-of-thought helped, Wei et al. (2022)",
    "160 GB": "RoBERTa's training text, from Liu et al. (2019)",
    "16 GB": "BERT's training text, as reported by Liu et al. (2019)",
}


# Measurements made by a script in benchmarks/, not by the notebook (script in each entry);
# exempt only in a paragraph that names a benchmarks/ script.
MEASURED = {
    "0.32 s": "benchmarks/tokenizer.py: our encoder with GPT-2's ranks, empty cache",
    "0.10 s": "benchmarks/tokenizer.py: our encoder with GPT-2's ranks, warm cache",
    "0.064 s": "benchmarks/tokenizer.py: tiktoken with GPT-2's ranks",
    "0.29 s": "benchmarks/tokenizer.py: our encoder with the V = 1,024 vocabulary",
    "0.79 s": "benchmarks/tokenizer.py: Hugging Face tokenizers with the V = 1,024 vocabulary",
    "30 %": "benchmarks/generation.py: decoding layout against nn.Linear's (its table)",
    "12 %": "benchmarks/generation.py: nn.Linear layout against Hugging Face (its table)",
    "1.1": "benchmarks/generation.py: ours / Hugging Face, GPT-2 shape (its table)",
    "1.2×": "benchmarks/generation.py: ours / Hugging Face, SmolLM2 (its table)",
    "1.886": "benchmarks/train_char_gpt.py --recipe nanogpt: final validation loss (docstring)",
    "105 s": "benchmarks/train_char_gpt.py --recipe nanogpt: wall time, idle machine (docstring)",
    "1.88": "benchmarks/train_char_gpt.py: the target validation loss (nanoGPT's documented 1.88)",
    "41.0 s": "benchmarks/train_char_gpt.py: course recipe, time to the target (docstring)",
    "22.8 ms": "benchmarks/train_char_gpt.py: course recipe, time per iteration (docstring)",
}

BLOCKS = re.compile(r"```.*?```|\$\$.*?\$\$", re.DOTALL)  # fenced code/directives, display math
PARAGRAPH = re.compile(r"\n\s*\n|\n(?=\s*(?:[-*]|\d+\.)\s)")


def quoted_numbers(markdown: str) -> list[str]:
    """The numbers a Markdown text quotes in its prose (math, code, roles and tables removed)."""
    return [match.group(0).strip() for match in NUMBER.finditer(NOT_PROSE.sub(" ", markdown))]


def untraced_quotes(markdown: str) -> list[str]:
    """Quoted numbers, minus literature constants in a paragraph that cites and measurements
    in a paragraph that names its benchmark script (paragraphs and list items are separate)."""
    quotes = []
    for paragraph in PARAGRAPH.split(BLOCKS.sub(" ", markdown)):
        cited = "{cite" in paragraph
        benchmarked = "benchmarks/" in paragraph
        quotes += [
            quote
            for quote in quoted_numbers(paragraph)
            if not (cited and quote in LITERATURE) and not (benchmarked and quote in MEASURED)
        ]
    return quotes


def unglued_quotes(notebook: nbformat.NotebookNode) -> list[str]:
    """Untraced quoted numbers of the Markdown cells that follow a code cell."""
    quotes, after_code = [], False
    for cell in notebook.cells:
        if cell.cell_type == "code":
            after_code = True
        elif after_code:
            quotes += untraced_quotes(cell.source)
    return quotes


def test_quoted_numbers_heuristic():
    text = (
        "Loss 2.18 against 2.68, 37 % more time, 105 s, a 3 MB file, 1.40x slower, "
        "{glue:text}`ratio:.2f`x, $\\alpha = 0.34$, `lr=1e-3`, 12 layers, Exercise 2, "
        "SmolLM2-135M and Llama-2-7B (names), 0.91-0.95 MB."
    )
    expected = ["2.18", "2.68", "37 %", "105 s", "3 MB", "1.40x", "0.91", "0.95 MB"]
    assert quoted_numbers(text) == expected


def test_decades_are_dates_not_measurements():
    assert quoted_numbers("the 1960s, 1962, 1,960 s and 1960 s") == ["1,960 s", "1960 s"]


def test_only_cells_after_code_count():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("An introduction that announces 2.5x."),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_markdown_cell("The result is 0.93 (alpha 0.076 {cite}`kaplan2020`)."),
    ]
    assert unglued_quotes(notebook) == ["0.93"]


def test_literature_constants_need_a_citation_in_their_paragraph():
    text = "Kaplan's alpha is 0.076 {cite}`kaplan2020`.\n\nWith alpha 0.076 the loss falls."
    assert untraced_quotes(text) == ["0.076"]
    assert untraced_quotes("- alpha 0.076 {cite}`kaplan2020`\n- alpha 0.076") == ["0.076"]


def test_measurements_need_their_benchmark_script_in_their_paragraph(monkeypatch):
    monkeypatch.setitem(MEASURED, "0.32 s", "benchmarks/tokenizer.py")
    text = "`benchmarks/tokenizer.py` takes 0.32 s.\n\nIt takes 0.32 s, and 0.10 s."
    assert untraced_quotes(text) == ["0.32 s", "0.10 s"]


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


def test_glue_stores_numpy_and_torch_scalars_as_python_numbers(monkeypatch):
    stored = []
    monkeypatch.setattr(
        glue_module, "_myst_glue", lambda name, value, display: stored.append(value)
    )
    glue_module.glue("a", np.float64(0.25))
    glue_module.glue("b", torch.tensor(3))
    glue_module.glue("c", np.array([1.0, 2.0]))
    assert [type(v) for v in stored[:2]] == [float, int] and stored[:2] == [0.25, 3]
    assert isinstance(stored[2], np.ndarray)  # arrays are left alone


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
        "outputs (utils.glue.glue and {glue:text}), or trace them: a literature constant in "
        "LITERATURE cited in its paragraph, a benchmark figure in MEASURED beside its script"
    )
    assert not stale, f"{LEDGER.name} still lists {stale} for {path.name}: remove them"
