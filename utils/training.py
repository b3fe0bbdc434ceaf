"""The course's training loop and what it is made of.

- :class:`AdamW`: Adam with decoupled weight decay (Loshchilov and Hutter 2019), written out;
  it matches ``torch.optim.AdamW`` step for step. :func:`configure_adamw` builds PyTorch's
  AdamW with two parameter groups: matrices decay, biases and norm gains do not.
- :func:`lr_at`: linear warmup, then cosine or linear decay to ``min_lr`` (or constant).
- :class:`Trainer`: gradient accumulation, gradient clipping, gradient noise (Neelakantan et
  al. 2015), mixed precision (bfloat16 autocast on CPU, float16 with a gradient scaler on
  CUDA; Micikevicius et al. 2018), optional gradient checkpointing (Chen et al. 2016),
  periodic evaluation on fixed batches (:func:`evaluate_loss`), a ``tqdm`` bar, a
  :class:`History` of losses, learning rates and gradient norms, and checkpoints (loaded with
  ``weights_only=True``) from which a run continues with exactly the losses of an
  uninterrupted one.
- Data for language models: :class:`CharTokenizer`, :class:`RandomWindows` (training batches
  with their own random generator) and :func:`sequential_windows` (fixed evaluation batches).
- The course's character-level GPT on tiny Shakespeare: :func:`char_gpt_data`,
  :func:`save_char_gpt` and :func:`load_char_gpt` (the checkpoint later chapters load).

Shape letters: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from utils.transformer import GPT, GPTConfig

Batch = tuple[Tensor, Tensor]

# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """AdamW written out (Loshchilov and Hutter 2019), for teaching; same numbers as
    ``torch.optim.AdamW``. For each parameter p with gradient g, at step t:

        p <- p * (1 - lr * weight_decay)              decoupled weight decay
        m <- beta1 * m + (1 - beta1) * g              first moment (momentum)
        v <- beta2 * v + (1 - beta2) * g^2            second moment
        p <- p - lr * m_hat / (sqrt(v_hat) + eps),    m_hat = m / (1 - beta1^t),
                                                      v_hat = v / (1 - beta2^t)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps, weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denominator = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                p.addcdiv_(m, denominator, value=-group["lr"] / (1 - beta1**t))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: weight matrices and embeddings (dim >= 2) decay; biases and
    normalisation gains (dim < 2) do not. Tied parameters appear once."""
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def configure_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    fused: bool = False,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`parameter_groups` (``fused`` uses one fused kernel)."""
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None
    )


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(
    step: int,
    *,
    lr: float,
    max_iters: int,
    warmup_iters: int = 0,
    min_lr: float = 0.0,
    schedule: str = "cosine",
) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``lr * (step + 1) / warmup_iters`` for the first ``warmup_iters`` steps, reaching
    ``lr`` at step ``warmup_iters - 1``. Then ``cosine``: ``min_lr + (lr - min_lr) *
    (1 + cos(pi * p)) / 2``, or ``linear``: ``lr - (lr - min_lr) * p``, with ``p`` going from 0
    at step ``warmup_iters`` to 1 at step ``max_iters`` (``min_lr`` afterwards); ``constant``
    stays at ``lr``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0 <= warmup_iters <= max_iters:
        raise ValueError(f"need 0 <= warmup_iters <= max_iters, got {warmup_iters}, {max_iters}")
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr - (lr - min_lr) * progress


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing and activation memory
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


# ---------------------------------------------------------------------------------------------
# Data for language models
# ---------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character of a fixed alphabet (e.g. the 65 of tiny Shakespeare)."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """str -> (N,) int64 ids; ``ValueError`` for a character outside the alphabet."""
        unknown = set(text) - self.index.keys()
        if unknown:
            raise ValueError(f"text has characters outside the alphabet: {sorted(unknown)}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i] for i in ids)


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


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Sequence[Batch],
    batch_loss: Callable[[Batch], Tensor] | None = None,
) -> float:
    """Mean loss over all the targets of fixed ``(x, y)`` batches: each batch's mean loss
    weighted by ``y.numel()``. The model is put in eval mode and then back in its mode.

    ``batch_loss(batch)`` gives a batch's mean loss; default: :func:`cross_entropy_loss` of
    ``model(x)`` (B, T, V) against ``y`` (B, T).
    """
    if batch_loss is None:

        def batch_loss(batch: Batch) -> Tensor:
            return cross_entropy_loss(model(batch[0]), batch[1])

    was_training = model.training
    model.eval()
    total = sum(batch_loss(b).item() * b[1].numel() for b in batches)
    model.train(was_training)
    return total / sum(b[1].numel() for b in batches)


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


# ---------------------------------------------------------------------------------------------
# The course's character-level GPT on tiny Shakespeare
# ---------------------------------------------------------------------------------------------


def char_gpt_data(text: str, train_fraction: float = 0.9) -> tuple[CharTokenizer, Tensor, Tensor]:
    """Tokenizer and (train, val) id streams of ``text``: the first 90 % trains, the rest
    validates (nanoGPT's split of tiny Shakespeare)."""
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    split = int(train_fraction * len(ids))
    return tokenizer, ids[:split], ids[split:]


def save_char_gpt(path: str | Path, model: GPT, tokenizer: CharTokenizer, **info) -> None:
    """Write a safetensors file: weights, plus the config, alphabet and ``info`` as metadata."""
    metadata = {
        "config": json.dumps(asdict(model.config)),
        "chars": tokenizer.chars,
        "info": json.dumps(info),
    }
    safetensors.torch.save_model(model, str(path), metadata=metadata)


def load_char_gpt(path: str | Path) -> tuple[GPT, CharTokenizer, dict]:
    """The model (in eval mode), its tokenizer and the ``info`` saved by :func:`save_char_gpt`."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    model = GPT(GPTConfig(**json.loads(metadata["config"])))
    safetensors.torch.load_model(model, str(path))
    return model.eval(), CharTokenizer(metadata["chars"]), json.loads(metadata["info"])
