"""A clean torch for every graded part: the global state learner code can change, snapshotted
when the grader is imported and put back around every call into learner code.

:data:`PRISTINE` is taken at import (before any learner code in a graded notebook: the
command-line grader imports the grader first). It holds

* the global switches: default dtype and device, grad mode, deterministic algorithms,
  anomaly detection, float32 matmul precision;
* the attributes of the namespaces learner code is most likely to monkeypatch
  (:data:`NAMESPACES`: ``torch``, ``torch.nn.functional``, ``torch.Tensor``, ...): a patched
  or deleted attribute is put back; a method *added* to a class (``torch.Tensor.softmax =
  ...`` shadows the C implementation) is removed.

:func:`clean_torch` runs a block on the pristine state and gives the caller its own state
back afterwards (a learner who sets float64 in a notebook cell keeps it after a self-check).
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAMESPACES: tuple[object, ...] = (
    torch,
    F,
    torch.Tensor,
    torch.nn.Module,
    torch.nn.Linear,
    torch.linalg,
    torch.special,
    torch.autograd,
    torch.autograd.Function,
    math,
)


@dataclass
class TorchState:
    default_dtype: torch.dtype
    default_device: torch.device
    grad_enabled: bool
    deterministic: tuple[bool, bool]
    anomaly: tuple[bool, bool]
    matmul_precision: str
    rng: torch.Tensor
    attributes: list[tuple[object, dict]]

    @classmethod
    def capture(cls) -> TorchState:
        return cls(
            default_dtype=torch.get_default_dtype(),
            default_device=torch.get_default_device(),
            grad_enabled=torch.is_grad_enabled(),
            deterministic=(
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
            ),
            anomaly=(torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
            matmul_precision=torch.get_float32_matmul_precision(),
            rng=torch.get_rng_state(),
            attributes=[(ns, dict(vars(ns))) for ns in NAMESPACES],
        )

    def restore(self) -> None:
        for namespace, saved in self.attributes:
            _restore_attributes(namespace, saved)
        torch.set_default_dtype(self.default_dtype)
        if torch.get_default_device() != self.default_device:
            torch.set_default_device(self.default_device)
        torch._C._set_grad_enabled(self.grad_enabled)
        if (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ) != self.deterministic:
            torch.use_deterministic_algorithms(
                self.deterministic[0], warn_only=self.deterministic[1]
            )
        if (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()) != self.anomaly:
            torch.autograd.set_detect_anomaly(*self.anomaly)
        torch.set_float32_matmul_precision(self.matmul_precision)
        torch.set_rng_state(self.rng)


_MISSING = object()


def _restore_attributes(namespace: object, saved: dict) -> None:
    current = vars(namespace)
    for name, value in saved.items():
        if current.get(name, _MISSING) is not value:
            setattr(namespace, name, value)
    if isinstance(namespace, type):  # an added method shadows the inherited one: remove it
        for name in [n for n in current if n not in saved]:
            delattr(namespace, name)
    else:  # modules: drop added attributes, but not submodules imported since
        for name in [n for n, v in current.items() if n not in saved]:
            if not isinstance(current[name], types.ModuleType):
                delattr(namespace, name)


PRISTINE = TorchState.capture()


@contextlib.contextmanager
def clean_torch() -> Iterator[None]:
    """Run the block on the state of :data:`PRISTINE`; give the caller its state back after."""
    caller = TorchState.capture()
    PRISTINE.restore()
    try:
        yield
    finally:
        caller.restore()
