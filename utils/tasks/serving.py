"""Serving helpers: padded batches of prompts and latency/throughput measurement.

Decoder-only models generate from the right end of each prompt, so a batch of prompts of
different lengths is padded on the **left** and the padding masked out.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Token ids (B, T) and padding mask (B, T) (True = real token) of ``sequences``,
    padded with ``pad_id`` on ``side`` ("left" for generation, "right" for encoders)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("sequences must be a non-empty list of non-empty id lists")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = True
    return ids, mask


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Fraction of wasted (padding) positions when ``lengths`` are batched in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - total / padded


@dataclass
class Timing:
    median_s: float  # median wall time of one call
    items_per_s: float  # throughput: items per call / median time


def measure(fn: Callable[[], object], items: int, repeats: int = 3, warmup: int = 1) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Timing(median, items / median)
