"""Measuring memory, on any device: what the book quotes about attention, activations and
quantized weights.

- :class:`TensorMemoryTracker` / :func:`measure_peak_memory`: the peak bytes of tensors alive
  at once during a call (a ``TorchDispatchMode`` that sees every tensor an operator creates),
  and the largest single tensor.
- :func:`saved_tensor_bytes`: the bytes an autograd graph keeps for the backward pass.
- :func:`state_dict_bytes`: the size of a saved ``state_dict``.
"""

from __future__ import annotations

import io
import weakref
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """Watches every torch operation run inside it (``with TensorMemoryTracker() as t:``).

    Records ``peak_bytes``, the most bytes of tensor storage created inside the block and
    alive at the same time (a storage is counted once however many views share it, and
    released when its last Python tensor is garbage-collected), the ``largest`` tensor created
    as ``(numel, shape, op name)``, and ``op_counts`` per ATen operator. Storage of the
    tensors passed as ``inputs`` is never counted. It sees tensors, not the allocator: buffers
    an operator allocates privately inside one kernel are invisible (so fused kernels such as
    torch's SDPA look lighter than they are; ``benchmarks/attention_memory.py`` also reports
    the process's resident memory).
    """

    def __init__(self, inputs: tuple[Tensor, ...] = ()) -> None:
        super().__init__()
        self._ignored = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, Tensor)}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [bytes, live Python tensors]
        self.live_bytes = self.peak_bytes = 0
        self.largest: tuple[int, tuple[int, ...], str] = (0, (), "")
        self.op_counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.op_counts[name] += 1
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self._track(tensor, name)
        return out

    def _track(self, tensor: Tensor, op: str) -> None:
        if tensor.numel() > self.largest[0]:
            self.largest = (tensor.numel(), tuple(tensor.shape), op)
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in self._ignored or pointer == 0:
            return
        entry = self._live.setdefault(pointer, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.live_bytes += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        weakref.finalize(tensor, self._release, pointer)

    def _release(self, pointer: int) -> None:
        entry = self._live.get(pointer)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._live[pointer]


def measure_peak_memory(fn, *args, **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` under :class:`TensorMemoryTracker`; return (result, peak
    bytes of tensors it created that were alive at once), not counting the tensor arguments."""
    with TensorMemoryTracker(inputs=(*args, *kwargs.values())) as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak_bytes


def saved_tensor_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes the autograd graph of ``fn()`` keeps for the backward pass.

    Counts each tensor saved by a backward function once (by storage), parameters included;
    the memory that activation checkpointing saves shows up as a smaller count.
    """
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in bytes (shared tensors counted once)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
