"""Training on several processes with PyTorch's own engine, ``torch.distributed``.

One process per device ("rank"); gloo on CPU, NCCL on GPU. What is split across ranks:

- data parallelism (:func:`train_data_parallel`, ``strategy="ddp"``): every rank holds the
  whole model, takes a slice of each batch, and ``DistributedDataParallel`` all-reduces
  (averages) the gradients, so every rank takes the same optimizer step as one process on
  the whole batch would;
- ZeRO (Rajbhandari et al. 2020): ``strategy="zero1"`` partitions the optimizer state
  (``ZeroRedundancyOptimizer``, stage 1); ``strategy="fsdp"`` shards parameters, gradients
  and optimizer state (FSDP2's ``fully_shard``, stage 3; it runs on CPU with gloo);
  :func:`zero_memory_per_device` is the paper's memory model for stages 0-3;
- tensor parallelism (Shoeybi et al. 2019, Megatron-LM): :class:`ColumnParallelLinear` splits
  a layer's output features across ranks, :class:`RowParallelLinear` its input features;
  together (:class:`ParallelFeedForward`) an MLP needs one all-reduce forward and one backward.

:func:`launch` starts ``world_size`` local processes (``torch.multiprocessing``) for tests
and notebooks; ``torchrun --standalone --nproc_per_node 2 -m utils.model_parallel`` runs the
demo in :func:`main` the way real jobs are launched.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from utils.optim import parameter_groups
from utils.training import Batch, TrainConfig, Trainer
from utils.transformer import FeedForward

# ---------------------------------------------------------------------------------------------
# Starting processes
# ---------------------------------------------------------------------------------------------


def find_free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, results_dir) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, Path(results_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, *args, world_size: int = 2, backend: str = "gloo") -> list:
    """Run ``fn(*args)`` in ``world_size`` new processes joined in a process group (on a free
    port) and return each rank's result, in rank order. ``fn`` must be importable (defined in
    a module, not a notebook) and return tensors / plain Python types."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory() as results_dir:
        mp.spawn(
            _worker,
            args=(world_size, find_free_port(), backend, fn, args, results_dir),
            nprocs=world_size,
        )
        return [
            torch.load(Path(results_dir) / f"rank{r}.pt", weights_only=True)
            for r in range(world_size)
        ]


# ---------------------------------------------------------------------------------------------
# Data parallelism and ZeRO
# ---------------------------------------------------------------------------------------------

STRATEGIES = ("single", "ddp", "zero1", "fsdp")


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 (ZeRO stage 3): shard each repeated block (every element of every
    ``nn.ModuleList``) and then the rest of the model across the ranks, in place."""
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)
    return model


def full_parameters(model: nn.Module) -> dict[str, Tensor]:
    """name -> the whole parameter (gathering FSDP shards; call on every rank)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def local_numel(tensors) -> int:
    """Number of elements this rank stores (the local shard of a DTensor)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)


def _slice_batches(batches: Sequence[Batch], rank: int, world_size: int) -> Callable[[], Batch]:
    """A ``train_batches`` function that yields this rank's slice of each global batch."""
    stream = iter(batches)

    def next_slice() -> Batch:
        x, y = next(stream)
        return x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]

    return next_slice


