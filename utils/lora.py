"""LoRA: low-rank adaptation of linear layers (Hu et al. 2021).

A frozen linear layer ``W`` (out x in) gets a trainable low-rank update ``B A`` of rank ``r``:

    h = W x + b + (alpha / r) * B A dropout(x),    A: (r, in), B: (out, r)

``A`` starts Kaiming-uniform and ``B`` at zero, so the wrapped model computes exactly what the
base model computes until the first optimizer step. Only ``A`` and ``B`` (and any parameters
named in ``trainable``, e.g. a task head) are trained: ``r (in + out)`` numbers per layer
instead of ``in * out``. After training, ``W + (alpha / r) B A`` can be merged into one plain
linear layer, so inference costs nothing extra.

- :class:`LoRALinear`: the wrapper (``merge``/``unmerge``).
- :func:`apply_lora`: wrap the linear layers whose names end with given suffixes
  (``peft``'s ``target_modules`` rule) in any course or Hugging Face model; freeze the rest.
- :func:`trainable_parameters`, :func:`lora_state_dict`, :func:`save_adapter`,
  :func:`load_adapter` (safetensors, the configuration in the file's metadata),
  :func:`merge_lora`.

Shape letters: B batch, T sequence length, E model dim.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """``base(x) + dropout(x) @ A.T @ B.T * alpha / rank`` around a frozen ``nn.Linear``.

    Args:
        base: the linear layer to adapt (its parameters are frozen here).
        rank: r, the rank of the update, >= 1.
        alpha: the update is scaled by ``alpha / rank`` (so changing r keeps the step size).
        dropout: dropout on the input of the low-rank path (training only).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        _check_hyperparameters(rank, alpha, dropout)
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        self.lora_A = nn.Parameter(weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft
        self.merged = False
        base.requires_grad_(False)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (merged or not), for code that reads ``layer.weight``."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta_weight(self) -> Tensor:
        """The update ``(alpha / r) B A`` (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        out = self.base(x)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (``W <- W + (alpha / r) B A``)."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again: ``W`` comes back up to float rounding."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _check_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


# ---------------------------------------------------------------------------------------------
# Applying LoRA to a model by module name
# ---------------------------------------------------------------------------------------------


def _matches(name: str, suffixes) -> bool:
    """``peft``'s rule: ``name`` is a suffix or ends with ``"." + suffix``."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _check_names(argument: str, names, kind: str) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{argument} must be a list of {kind} name suffixes, got {names!r}")
    return list(names)


def apply_lora(
    model: nn.Module,
    targets: list[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    trainable: list[str] = (),
) -> nn.Module:
    """Wrap every ``nn.Linear`` of ``model`` whose name ends with one of ``targets`` in a
    :class:`LoRALinear` (in place) and freeze every other parameter, except those whose name
    (or a module above them) ends with one of ``trainable`` (e.g. ``["classifier"]`` for a
    task head, ``["norm"]``). Returns ``model``.

    Course models: ``attn.qkv`` (GPT), ``attn.q_proj``/``k_proj``/``v_proj``/``out_proj``
    (Llama, Bert, T5's ``attn``/``self_attn``/``cross_attn``), ``ffn.fc_in``/``fc_gate``/
    ``fc_out``; Hugging Face Llama: ``q_proj``, ``v_proj``, ... as in ``peft``.
    """
    targets = _check_names("targets", targets, "module")
    trainable = _check_names("trainable", trainable, "parameter or module")
    _check_hyperparameters(rank, alpha, dropout)
    if not targets:
        raise ValueError("targets must name at least one module")
    modules = dict(model.named_modules())
    if any(isinstance(m, LoRALinear) for m in modules.values()):
        raise ValueError("model already has LoRA layers (merge_lora or load_adapter instead)")
    chosen = [name for name in modules if name and _matches(name, targets)]
    if not chosen:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"targets {targets} match no module of {type(model).__name__}; "
            f"its linear layers include {linear[:6]}"
        )
    for name in chosen:
        if not isinstance(modules[name], nn.Linear):
            raise TypeError(
                f"target {name!r} is a {type(modules[name]).__name__}, not an nn.Linear"
            )
    model.requires_grad_(False)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(modules[name], rank, alpha, dropout))
    _unfreeze(model, trainable)
    return model


def _unfreeze(model: nn.Module, trainable: list[str]) -> None:
    found = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):  # tied: every name
        prefixes = [name.rsplit(".", k)[0] for k in range(name.count(".") + 1)]
        hits = {s for s in trainable if any(_matches(p, [s]) for p in prefixes)}
        if hits:
            parameter.requires_grad_(True)
            found |= hits
    if missing := [s for s in trainable if s not in found]:
        raise ValueError(f"trainable names {missing} match no parameter of {type(model).__name__}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Name -> :class:`LoRALinear` for every wrapped layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} ({self.percent:.3g} %)"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (tied parameters counted once)."""
    parameters = list(model.parameters())  # shared parameters appear once
    return ParameterCount(
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        total=sum(p.numel() for p in parameters),
    )


# ---------------------------------------------------------------------------------------------
# Adapters: save, load, merge
# ---------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trained tensors only: every LoRA ``A``/``B`` and every other trainable parameter
    (e.g. a task head), by their names in ``model``."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (apply_lora first)")
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def adapter_config(model: nn.Module) -> dict:
    """What :func:`apply_lora` needs to rebuild the adapter: exact layer names, rank, alpha,
    dropout, and the names of the other trained parameters."""
    layers = lora_layers(model)
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha) != (first.rank, first.alpha) for m in layers.values()):
        raise ValueError("LoRA layers of different rank or alpha: save them one config at a time")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    extra = [n for n in lora_state_dict(model) if not n.endswith((".lora_A", ".lora_B"))]
    return dict(
        targets=list(layers), rank=first.rank, alpha=first.alpha, dropout=dropout, trainable=extra
    )


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write :func:`lora_state_dict` to a safetensors file, :func:`adapter_config` in its
    metadata (key ``"lora"``, JSON)."""
    tensors = {n: t.contiguous() for n, t in lora_state_dict(model).items()}
    save_file(tensors, str(path), metadata={"lora": json.dumps(adapter_config(model))})


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put a :func:`save_adapter` file onto ``model``: apply LoRA as recorded (unless the model
    already has those layers), then copy the tensors. Every saved name must exist in the model.
    Returns ``model``."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "lora" not in metadata:
        raise ValueError(f"{path} has no 'lora' metadata: not a save_adapter file")
    config = json.loads(metadata["lora"])
    if not lora_layers(model):
        apply_lora(model, **config)
    tensors = load_file(str(path))
    parameters = dict(model.named_parameters())
    if unknown := [n for n in tensors if n not in parameters]:
        raise ValueError(f"adapter tensors {unknown[:4]} are not parameters of the model")
    if missing := [n for n in lora_state_dict(model) if n not in tensors]:
        raise ValueError(f"{path} lacks the model's adapter tensors {missing[:4]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by its base ``nn.Linear`` with the update merged in
    (in place; returns ``model``). The result has no LoRA parameters and the same outputs."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model
