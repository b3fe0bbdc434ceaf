"""utils.diagrams: every diagram has its title and the boxes it promises, and the book shows it."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from utils.diagrams import DIAGRAMS, box_labels

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "transformer_2017": (
        "2017 Transformer",
        [
            "multi-head self-attention",
            "masked multi-head self-attention",
            "cross-attention (K, V from encoder)",
            "linear + softmax",
        ],
    ),
    "architecture_families": (
        "Three families",
        ["encoder blocks", "decoder blocks", "encoder → decoder"],
    ),
    "gpt2_vs_llama_block": (
        "GPT-2 block and a Llama block",
        ["LayerNorm", "MLP: 4E, GELU", "RMSNorm", "SwiGLU feed-forward (no biases)"],
    ),
    "attention_data_flow": (
        "Attention data flow",
        [
            "Q  (B, T, d)",
            "scores = Q Kᵀ / √d  (B, T, S)",
            "softmax over S  (B, T, S)",
            "weights · V  (B, T, d)",
        ],
    ),
    "multi_head_split_merge": (
        "split into 4 heads",
        ["head 1: attention on (B, T, d)", "head 4: attention on (B, T, d)"],
    ),
    "kv_cache_steps": (
        "KV cache",
        ["q attends to 4 keys", "q attends to 7 keys", "cached K, V (read)"],
    ),
    "flash_attention_tiling": ("FlashAttention", ["output = acc / l; keep log-sum-exp m + log l"]),
    "parallelism": (
        "Splitting training",
        [
            "all-reduce gradients",
            "matrix half 1",
            "GPU 1: blocks 7–12",
            "ZeRO-1: optimizer states sharded",
            "ZeRO-3 / FSDP: + parameters sharded",
        ],
    ),
}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_every_diagram_is_checked():
    assert set(DIAGRAMS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_diagram_has_its_title_and_boxes(name):
    title, labels = EXPECTED[name]
    figure = DIAGRAMS[name]()
    assert isinstance(figure, plt.Figure)
    assert title in figure._suptitle.get_text()
    missing = [label for label in labels if label not in box_labels(figure)]
    assert not missing, f"{name} lacks boxes {missing}"


def test_kv_cache_diagram_grows_one_key_per_step():
    labels = box_labels(DIAGRAMS["kv_cache_steps"](steps=3, prompt=5))
    assert [label for label in labels if label.startswith("q attends")] == [
        "q attends to 6 keys",
        "q attends to 7 keys",
        "q attends to 8 keys",
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_diagram_is_saved_and_shown_with_a_numbered_caption(name):
    assert (ROOT / "chapters" / "figures" / f"{name}.svg").is_file(), "run scripts/draw_diagrams.py"
    sources = "".join(
        "".join(cell["source"])
        for path in sorted((ROOT / "chapters").glob("*.ipynb"))
        for cell in json.loads(path.read_text())["cells"]
        if cell["cell_type"] == "markdown"
    )
    assert f"```{{figure}} figures/{name}.svg\n:name: fig-{name.replace('_', '-')}" in sources
    assert f"{{numref}}`fig-{name.replace('_', '-')}`" in sources


def test_saved_svgs_are_what_the_code_draws(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "draw_diagrams.py"), str(tmp_path)], check=True
    )
    for name in DIAGRAMS:
        saved = (ROOT / "chapters" / "figures" / f"{name}.svg").read_bytes()
        assert (tmp_path / f"{name}.svg").read_bytes() == saved, (
            f"{name}.svg is stale: run scripts/draw_diagrams.py"
        )
