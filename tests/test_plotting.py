"""utils.plotting draws what it is given, with titles and labelled axes."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from utils.plotting import (
    plot_attention,
    plot_attention_heads,
    plot_positional_encoding,
    plot_similarity_by_offset,
    use_course_style,
)


@pytest.fixture(autouse=True)
def close_figures():
    use_course_style()
    yield
    plt.close("all")


def test_plot_attention_shows_the_matrix_with_labels():
    weights = torch.softmax(torch.randn(3, 5), dim=-1)
    ax = plot_attention(weights, ["a", "b", "c"], list("vwxyz"), title="toy")
    assert np.allclose(ax.collections[0].get_array().reshape(3, 5), weights.numpy())
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("toy", "key", "query")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]


def test_plot_attention_rejects_non_matrices():
    with pytest.raises(ValueError, match=r"\(T, S\) matrix, got shape \(2, 3, 5\)"):
        plot_attention(torch.rand(2, 3, 5))


def test_plot_attention_heads_one_panel_per_head():
    fig = plot_attention_heads(torch.rand(5, 4, 4), titles=[f"h{i}" for i in range(5)], ncols=3)
    visible = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in visible] == ["h0", "h1", "h2", "h3", "h4"]
    assert len(fig.axes) == 6  # a 2 x 3 grid with the last panel switched off


def test_positional_plots_show_the_table_and_its_dot_products():
    table = torch.randn(16, 8)
    ax = plot_positional_encoding(table, title="pe")
    assert np.allclose(ax.images[0].get_array(), table.numpy())
    ax = plot_similarity_by_offset(table)
    first_line = ax.get_lines()[0].get_ydata()
    assert np.allclose(first_line, (table @ table[0]).numpy(), atol=1e-5)
    assert ax.get_xlabel() == "position" and ax.get_ylabel() == "dot product"
