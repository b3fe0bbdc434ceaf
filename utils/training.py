"""The course's training loop and what it is made of.

- :class:`Trainer`: gradient accumulation, gradient clipping, gradient noise (Neelakantan et
  al. 2015), mixed precision (bfloat16 autocast on CPU, float16 with a gradient scaler on
  CUDA; Micikevicius et al. 2018), optional gradient checkpointing (Chen et al. 2016),
  periodic evaluation on fixed batches (:func:`evaluate_loss`), a ``tqdm`` bar, a
  :class:`History` of losses, learning rates and gradient norms, and checkpoints (loaded with
  ``weights_only=True``) from which a run continues with exactly the losses of an
  uninterrupted one.
- Batches for language models: :class:`RandomWindows` (training batches with their own
  random generator) and :func:`sequential_windows` (fixed evaluation batches).

The optimizer and schedules are in :mod:`utils.optim`, activation-memory measurement in
:mod:`utils.memory`, the character tokenizer in :mod:`utils.tokenization` and the course's
character-level GPT (data, save, load) in :mod:`utils.pretrained`.

Shape letters: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from utils.objectives import IGNORE_INDEX
from utils.optim import configure_adamw, lr_at

Batch = tuple[Tensor, Tensor]

# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each repeated block in the backward pass instead of storing its activations
    (Chen et al. 2016): every element of every ``nn.ModuleList`` in ``model`` (for the course's
    models, the Transformer blocks) keeps only its input. Parameter names do not change."""
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            if getattr(block, "_checkpointed", False):
                continue
            forward = block.forward

            def checkpointed_forward(*args, _forward=forward, **kwargs):
                if not torch.is_grad_enabled():
                    return _forward(*args, **kwargs)
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            block.forward = checkpointed_forward
            block._checkpointed = True


# ---------------------------------------------------------------------------------------------
# Data for language models
# ---------------------------------------------------------------------------------------------


def _check_tokens(tokens: Tensor, block_size: int) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a 1-D integer tensor, got {shape}")
    if len(tokens) <= block_size:
        raise ValueError(f"need more than block_size={block_size} tokens, got {len(tokens)}")


class RandomWindows:
    """Training batches: ``B`` random windows of a token stream; ``x`` (B, T) and the next
    tokens ``y`` (B, T). Draws from its own generator, saved in checkpoints."""

    def __init__(self, tokens: Tensor, block_size: int, batch_size: int, seed: int = 0) -> None:
        _check_tokens(tokens, block_size)
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(block_size)

    def __call__(self) -> Batch:
        starts = torch.randint(
            len(self.tokens) - self.block_size, (self.batch_size, 1), generator=self.generator
        )
        index = starts + self.offsets  # (B, T)
        return self.tokens[index], self.tokens[index + 1]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def sequential_windows(
    tokens: Tensor, block_size: int, batch_size: int, max_batches: int | None = None
) -> list[Batch]:
    """Fixed evaluation batches: consecutive non-overlapping windows from the start of
    ``tokens``, ``batch_size`` per batch (the last batch may be smaller); ``x``, ``y`` (B, T).
    Every evaluation then scores exactly the same tokens."""
    _check_tokens(tokens, block_size)
    count = (len(tokens) - 1) // block_size
    x = tokens[: count * block_size].view(count, block_size)
    y = tokens[1 : count * block_size + 1].view(count, block_size)
    batches = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
    return batches[:max_batches]


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    """Everything the training loop does, in one place."""

    max_iters: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # end of the decay
    warmup_iters: int = 100
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    fused: bool = False  # fused AdamW kernel
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_noise: float = 0.0  # eta: add N(0, eta / (1 + t)^0.55) to gradients
    label_smoothing: float = 0.0  # training loss only; evaluation is plain cross-entropy
    precision: str = "float32"  # float32 | bfloat16 | float16 (autocast)
    gradient_checkpointing: bool = False
    eval_interval: int = 100  # evaluate every this many steps (and after the last); 0: end only
    seed: int = 0
    progress: bool = True  # tqdm bar (turn off in notebooks)

    def __post_init__(self) -> None:
        if self.max_iters < 1 or self.grad_accum_steps < 1 or self.eval_interval < 0:
            raise ValueError(
                "need max_iters >= 1, grad_accum_steps >= 1, eval_interval >= 0, got "
                f"{self.max_iters}, {self.grad_accum_steps}, {self.eval_interval}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if not 0.0 <= self.label_smoothing < 1.0 or self.grad_noise < 0:
            raise ValueError(
                "label_smoothing must be in [0, 1) and grad_noise >= 0, got "
                f"{self.label_smoothing}, {self.grad_noise}"
            )
        # the schedule's own checks: known schedule, 0 <= warmup_iters <= max_iters
        lr_at(0, lr=self.lr, max_iters=self.max_iters, warmup_iters=self.warmup_iters,
              schedule=self.schedule)  # fmt: skip


@dataclass
class History:
    """What happened during training, for plots: one entry per optimizer step (``step``,
    ``train_loss``, ``lr``, ``grad_norm`` before clipping) and per evaluation (``eval_step``,
    ``eval_time`` seconds of training so far, and one list of losses per evaluation set)."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_time: list[float] = field(default_factory=list)
    eval_loss: dict[str, list[float]] = field(default_factory=dict)


def cross_entropy_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of logits (B, T, V) (or (N, V)) against targets (B, T) (or (N,)),
    computed in float32 whatever the autocast dtype."""
    return F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), label_smoothing=label_smoothing
    )


