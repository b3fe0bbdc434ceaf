"""utils.training against PyTorch's own optimizer, schedulers, losses and closed forms.

Tolerances: float32 ``atol=1e-6`` where two computations do the same float operations in a
different order; exact equality (``rtol=atol=0``) where they must be bit-identical (resume).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.memory import saved_tensor_bytes
from utils.objectives import IGNORE_INDEX
from utils.optim import parameter_groups
from utils.training import (
    RandomWindows,
    TrainConfig,
    Trainer,
    cross_entropy_loss,
    enable_gradient_checkpointing,
    evaluate_loss,
    sequential_windows,
)
from utils.transformer import GPT, GPTConfig

TINY_GPT = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def regression_batches(batch_size: int = 8, seed: int = 0):
    """Consecutive (x (B, 4), y (B, 2)) batches of a fixed data set (a linear map + noise),
    cycling through it: batches of 32 hold the same examples as four batches of 8."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=generator)
    y = x @ torch.randn(4, 2, generator=generator) + 0.1 * torch.randn(256, 2, generator=generator)
    position = 0

    def next_batch():
        nonlocal position
        index = torch.arange(position, position + batch_size) % len(x)
        position += batch_size
        return x[index], y[index]

    return next_batch


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2))


def quiet(**kwargs) -> TrainConfig:
    return TrainConfig(progress=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch():
    big, accumulated = mlp(), mlp()
    settings = dict(max_iters=5, warmup_iters=2, lr=1e-2, grad_clip=None)
    Trainer(big, quiet(**settings), regression_batches(32), loss_fn=F.mse_loss).fit()
    config = quiet(grad_accum_steps=4, **settings)
    trainer = Trainer(accumulated, config, regression_batches(8), loss_fn=F.mse_loss)
    trainer.fit()
    for p, q in zip(big.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_clipping_records_the_norm_and_scales_the_gradient():
    model, reference = mlp(), mlp()
    config = quiet(max_iters=3, warmup_iters=0, lr=1e-2, grad_clip=0.05, schedule="constant")
    trainer = Trainer(model, config, regression_batches(), loss_fn=F.mse_loss)
    optimizer = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.99))
    batches = regression_batches()
    for _ in range(3):
        trainer.train_step()
        x, y = batches()
        F.mse_loss(reference(x), y).backward()
        grads = [p.grad for p in reference.parameters()]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        assert trainer.history.grad_norm[-1] == pytest.approx(norm, rel=1e-5)
        for g in grads:
            g.mul_(min(1.0, 0.05 / norm))
        optimizer.step()
        optimizer.zero_grad()
    assert max(trainer.history.grad_norm) > 0.05  # clipping was active
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_gradient_noise_has_the_annealed_standard_deviation():
    model = nn.Linear(300, 300)
    eta, seen = 0.3, []
    config = quiet(max_iters=3, warmup_iters=0, grad_clip=None, grad_noise=eta)
    # a loss with exactly zero gradient: what reaches the optimizer is the noise alone
    trainer = Trainer(model, config, lambda: (torch.zeros(1, 300),) * 2, loss_fn=zero_loss)
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: seen.append(model.weight.grad.std()))
    trainer.fit()
    for step, std in enumerate(seen):
        assert std.item() == pytest.approx(math.sqrt(eta / (1 + step) ** 0.55), rel=0.01)


def zero_loss(outputs, _):
    return (outputs * 0.0).sum()


def test_label_smoothing_in_training_loss_only():
    model = GPT(TINY_GPT)
    tokens = torch.randint(11, (200,), generator=torch.Generator().manual_seed(1))
    batch = RandomWindows(tokens, 8, 4)()
    trainer = Trainer(model, quiet(label_smoothing=0.1), lambda: batch)
    logits = model(batch[0])
    expected = F.cross_entropy(logits.reshape(-1, 11), batch[1].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(trainer.loss(batch), expected, atol=1e-6, rtol=0)
    plain = F.cross_entropy(logits.reshape(-1, 11), batch[1].reshape(-1))
    torch.testing.assert_close(trainer.loss(batch, training=False), plain, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        Trainer(model, quiet(label_smoothing=0.1), lambda: batch, loss_fn=F.mse_loss)


def test_evaluate_is_the_mean_over_all_targets():
    model = GPT(TINY_GPT).eval()
    tokens = torch.randint(11, (101,), generator=torch.Generator().manual_seed(2))
    batches = sequential_windows(tokens, 8, 5)  # 12 windows: batches of 5, 5 and 2
    assert [len(x) for x, _ in batches] == [5, 5, 2]
    trainer = Trainer(model, quiet(), lambda: batches[0], eval_sets={"val": batches})
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    expected = F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1)).item()
    assert trainer.evaluate()["val"] == pytest.approx(expected, abs=1e-6)
    model.train()
    assert evaluate_loss(model, batches) == pytest.approx(expected, abs=1e-6)
    assert model.training  # the mode is restored


def test_evaluate_counts_only_the_targets_that_are_not_ignored():
    model = GPT(TINY_GPT).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(11, (6, 8), generator=g)
    y = torch.randint(11, (6, 8), generator=g)
    y[:2, :6] = IGNORE_INDEX  # the first batch keeps 2 + 2 targets of 16, the second all 16
    y[2:4, :] = IGNORE_INDEX  # and the third none: it must not count
    batches = [(x[:2], y[:2]), (x[4:], y[4:]), (x[2:4], y[2:4])]
    expected = F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1), ignore_index=IGNORE_INDEX)
    assert evaluate_loss(model, batches) == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError, match="no targets"):
        evaluate_loss(model, [batches[2]])


