"""utils.model_parallel: 2 real processes (gloo on CPU) against one process, and the ZeRO
memory model against the numbers printed in Rajbhandari et al. (2020).

Tolerance for training comparisons: ``atol=2e-5``. Two processes average two half-batch
gradients where one process takes one mean over the whole batch: the same sum in another
order, so float32 rounding differs (~1e-7); Adam divides by sqrt(v), which amplifies these
differences for parameters with tiny gradients (the torchrun demo: 3e-6 after 20 steps; here,
with MKL's AVX2 branch that ``make test`` pins, one FSDP parameter of 48 is 1.3e-5 off after
10 steps, under 1e-5 with the default branch).
"""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.model_parallel import (
    ColumnParallelLinear,
    ParallelFeedForward,
    RowParallelLinear,
    launch,
    train_data_parallel,
    train_strategies,
    zero_memory_per_device,
)
from utils.training import RandomWindows, TrainConfig
from utils.transformer import GPT, FeedForward, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
ATOL = 2e-5  # see the docstring
CONFIG = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16)
TRAIN = TrainConfig(max_iters=10, lr=1e-2, warmup_iters=3, progress=False)


@pytest.fixture(scope="module")
def batches():
    tokens = torch.arange(2000) * 5 % 13  # a learnable sequence: 0 5 10 2 7 12 4 ...
    windows = RandomWindows(tokens, block_size=16, batch_size=6, seed=1)
    return [windows() for _ in range(TRAIN.max_iters)]


@pytest.fixture(scope="module")
def single(batches):
    return train_data_parallel(functools.partial(GPT, CONFIG), batches, TRAIN, "single")


@pytest.fixture(scope="module")
def two_processes(batches):
    """One launch of 2 processes trains with every strategy (process start-up is the cost)."""
    make_model = functools.partial(GPT, CONFIG)
    return launch(train_strategies, make_model, batches, TRAIN, world_size=2)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "fsdp"])
def test_two_processes_train_like_one(two_processes, single, strategy):
    for rank in range(2):
        result = two_processes[rank][strategy]
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(single["losses"]), atol=ATOL, rtol=0
        )
        for name, p in single["parameters"].items():
            torch.testing.assert_close(result["parameters"][name], p, atol=ATOL, rtol=0)
    assert single["losses"][-1] < single["losses"][0] - 0.5  # it did learn


def test_memory_per_rank_is_partitioned_as_zero_says(two_processes, single):
    n_params = sum(p.numel() for p in single["parameters"].values())
    assert single["parameter_numel"] == n_params
    assert single["optimizer_numel"] == 2 * n_params  # Adam: exp_avg and exp_avg_sq
    ranks = [two_processes[r] for r in range(2)]
    # DDP replicates everything
    assert all(r["ddp"]["optimizer_numel"] == 2 * n_params for r in ranks)
    # ZeRO-1: whole parameters' optimizer states are assigned to one rank each
    assert sum(r["zero1"]["optimizer_numel"] for r in ranks) == 2 * n_params
    assert all(r["zero1"]["parameter_numel"] == n_params for r in ranks)
    # FSDP (ZeRO-3): each parameter is cut along dim 0 into 2 shards (the last may be padded
    # in FSDP's buffers, but its local tensor holds only real elements)
    assert sum(r["fsdp"]["parameter_numel"] for r in ranks) == n_params
    assert sum(r["fsdp"]["optimizer_numel"] for r in ranks) == 2 * n_params
    assert all(r["fsdp"]["parameter_numel"] < 0.6 * n_params for r in ranks)


