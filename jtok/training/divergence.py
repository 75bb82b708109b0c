"""Divergence: stop before a bad checkpoint is written, and know which checkpoint was good.

Three signs, checked every step before the optimizer step and any save:
- the loss is not finite (NaN / Inf);
- the loss explodes: above EXPLODE_FACTOR x the median of the last WINDOW steps' losses,
  or, in the first MIN_HISTORY steps, EARLY_EXPLODE_FACTOR x the lowest loss so far (a
  median of a few early steps would take the explosion in: a run whose loss jumped from
  5.7 to 587 at its second step was otherwise never flagged). The lowest of a few losses
  is an outlier statistic (one easy batch lowers it; a retrofitted model starts at its
  pretrained loss), hence the larger factor there. A run whose loss is huge but finite
  for a few steps grows its weights by orders of magnitude (1e15 was seen) before it turns
  NaN; a checkpoint from those steps is no restart point;
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
EARLY_EXPLODE_FACTOR = 10.0
HEALTHY_FACTOR = 1.5
ZERO_GRAD_STEPS = 20


class DivergenceMonitor:
    def __init__(self) -> None:
        self.losses: deque[float] = deque(maxlen=WINDOW)
        self.zero_grad_run = 0
        self.last_loss = math.nan

    def _reference(self) -> tuple[float, float, str] | None:
        """(the loss a new one is compared with, the factor, what it is), or None before
        any step."""
        if len(self.losses) >= MIN_HISTORY:
            return (statistics.median(self.losses), EXPLODE_FACTOR,
                    f"the median of the last {len(self.losses)}")  # fmt: skip
        if self.losses:
            return (min(self.losses), EARLY_EXPLODE_FACTOR,
                    f"the lowest of the first {len(self.losses)}")  # fmt: skip
        return None

    def check_loss(self, loss: float) -> str | None:
        """Why training must stop at this loss, or None. Call before backward's step."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        found = self._reference()
        if found is not None and found[0] > 0 and loss > found[1] * found[0]:
            reference, _, what = found
            return (f"the loss exploded to {loss:.4g} ({loss / reference:.1f}x {reference:.4g},"
                    f" {what} steps' losses)")
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
        # Against the median only: early losses fall fast and unevenly, and an early
        # explosion already stops the run (check_loss) before anything is saved.
        median = statistics.median(self.losses) if len(self.losses) >= MIN_HISTORY else None
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
