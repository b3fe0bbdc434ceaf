"""Architecture diagrams of the book, drawn with matplotlib boxes and arrows.

Each function returns a Figure whose title is its suptitle and whose boxes are text
annotations with a rounded frame; `scripts/draw_diagrams.py` saves them as the SVG files the
chapters show.
"""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

COLOURS = {
    "embed": "#f2d7d5",
    "attn": "#d6eaf8",
    "norm": "#fcf3cf",
    "ffn": "#d5f5e3",
    "out": "#e8daef",
    "data": "#f4f6f7",
}


def _canvas(title: str, ncols: int = 1, width: float = 7.0, height: float = 5.0):
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    for ax in axes[0]:
        ax.set(xlim=(0, 10), ylim=(0, 10))
        ax.axis("off")
    fig.suptitle(title)
    return fig, list(axes[0])


def box(ax, x: float, y: float, label: str, kind: str = "data"):
    """A labelled rounded box centred at (x, y), coloured by kind; returns its text artist."""
    return ax.text(
        x,
        y,
        label,
        ha="center",
        va="center",
        fontsize=8,
        bbox={"boxstyle": "round,pad=0.3", "fc": COLOURS[kind], "ec": "0.3"},
        wrap=True,
    )


def arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "", style="-|>"):
    """An arrow from start to end, with an optional label at its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, color="0.3"))
    if label:
        middle = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        ax.text(*middle, label, fontsize=7, ha="left", va="center", color="0.2")


def column(ax, x: float, items: list[tuple[str, str]], bottom: float = 1.0, step: float = 1.1):
    """Boxes stacked bottom to top at x, joined by arrows; returns the y of each box."""
    ys = [bottom + i * step for i in range(len(items))]
    for (label, kind), y in zip(items, ys, strict=True):
        box(ax, x, y, label, kind)
    for y0, y1 in itertools.pairwise(ys):
        arrow(ax, (x, y0 + 0.3), (x, y1 - 0.3))
    return ys


def box_labels(fig: plt.Figure) -> list[str]:
    """The labels of every box in the figure (texts with a frame), in drawing order."""
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_bbox_patch() is not None]


def _mask(ax, x: float, y: float, causal: bool, size: int = 5, cell: float = 0.45, title=""):
    """A small attention-mask grid (filled = allowed) with its lower-left corner at (x, y)."""
    for i in range(size):
        for j in range(size):
            allowed = j <= i or not causal
            ax.add_patch(
                Rectangle(
                    (x + j * cell, y + (size - 1 - i) * cell * 0.8),
                    cell,
                    cell * 0.8,
                    fc="#5dade2" if allowed else "white",
                    ec="0.6",
                    lw=0.5,
                )
            )
    ax.text(x + size * cell / 2, y - 0.3, title, ha="center", va="top", fontsize=7)


def transformer_2017() -> plt.Figure:
    """The encoder–decoder of Vaswani et al. (2017): N encoder and N decoder blocks."""
    fig, (ax,) = _canvas("The 2017 Transformer: encoder (left) and decoder (right)", height=6.5)
    encoder = column(
        ax,
        2.5,
        [
            ("source tokens", "data"),
            ("embedding + positional encoding", "embed"),
            ("multi-head self-attention", "attn"),
            ("add & LayerNorm", "norm"),
            ("feed-forward", "ffn"),
            ("add & LayerNorm", "norm"),
        ],
        bottom=0.6,
    )
    decoder = column(
        ax,
        7.5,
        [
            ("target tokens, shifted right", "data"),
            ("embedding + positional encoding", "embed"),
            ("masked multi-head self-attention", "attn"),
            ("add & LayerNorm", "norm"),
            ("cross-attention (K, V from encoder)", "attn"),
            ("add & LayerNorm", "norm"),
            ("feed-forward", "ffn"),
            ("add & LayerNorm", "norm"),
            ("linear + softmax", "out"),
        ],
        bottom=0.6,
        step=1.05,
    )
    arrow(ax, (4.6, encoder[-1]), (5.3, decoder[4]), "memory")
    ax.add_patch(
        Rectangle(
            (0.3, encoder[2] - 0.5),
            4.4,
            encoder[-1] - encoder[2] + 1.0,
            fill=False,
            ls="--",
            ec="0.5",
        )
    )
    ax.add_patch(
        Rectangle(
            (5.3, decoder[2] - 0.5),
            4.4,
            decoder[-2] - decoder[2] + 1.0,
            fill=False,
            ls="--",
            ec="0.5",
        )
    )
    ax.text(0.35, encoder[-1] + 0.6, "× N blocks", fontsize=7)
    ax.text(5.35, decoder[-2] + 0.6, "× N blocks", fontsize=7)
    return fig


def architecture_families() -> plt.Figure:
    """Encoder-only (BERT), decoder-only (GPT) and encoder–decoder (T5) with their masks."""
    fig, axes = _canvas("Three families of Transformers and their attention masks", 3, 10, 4.2)
    panels = [
        (
            "encoder-only (BERT)",
            [
                ("tokens with [MASK]", "data"),
                ("encoder blocks", "attn"),
                ("predict masked tokens", "out"),
            ],
            [("bidirectional", False)],
        ),
        (
            "decoder-only (GPT, Llama)",
            [("tokens so far", "data"), ("decoder blocks", "attn"), ("predict next token", "out")],
            [("causal", True)],
        ),
        (
            "encoder–decoder (T5)",
            [("input text", "data"), ("encoder → decoder", "attn"), ("output text", "out")],
            [("encoder: bidirectional", False), ("decoder: causal", True)],
        ),
    ]
    for ax, (title, items, masks) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=9)
        column(ax, 5, items, bottom=5.0, step=1.6)
        for k, (name, causal) in enumerate(masks):
            _mask(ax, 0.8 + 5 * k if len(masks) > 1 else 3.9, 1.2, causal, title=name)
    fig.subplots_adjust(top=0.8)
    return fig


def gpt2_vs_llama_block() -> plt.Figure:
    """One GPT-2 block beside one Llama block: both pre-norm, different parts."""
    fig, axes = _canvas("A GPT-2 block and a Llama block", 2, 8, 5)
    blocks = {
        "GPT-2": [
            ("x (learned positions added at the input)", "data"),
            ("LayerNorm", "norm"),
            ("multi-head attention (with biases)", "attn"),
            ("+ residual", "data"),
            ("LayerNorm", "norm"),
            ("MLP: 4E, GELU", "ffn"),
            ("+ residual", "data"),
        ],
        "Llama": [
            ("x (no position vectors)", "data"),
            ("RMSNorm", "norm"),
            ("grouped-query attention, RoPE on q, k", "attn"),
            ("+ residual", "data"),
            ("RMSNorm", "norm"),
            ("SwiGLU feed-forward (no biases)", "ffn"),
            ("+ residual", "data"),
        ],
    }
    for ax, (name, items) in zip(axes, blocks.items(), strict=True):
        ax.set_title(name, fontsize=10)
        ys = column(ax, 5, items, bottom=1.0, step=1.3)
        for start, end in ((0, 3), (3, 6)):  # the residual connections skip each sublayer
            ax.add_patch(
                FancyArrowPatch(
                    (8.2, ys[start]),
                    (8.2, ys[end]),
                    arrowstyle="-|>",
                    mutation_scale=10,
                    color="0.5",
                    ls="--",
                )
            )
    return fig


def attention_data_flow() -> plt.Figure:
    """Scaled dot-product attention with the shape of every tensor (one head)."""
    fig, (ax,) = _canvas("Attention data flow, with shapes (B batch, T queries, S keys)", 1, 8, 6)
    box(ax, 2, 1, "Q  (B, T, d)", "attn")
    box(ax, 5, 1, "K  (B, S, d)", "attn")
    box(ax, 8, 1, "V  (B, S, d)", "attn")
    box(ax, 3.5, 3, "scores = Q Kᵀ / √d  (B, T, S)", "data")
    box(ax, 3.5, 4.8, "mask: forbidden → −∞  (B, T, S)", "norm")
    box(ax, 3.5, 6.6, "softmax over S  (B, T, S)", "ffn")
    box(ax, 5.8, 8.6, "weights · V  (B, T, d)", "out")
    for start, end in (
        ((2, 1.4), (3.2, 2.6)),
        ((5, 1.4), (3.8, 2.6)),
        ((3.5, 3.4), (3.5, 4.4)),
        ((3.5, 5.2), (3.5, 6.2)),
        ((3.5, 7.0), (5.4, 8.2)),
        ((8, 1.4), (6.4, 8.2)),
    ):
        arrow(ax, start, end)
    return fig


def multi_head_split_merge(heads: int = 4) -> plt.Figure:
    """How (B, T, E) becomes H heads of width d = E / H and back."""
    fig, (ax,) = _canvas(f"Multi-head attention: split into {heads} heads and merge", 1, 9, 4.5)
    box(ax, 1.2, 5, "x  (B, T, E)", "data")
    box(ax, 3.2, 5, "q, k, v projections", "attn")
    arrow(ax, (2.0, 5), (2.3, 5))
    for h in range(heads):
        y = 8 - h * 2
        box(ax, 5.6, y, f"head {h + 1}: attention on (B, T, d)", "attn")
        arrow(ax, (4.1, 5), (4.3, y))
        arrow(ax, (6.9, y), (7.5, 5))
    box(ax, 8.3, 5, "concat (B, T, H·d) → out proj (B, T, E)", "out")
    ax.text(
        5.6,
        0.2,
        "split: view (B, T, H, d) and transpose to (B, H, T, d); merge: transpose back and reshape",
        ha="center",
        fontsize=7,
    )
    return fig


def kv_cache_steps(steps: int = 4, prompt: int = 3) -> plt.Figure:
    """Decoding steps with a KV cache: each step adds one key/value and reads all earlier ones."""
    fig, (ax,) = _canvas("The KV cache across decoding steps", 1, 8, 4.5)
    cell = 0.9
    for step in range(steps):
        y = 8 - step * 2
        length = prompt + step
        ax.text(0.2, y + cell / 2, f"step {step + 1}", fontsize=8, va="center")
        for j in range(length + 1):
            new = j == length
            ax.add_patch(
                Rectangle(
                    (1.6 + j * cell, y),
                    cell * 0.9,
                    cell,
                    fc="#f5b041" if new else "#aed6f1",
                    ec="0.3",
                )
            )
        box(ax, 8.8, y + cell / 2, f"q attends to {length + 1} keys", "attn")
    box(ax, 2.5, 0.3, "cached K, V (read)", "attn")
    box(ax, 6.5, 0.3, "new token's K, V (appended)", "embed")
    return fig


def flash_attention_tiling(blocks: int = 4) -> plt.Figure:
    """FlashAttention: one query tile streams over key tiles with an online softmax."""
    fig, axes = _canvas("FlashAttention: tiles and the online softmax", 2, 10, 4.5)
    ax = axes[0]
    cell = 8 / blocks
    for i in range(blocks):
        for j in range(blocks):
            active = i == 1
            ax.add_patch(
                Rectangle(
                    (1 + j * cell, 1 + (blocks - 1 - i) * cell),
                    cell,
                    cell,
                    fc="#f5b041" if active else "white",
                    ec="0.4",
                )
            )
    ax.text(5, 9.5, "S = Q Kᵀ, never stored whole", ha="center", fontsize=8)
    ax.text(0.5, 5, "query tiles", rotation=90, va="center", fontsize=8)
    ax.text(5, 0.4, "key/value tiles, visited left to right", ha="center", fontsize=8)
    column(
        axes[1],
        5,
        [
            ("load Q tile i, set m = −∞, l = 0, acc = 0", "data"),
            ("for each K, V tile j: s = Q Kⱼᵀ / √d", "attn"),
            ("m' = max(m, rowmax s);  p = exp(s − m')", "norm"),
            ("l = e^(m−m') l + rowsum p;  acc = e^(m−m') acc + p Vⱼ", "ffn"),
            ("output = acc / l; keep log-sum-exp m + log l", "out"),
        ],
        bottom=1.5,
        step=1.8,
    )
    return fig


def parallelism() -> plt.Figure:
    """Data, tensor and pipeline parallelism on two devices, and what ZeRO's stages shard."""
    fig, axes = _canvas("Splitting training across devices", 4, 13, 4.5)
    titles = ["data parallel", "tensor parallel", "pipeline parallel", "ZeRO stages"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
    for device, x in ((0, 2.5), (1, 7.5)):
        column(
            axes[0],
            x,
            [
                (f"batch part {device}", "data"),
                (f"model copy {device}", "attn"),
                (f"gradients {device}", "ffn"),
            ],
            bottom=2,
            step=2,
        )
        column(
            axes[1],
            x,
            [
                ("same batch", "data"),
                (f"matrix half {device}", "attn"),
                (f"partial output {device}", "ffn"),
            ],
            bottom=2,
            step=2,
        )
        for ax in axes[:2]:
            arrow(ax, (x, 6.3), (5, 8.1))
    box(axes[0], 5, 8.5, "all-reduce gradients", "norm")
    box(axes[1], 5, 8.5, "all-reduce outputs", "norm")
    for stage, device in enumerate(("GPU 0: blocks 1–6", "GPU 1: blocks 7–12")):
        y = 7 - stage * 2.2
        box(axes[2], 2.2, y, device, "attn")
        for micro in range(3):
            axes[2].add_patch(
                Rectangle(
                    (5 + micro + stage, y - 0.4), 0.9, 0.8, fc=f"C{micro}", alpha=0.6, ec="0.3"
                )
            )
    axes[2].text(
        6.5,
        2.5,
        "micro-batches 1–3 over time →\n(empty slots: the bubble)",
        ha="center",
        fontsize=7,
    )
    rows = [
        ("ZeRO-1: optimizer states sharded", "norm"),
        ("ZeRO-2: + gradients sharded", "ffn"),
        ("ZeRO-3 / FSDP: + parameters sharded", "attn"),
    ]
    column(axes[3], 5, rows, bottom=2.5, step=2.2)
    axes[3].text(5, 0.8, "each device keeps 1/N of what is sharded", ha="center", fontsize=7)
    return fig


DIAGRAMS = {
    "transformer_2017": transformer_2017,
    "architecture_families": architecture_families,
    "gpt2_vs_llama_block": gpt2_vs_llama_block,
    "attention_data_flow": attention_data_flow,
    "multi_head_split_merge": multi_head_split_merge,
    "kv_cache_steps": kv_cache_steps,
    "flash_attention_tiling": flash_attention_tiling,
    "parallelism": parallelism,
}