def train_data_parallel(
    make_model: Callable[[], nn.Module],
    batches: Sequence[Batch],
    config: TrainConfig,
    strategy: str = "ddp",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict:
    """Train ``make_model()`` with the course :class:`~utils.training.Trainer` on ``batches``
    (one global batch per step, ``config.max_iters`` of them), split across the ranks of the
    current process group as ``strategy`` says; ``"single"`` trains on whole batches in this
    process (the reference). The random generator is seeded with ``config.seed`` before
    ``make_model()``, so every rank starts from the same weights. The global batch must
    split evenly across ranks for the losses to be the single-process ones.

    Returns a dict of plain types (so it can be saved): ``losses``, the global batch loss per
    step (mean over the ranks' slices); ``parameters``, the full parameters after training;
    ``parameter_numel`` and ``optimizer_numel``, the parameter and optimizer-state elements
    stored on this rank.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if len(batches) < config.max_iters * config.grad_accum_steps:
        raise ValueError(f"need {config.max_iters} batches, got {len(batches)}")
    distributed = strategy != "single"
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(config.seed)  # the same initial model on every rank
    model = make_model()
    if strategy == "fsdp":
        shard_model(model)
    wrapped = DistributedDataParallel(model) if strategy in ("ddp", "zero1") else model
    trainer = Trainer(wrapped, config, _slice_batches(batches, rank, world_size), loss_fn=loss_fn)
    if strategy == "zero1":  # the same two parameter groups, each rank updating a part
        groups = parameter_groups(model, config.weight_decay)
        adam = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
        trainer.optimizer = ZeroRedundancyOptimizer(groups, torch.optim.AdamW, **adam)
    history = trainer.fit()
    losses = torch.tensor(history.train_loss, dtype=torch.float64)
    if distributed:
        dist.all_reduce(losses)
    if strategy == "zero1":
        states = trainer.optimizer.optim.state.values()  # this rank's partition
    else:
        states = trainer.optimizer.state.values()
    return {
        "losses": (losses / world_size).tolist(),
        "parameters": full_parameters(model),
        "parameter_numel": local_numel(model.parameters()),
        "optimizer_numel": local_numel(t for s in states for t in s.values() if t.dim() > 0),
    }


def train_strategies(
    make_model: Callable[[], nn.Module],
    batches: Sequence[Batch],
    config: TrainConfig,
    strategies: Sequence[str] = ("ddp", "zero1", "fsdp"),
) -> dict[str, dict]:
    """:func:`train_data_parallel` with each strategy in turn: strategy -> result."""
    return {s: train_data_parallel(make_model, batches, config, s) for s in strategies}


# ---------------------------------------------------------------------------------------------
# ZeRO memory model
# ---------------------------------------------------------------------------------------------

ZERO_STAGES = {
    0: "data parallel (nothing partitioned)",
    1: "optimizer states partitioned",
    2: "optimizer states + gradients partitioned",
    3: "optimizer states + gradients + parameters partitioned",
}


def zero_memory_per_device(
    num_params: float,
    num_devices: int,
    stage: int,
    *,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    optimizer_bytes: int = 12,
) -> float:
    """Bytes of model states per device (Rajbhandari et al. 2020, section 3.1 and Figure 1).

    Mixed-precision Adam keeps, per parameter: 2 bytes of float16 weights, 2 of float16
    gradients and K = 12 of optimizer state (float32 master weights, momentum, variance).
    Stage 1 divides the K part by the number of devices N_d, stage 2 also the gradients,
    stage 3 also the weights. Activations and buffers are not included.
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {list(ZERO_STAGES)}, got {stage}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    partitioned = {0: (), 1: ("o",), 2: ("o", "g"), 3: ("o", "g", "p")}[stage]
    per_param = sum(
        size / num_devices if part in partitioned else size
        for part, size in (("p", param_bytes), ("g", grad_bytes), ("o", optimizer_bytes))
    )
    return num_params * per_param


# ---------------------------------------------------------------------------------------------
# Tensor parallelism (Megatron-LM)
# ---------------------------------------------------------------------------------------------


class _CopyToParallel(torch.autograd.Function):
    """Megatron's f: identity forward; all-reduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's g: all-reduce (sum) forward; identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _GatherFromParallel(torch.autograd.Function):
    """All-gather along the last dimension forward; keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.chunk(dist.get_world_size(), dim=-1)[dist.get_rank()].contiguous()


def _rank_and_size() -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("tensor-parallel layers need an initialised process group")
    return dist.get_rank(), dist.get_world_size()


def _check_divisible(name: str, features: int, world_size: int) -> None:
    if features % world_size:
        raise ValueError(f"{name}={features} is not divisible by world_size={world_size}")


class ColumnParallelLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` with the output features split across ranks:
    this rank holds rows ``rank * out/N : (rank + 1) * out/N`` of the weight (and bias).

    (..., in) -> (..., out/N), or (..., out) with ``gather_output=True``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False
    ) -> None:
        super().__init__()
        self.rank, self.world_size = _rank_and_size()
        _check_divisible("out_features", out_features, self.world_size)
        self.gather_output = gather_output
        self.linear = nn.Linear(in_features, out_features // self.world_size, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gather_output: bool = False) -> ColumnParallelLinear:
        """This rank's shard of an existing (identical on every rank) ``nn.Linear``."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output)
        with torch.no_grad():
            layer.linear.weight.copy_(linear.weight.chunk(layer.world_size, dim=0)[layer.rank])
            if linear.bias is not None:
                layer.linear.bias.copy_(linear.bias.chunk(layer.world_size)[layer.rank])
        return layer

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(_CopyToParallel.apply(x))
        return _GatherFromParallel.apply(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` with the input features split across ranks:
    this rank holds columns ``rank * in/N : (rank + 1) * in/N`` of the weight; partial
    products are summed by an all-reduce, then the (whole, replicated) bias is added.

    (..., in/N) this rank's slice of the input -> (..., out), the same on every rank.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.rank, self.world_size = _rank_and_size()
        _check_divisible("in_features", in_features, self.world_size)
        self.linear = nn.Linear(in_features // self.world_size, out_features, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> RowParallelLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        with torch.no_grad():
            layer.linear.weight.copy_(linear.weight.chunk(layer.world_size, dim=1)[layer.rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x_parallel: Tensor) -> Tensor:
        y = _ReduceFromParallel.apply(self.linear(x_parallel))
        return y if self.bias is None else y + self.bias


class ParallelFeedForward(nn.Module):
    """A :class:`~utils.transformer.FeedForward` (plain, not gated) split Megatron-style:
    ``fc_in`` column-parallel, the activation on each rank's slice of the hidden units,
    ``fc_out`` row-parallel. (B, T, E) -> (B, T, E), equal to the unsplit layer."""

    def __init__(self, ffn: FeedForward) -> None:
        super().__init__()
        if ffn.fc_gate is not None:
            raise ValueError("ParallelFeedForward supports plain (non-gated) FeedForward only")
        self.act = ffn.act
        self.fc_in = ColumnParallelLinear.from_linear(ffn.fc_in)
        self.fc_out = RowParallelLinear.from_linear(ffn.fc_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


# ---------------------------------------------------------------------------------------------
# The demo: torchrun --standalone --nproc_per_node 2 -m utils.model_parallel
# ---------------------------------------------------------------------------------------------


def _demo_model() -> nn.Module:
    from utils.transformer import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))


def _demo_batches(steps: int, batch_size: int = 8) -> list[Batch]:
    from utils.data import load_tinyshakespeare
    from utils.pretrained import char_gpt_data
    from utils.training import RandomWindows

    _, train, _ = char_gpt_data(load_tinyshakespeare())
    windows = RandomWindows(train, block_size=32, batch_size=batch_size, seed=0)
    return [windows() for _ in range(steps)]


def _max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def main() -> None:
    """Train a small char-level GPT for 20 steps with each strategy on the ranks started by
    ``torchrun`` and compare with one process; then check a tensor-parallel MLP."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = TrainConfig(max_iters=20, lr=3e-3, warmup_iters=5, progress=False)
    results = train_strategies(_demo_model, _demo_batches(config.max_iters), config, STRATEGIES)
    if rank == 0:
        print(f"{world_size} processes, backend {dist.get_backend()}")
        header = ("strategy", "loss@1", "loss@20", "max |dparam|", "params/rank", "opt state/rank")
        print("{:<8} {:>8} {:>8} {:>13} {:>12} {:>15}".format(*header))
        for strategy, result in results.items():
            difference = _max_difference(result["parameters"], results["single"]["parameters"])
            first, last = result["losses"][0], result["losses"][-1]
            numels = f"{result['parameter_numel']:12,} {result['optimizer_numel']:15,}"
            print(f"{strategy:<8} {first:8.4f} {last:8.4f} {difference:13.1e} {numels}")

    torch.manual_seed(0)
    ffn = _demo_model().blocks[0].ffn
    x = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(0))
    difference = (ParallelFeedForward(ffn)(x) - ffn(x)).abs().max().item()
    if rank == 0:
        split = f"tensor-parallel MLP, hidden units split {world_size} ways"
        print(f"{split}: max |output difference| = {difference:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
