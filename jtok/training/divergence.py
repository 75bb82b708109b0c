"""Divergence: stop before a bad checkpoint is written, and know which checkpoint was good.

Three signs, checked every step before the optimizer step and any save:
- the loss is not finite (NaN / Inf);
- the loss explodes: above EXPLODE_FACTOR x the median of the last WINDOW steps' losses
  (after MIN_HISTORY steps, so the fast early descent never trips it). A run whose loss is
  huge but finite for a few steps grows its weights by orders of magnitude (1e15 was seen)
  before it turns NaN; a checkpoint from those steps is no restart point;
- the gradient norm is zero while the loss is not, for ZERO_GRAD_STEPS steps in a row (a
  dead network: nothing will change any more).

A checkpoint is "healthy" when the recent loss is within HEALTHY_FACTOR of the running
median and every weight is finite; checkpoint rotation never deletes the newest healthy
one (jtok.run.checkpoint), and the divergence error names it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

WINDOW = 100
MIN_HISTORY = 20
EXPLODE_FACTOR = 3.0
HEALTHY_FACTOR = 1.5
ZERO_GRAD_STEPS = 20


class DivergenceMonitor:
    def __init__(self) -> None:
        self.losses: deque[float] = deque(maxlen=WINDOW)
        self.zero_grad_run = 0
        self.last_loss = math.nan

    def _median(self) -> float | None:
        return statistics.median(self.losses) if len(self.losses) >= MIN_HISTORY else None

    def check_loss(self, loss: float) -> str | None:
        """Why training must stop at this loss, or None. Call before backward's step."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        median = self._median()
        if median is not None and loss > EXPLODE_FACTOR * median:
            return (f"the loss exploded to {loss:.4g} ({loss / median:.1f}x the median "
                    f"{median:.4g} of the last {len(self.losses)} steps)")
        return None

    def check_gradient(self, loss: float, grad_norm: float) -> str | None:
        """Why training must stop at this gradient norm, or None; then records the step."""
        if not math.isfinite(grad_norm):
            return f"the gradient norm became {grad_norm}"
        self.zero_grad_run = self.zero_grad_run + 1 if grad_norm == 0.0 and loss > 0 else 0
        if self.zero_grad_run >= ZERO_GRAD_STEPS:
            return (f"the gradient norm has been 0 for {self.zero_grad_run} steps with the "
                    f"loss at {loss:.4g}: the network no longer learns")
        self.losses.append(loss)
        self.last_loss = loss
        return None

    def healthy(self) -> bool:
        """Whether a checkpoint saved now is a good restart point (loss-wise)."""
        median = self._median()
        return math.isfinite(self.last_loss) and (
            median is None or self.last_loss <= HEALTHY_FACTOR * median)

    def state(self) -> dict:
        return {"losses": list(self.losses), "zero_grad_run": self.zero_grad_run}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.losses.extend(float(x) for x in state.get("losses", []))
            self.zero_grad_run = int(state.get("zero_grad_run", 0))
            if self.losses:
                self.last_loss = self.losses[-1]
