"""The non-finite guard: an update whose loss or gradient norm is nan or inf is skipped and counted.

With fp16 mixed precision, accelerate's GradScaler already skips updates whose gradients overflow
(a normal event while it finds its scale); the guard leaves those to it and counts only a non-finite
loss.

Cost. With fused Adam/AdamW (optimizer adamw's default: `adamw_fused`) the skip happens on the device: the optimiser
gets the flag as `found_inf`, the mechanism torch's GradScaler uses, and its kernel leaves
weights and moments untouched, so the step still never waits for the host. Any other
optimiser cannot skip by itself, so the guard reads the flag on the host: one synchronisation
per step (free on CPU, where every step is synchronous anyway; on a GPU it costs the overlap
of the next step's launch with this one's tail). The count of updates in a row is kept on the
device and read where the loop reads anyway: at logging steps, before a checkpoint, before
export. After `limit` in a row the run stops with exit 2; the weights never took a bad
update, so every checkpoint holds finite weights and nothing non-finite is exported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from simpletuner.errors import UserError


class NonFiniteError(UserError):
    """Training stopped: too many non-finite updates in a row."""


def skips_on_device(optimizer: Any) -> bool:
    """Whether `optimizer` (or the one accelerate wraps) can skip an update from a device flag (fused Adam/AdamW)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return (isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))
            and getattr(inner, "_step_supports_amp_scaling", False))


class NonFiniteGuard:
    """Steps the optimiser unless the update is non-finite; counts non-finite updates in a row on the device."""

    def __init__(self, limit: int, device: torch.device | str) -> None:
        self.limit = limit
        self.streak = torch.zeros((), dtype=torch.int64, device=device)  # non-finite updates in a row, now
        self.worst = torch.zeros((), dtype=torch.int64, device=device)  # the longest run since the last read

    @staticmethod
    def flag(loss: torch.Tensor, grad_norm: torch.Tensor, gradients: bool = True) -> torch.Tensor:
        """True (a device tensor) when the loss, or (with `gradients`) the gradient norm, is nan or inf."""
        bad = ~torch.isfinite(loss)
        return bad | ~torch.isfinite(grad_norm.to(loss.device)) if gradients else bad

    def step(self, optimizer: Any, bad: torch.Tensor) -> None:
        """`optimizer.step()` unless `bad`; the caller zeroes the gradients either way."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if getattr(optimizer, "scaler", None) is not None:
            optimizer.step()  # fp16: accelerate's GradScaler finds non-finite gradients and skips by itself
        elif skips_on_device(inner):
            inner.grad_scale, inner.found_inf = None, bad.to(torch.float32)
            try:
                optimizer.step()
            finally:
                for name in ("grad_scale", "found_inf"):
                    if name in vars(inner):
                        delattr(inner, name)
        elif not bool(bad):  # the host read: this optimiser cannot skip an update by itself
            optimizer.step()
        self.streak = (self.streak + 1) * bad.to(self.streak.device, torch.int64)
        self.worst = torch.maximum(self.worst, self.streak)

    def check(self, step: int, advice: Callable[[], str] | None = None) -> None:
        """Read the count (a host synchronisation); raise NonFiniteError after `limit` non-finite updates in a row."""
        worst = int(self.worst)
        self.worst = self.streak.clone()
        if worst >= self.limit:
            raise NonFiniteError(
                f"training stopped at step {step}: the loss or the gradient norm was nan or inf on {worst} updates "
                f"in a row (max_nonfinite_steps={self.limit}); those updates were skipped, so the weights are the "
                f"last finite ones, and nothing was exported{advice() if advice else ''}")