def tensor_parallel_worker(ffn: FeedForward, row: nn.Linear, x: torch.Tensor) -> dict:
    """Runs on each rank: the split layers' outputs and gradients."""
    rank = torch.distributed.get_rank()
    parallel = ParallelFeedForward(ffn)
    x_parallel = x.clone().requires_grad_()
    y = parallel(x_parallel)
    y.pow(2).sum().backward()
    column = ColumnParallelLinear.from_linear(ffn.fc_in, gather_output=True)
    return {
        "y": y.detach(),
        "x_grad": x_parallel.grad,
        "fc_in_grad": parallel.fc_in.linear.weight.grad,
        "fc_in_bias_grad": parallel.fc_in.linear.bias.grad,
        "fc_out_grad": parallel.fc_out.linear.weight.grad,
        "fc_out_bias_grad": parallel.fc_out.bias.grad,
        "column_gathered": column(x).detach(),
        "row": RowParallelLinear.from_linear(row)(x.chunk(2, dim=-1)[rank]).detach(),
    }


def test_tensor_parallel_layers_equal_the_whole_layers():
    torch.manual_seed(0)
    ffn = FeedForward(8, 32, activation="gelu")  # (gelu_tanh is a lambda: not picklable)
    row = nn.Linear(8, 5)
    x = torch.randn(3, 5, 8)
    results = launch(tensor_parallel_worker, ffn, row, x, world_size=2)

    reference_x = x.clone().requires_grad_()
    y = ffn(reference_x)
    y.pow(2).sum().backward()
    close = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=0)
    for rank, r in enumerate(results):
        close(r["y"], y.detach())
        close(r["x_grad"], reference_x.grad)
        hidden = slice(16 * rank, 16 * (rank + 1))  # this rank's hidden units
        close(r["fc_in_grad"], ffn.fc_in.weight.grad[hidden])
        close(r["fc_in_bias_grad"], ffn.fc_in.bias.grad[hidden])
        close(r["fc_out_grad"], ffn.fc_out.weight.grad[:, hidden])
        close(r["fc_out_bias_grad"], ffn.fc_out.bias.grad)
        close(r["column_gathered"], F.linear(x, ffn.fc_in.weight, ffn.fc_in.bias))
        close(r["row"], row(x).detach())


def test_parallel_layers_need_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        ColumnParallelLinear(4, 4)


def test_zero_memory_matches_the_papers_7_5b_example():
    # Rajbhandari et al. 2020, Figure 1: Psi = 7.5B parameters, N_d = 64, K = 12
    gigabytes = [zero_memory_per_device(7.5e9, 64, stage) / 1e9 for stage in range(4)]
    assert [round(g, 1) for g in gigabytes] == [120.0, 31.4, 16.6, 1.9]
    # closed forms: (2 + 2 + K) Psi, 4 Psi + K Psi / N, 2 Psi + 14 Psi / N, 16 Psi / N
    psi, n = 7.5e9, 64
    assert gigabytes[1] * 1e9 == pytest.approx(4 * psi + 12 * psi / n)
    assert gigabytes[2] * 1e9 == pytest.approx(2 * psi + 14 * psi / n)
    assert gigabytes[3] * 1e9 == pytest.approx(16 * psi / n)
    with pytest.raises(ValueError, match="stage"):
        zero_memory_per_device(1e9, 8, 4)
    with pytest.raises(ValueError, match="num_devices"):
        zero_memory_per_device(1e9, 0, 1)


def test_torchrun_demo_runs_and_agrees():
    """The command the chapter runs: torchrun starts 2 ranks of ``python -m
    utils.model_parallel``; every strategy must match the single process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.setdefault("COURSE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "utils.model_parallel"]  # fmt: skip
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.stdout.splitlines()
        if re.match(r"(single|ddp|zero1|fsdp) ", line)
    }
    assert set(rows) == {"single", "ddp", "zero1", "fsdp"}
    for strategy, (first, last, difference, *_) in rows.items():
        assert (first, last) == tuple(rows["single"][:2]), strategy
        assert float(difference) < 1e-5
    match = re.search(r"max \|output difference\| = (\S+)", out.stdout)
    assert match and float(match.group(1)) < 1e-6
