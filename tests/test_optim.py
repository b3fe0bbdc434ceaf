"""utils.optim against PyTorch's own AdamW and learning-rate schedulers.

Tolerances: float32 ``atol=1e-6`` where two computations do the same float operations in a
different order.
"""

import pytest
import torch
import torch.nn.functional as F
from test_training import TINY_GPT, mlp, regression_batches
from torch import nn

from utils.optim import AdamW, configure_adamw, lr_at, parameter_groups
from utils.training import TrainConfig
from utils.transformer import GPT


def test_adamw_matches_torch_step_for_step():
    ours_model, torch_model = mlp(), mlp()
    settings = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ours = AdamW(parameter_groups(ours_model, 0.1), **settings)
    reference = torch.optim.AdamW(parameter_groups(torch_model, 0.1), **settings)
    batches = regression_batches()
    for _ in range(20):
        x, y = batches()
        for model, optimizer in ((ours_model, ours), (torch_model, reference)):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        for p, q in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_adamw_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="betas"):
        AdamW(mlp().parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(mlp().parameters(), lr=-1.0)


def test_parameter_groups_decay_matrices_only_and_count_tied_weights_once():
    model = GPT(TINY_GPT)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    # wte is tied to lm_head: model.parameters() already yields it once
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_params
    names = {id(p): n for n, p in model.named_parameters()}
    assert names[id(model.wte.weight)] in [names[id(p)] for p in decay["params"]]
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n or "ln_f" in n
    }
    optimizer = configure_adamw(model, 1e-3, 0.1)
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        len(decay["params"]),
        len(no_decay["params"]),
    ]


def _torch_schedule(make_decay, warmup: int, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup, 1.0, total_iters=warmup - 1)
    decay = make_decay(optimizer)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, decay], [warmup])
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_cosine_matches_torch_schedulers():
    lr, min_lr, warmup, max_iters = 1e-3, 1e-4, 10, 60

    def cosine(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_iters - warmup, min_lr)

    expected = _torch_schedule(cosine, warmup, max_iters + 1, lr)
    ours = [
        lr_at(s, lr=lr, min_lr=min_lr, warmup_iters=warmup, max_iters=max_iters)
        for s in range(max_iters + 1)
    ]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(expected), rtol=1e-5, atol=0)
    assert ours[warmup - 1] == lr and ours[max_iters] == pytest.approx(min_lr)


def test_warmup_linear_matches_torch_schedulers():
    lr, min_lr, warmup, max_iters = 2e-3, 2e-4, 5, 40

    def linear(opt):
        return torch.optim.lr_scheduler.LinearLR(opt, 1.0, min_lr / lr, max_iters - warmup)

    expected = _torch_schedule(linear, warmup, max_iters + 5, lr)
    ours = [
        lr_at(s, lr=lr, min_lr=min_lr, warmup_iters=warmup, max_iters=max_iters, schedule="linear")
        for s in range(max_iters + 5)
    ]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(expected), rtol=1e-5, atol=0)


def test_constant_schedule_and_bad_arguments():
    assert lr_at(50, lr=0.1, max_iters=100, warmup_iters=10, schedule="constant") == 0.1
    assert lr_at(4, lr=0.1, max_iters=100, warmup_iters=10) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, lr=0.1, max_iters=10, schedule="step")
    with pytest.raises(ValueError, match="warmup_iters"):
        lr_at(0, lr=0.1, max_iters=10, warmup_iters=20)
    with pytest.raises(ValueError, match="warmup_iters"):
        TrainConfig(max_iters=10, warmup_iters=20)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="int8")