# ---------------------------------------------------------------------------------------------
# Mixed precision and gradient checkpointing
# ---------------------------------------------------------------------------------------------


def lm_trainer(precision: str = "float32", **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = GPT(TINY_GPT)
    tokens = torch.randint(11, (500,), generator=torch.Generator().manual_seed(3))
    config = quiet(max_iters=6, warmup_iters=2, precision=precision, eval_interval=3, **kwargs)
    val = sequential_windows(tokens[400:], 8, 4)
    return Trainer(model, config, RandomWindows(tokens[:400], 8, 4), {"val": val})


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_autocast_training_follows_float32(precision):
    full, mixed = lm_trainer(), lm_trainer(precision)
    half_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    with mixed.autocast():
        assert mixed.model(torch.zeros(1, 8, dtype=torch.long)).dtype == half_dtype
    assert mixed.scaler.is_enabled() == (precision == "float16")
    full.fit(), mixed.fit()
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9): losses agree to ~1e-2
    torch.testing.assert_close(
        torch.tensor(mixed.history.train_loss), torch.tensor(full.history.train_loss), atol=2e-2,
        rtol=0,
    )  # fmt: skip
    for p in mixed.model.parameters():
        assert p.dtype == torch.float32  # autocast keeps float32 master weights


def test_gradient_checkpointing_same_gradients_less_saved_memory():
    torch.manual_seed(0)
    plain = GPT(TINY_GPT)
    checkpointed = GPT(TINY_GPT)
    checkpointed.load_state_dict(plain.state_dict())
    keys = list(checkpointed.state_dict())
    enable_gradient_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == keys
    x = torch.randint(11, (3, 8), generator=torch.Generator().manual_seed(0))

    def loss_of(model):
        return lambda: model(x).logsumexp(-1).mean()

    for model in (plain, checkpointed):
        loss_of(model)().backward()
    for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0)
    assert saved_tensor_bytes(loss_of(checkpointed)) < 0.5 * saved_tensor_bytes(loss_of(plain))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_resumed_run_has_exactly_the_uninterrupted_losses(tmp_path):
    settings = dict(grad_noise=0.01)  # uses the global random state: it must be restored too
    uninterrupted = lm_trainer(**settings)
    uninterrupted.model.drop.p = 0.1  # dropout draws random numbers as well
    uninterrupted.fit()

    first = lm_trainer(**settings)
    first.model.drop.p = 0.1
    first.fit(until=4)
    first.save_checkpoint(tmp_path / "run.pt")
    torch.manual_seed(123)  # disturb the global random state before resuming

    resumed = lm_trainer(**settings)
    resumed.model.drop.p = 0.1
    resumed.load_checkpoint(tmp_path / "run.pt")
    assert resumed.step == 4
    resumed.fit()
    a, b = uninterrupted.history, resumed.history
    assert b.step == a.step == list(range(6))
    assert b.train_loss == a.train_loss and b.grad_norm == a.grad_norm and b.lr == a.lr
    assert b.eval_step == a.eval_step == [3, 6] and b.eval_loss == a.eval_loss
    for p, q in zip(uninterrupted.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_checkpoint_loads_with_weights_only(tmp_path):
    trainer = lm_trainer()
    trainer.fit(until=2)
    trainer.save_checkpoint(tmp_path / "run.pt")
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    assert state["step"] == 2 and len(state["history"]["train_loss"]) == 2


def test_fit_rejects_steps_outside_the_schedule():
    trainer = lm_trainer()
    with pytest.raises(ValueError, match="until"):
        trainer.fit(until=7)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_random_windows_are_shifted_and_reproducible():
    tokens = torch.arange(100)
    batches = RandomWindows(tokens, block_size=10, batch_size=6, seed=5)
    state = batches.state_dict()
    x, y = batches()
    assert x.shape == y.shape == (6, 10)
    torch.testing.assert_close(y, x + 1)  # token i + 1 follows token i in arange
    torch.testing.assert_close(x[:, 1:], x[:, :-1] + 1)
    assert int(x.max()) <= 98
    batches.load_state_dict(state)
    torch.testing.assert_close(batches()[0], x)
    with pytest.raises(ValueError, match="block_size"):
        RandomWindows(torch.arange(5), block_size=10, batch_size=2)


def test_sequential_windows_cover_the_stream_in_order():
    batches = sequential_windows(torch.arange(50), block_size=8, batch_size=4)
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(x.flatten(), torch.arange(48))
    torch.testing.assert_close(torch.cat([b[1] for b in batches]).flatten(), torch.arange(1, 49))
    assert len(sequential_windows(torch.arange(50), 8, 4, max_batches=1)) == 1


def test_cross_entropy_loss_matches_torch_for_bfloat16_logits():
    logits = torch.randn(2, 3, 7).bfloat16()
    targets = torch.randint(7, (2, 3))
    expected = F.cross_entropy(logits.float().reshape(6, 7), targets.reshape(6))
    torch.testing.assert_close(cross_entropy_loss(logits, targets), expected, atol=1e-6, rtol=0)
