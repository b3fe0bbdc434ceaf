"""Glue a computed value into the book's text, so that a re-execution cannot make the text wrong.

In the book, ``glue("name", value)`` stores the value's display in the cell's outputs and the
Markdown quotes it as ``{glue:text}`name:.2f```. Where MyST-NB is not installed (Colab) it does
nothing: the notebook's own printed outputs show the same values.
"""

from __future__ import annotations

import re
from typing import Any

try:
    from myst_nb import glue as _myst_glue
except ImportError:  # Colab and plain Jupyter: nothing to store
    _myst_glue = None

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def glue(name: str, value: Any, display: bool = False) -> None:
    """Store ``value`` under ``name`` for ``{glue:text}`` in Markdown (no-op without MyST-NB).

    A NumPy scalar or 0-d tensor is stored as the Python number it holds: its repr
    (``np.float64(0.5)``, ``tensor(0.5)``) is not a number the Markdown can format."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"glue name {name!r} must be a Python-style identifier")
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if _myst_glue is not None:
        _myst_glue(name, value, display=display)
