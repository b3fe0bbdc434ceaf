"""Figures used across the course: one style, attention heatmaps, positional encodings."""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns
import torch
from torch import Tensor


def use_course_style() -> None:
    """Seaborn's clean white grid, a readable font size and modest default figure size."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    plt.rcParams.update({"figure.figsize": (7, 3.5), "figure.dpi": 80, "savefig.dpi": 80})


def _to_numpy(x: Tensor):
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else x


def plot_attention(
    weights: Tensor,
    query_labels: list[str] | None = None,
    key_labels: list[str] | None = None,
    title: str = "Attention weights",
    ax: plt.Axes | None = None,
    annotate: bool = False,
    cmap: str = "viridis",
) -> plt.Axes:
    """Heatmap of one (T, S) attention matrix: rows are queries, columns keys."""
    weights = _to_numpy(weights)
    if weights.ndim != 2:
        raise ValueError(f"plot_attention needs a (T, S) matrix, got shape {weights.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * weights.shape[1] + 2, 0.4 * weights.shape[0] + 1.5))
    sns.heatmap(
        weights,
        ax=ax,
        cmap=cmap,
        vmin=0.0,
        square=False,
        annot=annotate,
        fmt=".2f",
        xticklabels=key_labels if key_labels is not None else "auto",
        yticklabels=query_labels if query_labels is not None else "auto",
        cbar_kws={"label": "weight"},
    )
    ax.set(title=title, xlabel="key", ylabel="query")
    ax.tick_params(axis="x", rotation=90)
    ax.tick_params(axis="y", rotation=0)
    return ax


def plot_attention_heads(
    weights: Tensor,
    labels: list[str] | None = None,
    titles: list[str] | None = None,
    suptitle: str = "Attention heads",
    ncols: int = 4,
) -> plt.Figure:
    """A grid of heatmaps, one per head, from (H, T, S) weights."""
    weights = _to_numpy(weights)
    heads = weights.shape[0]
    nrows = -(-heads // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.5 * nrows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        sns.heatmap(
            weights[h],
            ax=ax,
            cmap="viridis",
            vmin=0.0,
            cbar=False,
            square=True,
            xticklabels=labels if labels else False,
            yticklabels=labels if labels else False,
        )
        ax.set(title=titles[h] if titles else f"head {h}", xlabel="key", ylabel="query")
        ax.tick_params(labelsize=6)
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_positional_encoding(
    table: Tensor, title: str = "Positional encoding", ax: plt.Axes | None = None
) -> plt.Axes:
    """Heatmap of a (positions, dim) encoding table."""
    table = _to_numpy(table)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    image = ax.imshow(table, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, origin="lower")
    plt.colorbar(image, ax=ax, label="value")
    ax.set(title=title, xlabel="dimension", ylabel="position")
    return ax


def plot_similarity_by_offset(
    table: Tensor, title: str = "Dot product between positions", ax: plt.Axes | None = None
) -> plt.Axes:
    """Line plot of <PE[p], PE[q]> against q for a few anchor positions p."""
    table = _to_numpy(torch.as_tensor(table))
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    positions = range(table.shape[0])
    for anchor in (0, table.shape[0] // 4, table.shape[0] // 2):
        ax.plot(positions, table @ table[anchor], label=f"position {anchor}")
    ax.set(title=title, xlabel="position", ylabel="dot product")
    ax.legend()
    return ax