def target_count(y: Tensor) -> int:
    """The number of targets in ``y``: every entry, less integer labels equal to IGNORE_INDEX."""
    if y.is_floating_point():
        return y.numel()
    return int((y != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Sequence[Batch],
    batch_loss: Callable[[Batch], Tensor] | None = None,
) -> float:
    """Mean loss over all the targets of fixed ``(x, y)`` batches: each batch's mean loss
    weighted by its number of targets: the entries of ``y``, less those of integer labels equal
    to ``IGNORE_INDEX`` (e.g. the prompt positions of SFT); batches with none are skipped. The
    model is put in eval mode and then back in its mode.

    ``batch_loss(batch)`` gives a batch's mean loss; default: :func:`cross_entropy_loss` of
    ``model(x)`` (B, T, V) against ``y`` (B, T).
    """
    if batch_loss is None:

        def batch_loss(batch: Batch) -> Tensor:
            return cross_entropy_loss(model(batch[0]), batch[1])

    was_training = model.training
    model.eval()
    counts = [target_count(b[1]) for b in batches]
    total = sum(batch_loss(b).item() * n for b, n in zip(batches, counts, strict=True) if n)
    model.train(was_training)
    if not sum(counts):
        raise ValueError("the evaluation batches have no targets (every label is IGNORE_INDEX)")
    return total / sum(counts)


class Trainer:
    """Trains ``model`` on batches from ``train_batches()`` as ``config`` says.

    Args:
        model: maps a batch's inputs ``x`` to outputs (e.g. (B, T) ids -> (B, T, V) logits).
        config: :class:`TrainConfig`.
        train_batches: called once per micro-batch, returns ``(x, y)``; if it has
            ``state_dict``/``load_state_dict`` (like :class:`RandomWindows`) its state is
            saved in checkpoints.
        eval_sets: name -> fixed list of ``(x, y)`` batches (e.g. from
            :func:`sequential_windows`); the evaluation loss is the mean over all their
            targets (each batch's mean loss weighted by ``y.numel()``).
        loss_fn: ``loss_fn(outputs, y) -> scalar``; default :func:`cross_entropy_loss` with the
            config's label smoothing during training.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batches: Callable[[], Batch],
        eval_sets: dict[str, Sequence[Batch]] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if loss_fn is not None and config.label_smoothing > 0:
            raise ValueError("label_smoothing applies to the default loss only (loss_fn=None)")
        torch.manual_seed(config.seed)  # dropout and gradient noise
        self.model, self.config = model, config
        self.train_batches, self.eval_sets = train_batches, eval_sets or {}
        self.loss_fn = loss_fn
        self.device = next(model.parameters()).device
        self.optimizer = configure_adamw(
            model, config.lr, config.weight_decay, config.betas, config.eps, config.fused
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "float16")
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.step = 0
        self.elapsed = 0.0  # seconds spent in fit(), carried over by checkpoints
        self.history = History()

    # -- one step ------------------------------------------------------------------------

    def autocast(self):
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def loss(self, batch: Batch, training: bool = True) -> Tensor:
        """Loss of one ``(x, y)`` batch, under autocast."""
        x, y = (t.to(self.device) for t in batch)
        with self.autocast():
            outputs = self.model(x)
        if self.loss_fn is not None:
            return self.loss_fn(outputs, y)
        return cross_entropy_loss(outputs, y, self.config.label_smoothing if training else 0.0)

    def lr(self, step: int) -> float:
        c = self.config
        return lr_at(
            step, lr=c.lr, max_iters=c.max_iters, warmup_iters=c.warmup_iters, min_lr=c.min_lr,
            schedule=c.schedule,
        )  # fmt: skip

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean
        training loss and the global gradient norm before clipping."""
        c, parameters = self.config, [p for g in self.optimizer.param_groups for p in g["params"]]
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = 0.0
        for _ in range(c.grad_accum_steps):
            loss = self.loss(self.train_batches()) / c.grad_accum_steps
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        max_norm = c.grad_clip if c.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()
        if c.grad_noise > 0:
            std = math.sqrt(c.grad_noise / (1 + self.step) ** 0.55)
            for p in parameters:
                if p.grad is not None:
                    p.grad.add_(torch.randn_like(p.grad), alpha=std)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.history.step.append(self.step)
        self.history.train_loss.append(total)
        self.history.lr.append(lr)
        self.history.grad_norm.append(grad_norm)
        self.step += 1
        return total, grad_norm

    def evaluate(self) -> dict[str, float]:
        """Mean loss on each evaluation set (plain cross-entropy for the default loss)."""
        return {
            name: evaluate_loss(self.model, batches, lambda b: self.loss(b, training=False))
            for name, batches in self.eval_sets.items()
        }

    # -- the loop ------------------------------------------------------------------------

    def fit(self, until: int | None = None) -> History:
        """Train from the current step to ``until`` (default ``config.max_iters``), evaluating
        every ``eval_interval`` steps and after the last step of the schedule."""
        c = self.config
        until = c.max_iters if until is None else until
        if not self.step <= until <= c.max_iters:
            raise ValueError(f"until must be in [{self.step}, {c.max_iters}], got {until}")
        start = time.perf_counter() - self.elapsed
        bar = tqdm(range(self.step, until), disable=not c.progress, desc="train", leave=False)
        for _ in bar:
            loss, _ = self.train_step()
            last = self.step == c.max_iters
            if self.eval_sets and (last or (c.eval_interval and self.step % c.eval_interval == 0)):
                losses = self.evaluate()
                self.history.eval_step.append(self.step)
                self.history.eval_time.append(time.perf_counter() - start)
                for name, value in losses.items():
                    self.history.eval_loss.setdefault(name, []).append(value)
            evals = {name: f"{v[-1]:.4f}" for name, v in self.history.eval_loss.items()}
            bar.set_postfix(loss=f"{loss:.4f}", **evals, refresh=False)
        bar.close()
        self.elapsed = time.perf_counter() - start
        return self.history

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: model, optimizer, scaler, step, history,
        random states (global and the batch sampler's)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "history": asdict(self.history),
            "rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if hasattr(self.train_batches, "state_dict"):
            state["batches"] = self.train_batches.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.history = History(**state["history"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if "batches" in state:
            self.train_batches.load_state_dict(state["batches"])

    def save_checkpoint(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a :meth:`save_checkpoint` file (tensors and plain Python types only:
        ``weights_only=True`` never runs code from the file)."""
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
