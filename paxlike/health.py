"""Loss spikes and non-finite values: what counts as one, and what the run does about it.

`health.policy` in the config chooses the response (the step loop, paxlike/loop.py, applies it):

    stop      the run stops with an error; checkpoints already written stay (the default)
    rollback  the state returns to the newest checkpoint, the data batch of the bad step is
              skipped from then on (its position is logged and recorded in the checkpoints'
              data state), and training continues; at most `health.max_rollbacks` times per run

A bad step is one whose loss or gradient norm is not finite, or, with `health.spike_zscore` > 0,
whose loss lies more than that many standard deviations above the mean of the last
`health.spike_window` good steps' losses (a one-sided z-score: a falling loss is never a spike).
Spike detection reads the loss on every step (one small device-to-host copy per step); without
it, the non-finite check reads only on the steps that log or save, as those are the steps whose
state could be written out.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

POLICIES = ("stop", "rollback")
# Fewer losses than this give a standard deviation too noisy to judge a spike by.
MIN_HISTORY = 8


def validate(cfg) -> list[str]:
    problems = []
    if cfg.policy not in POLICIES:
        problems.append(f"health.policy={cfg.policy!r}; choose one of {', '.join(POLICIES)}")
    if cfg.spike_zscore < 0:
        problems.append(f"health.spike_zscore={cfg.spike_zscore} must be >= 0 (0 disables spike "
                        f"detection)")
    if cfg.spike_window < MIN_HISTORY:
        problems.append(f"health.spike_window={cfg.spike_window} must be >= {MIN_HISTORY}")
    if cfg.max_rollbacks < 0:
        problems.append(f"health.max_rollbacks={cfg.max_rollbacks} must be >= 0")
    return problems


@dataclasses.dataclass(frozen=True)
class Anomaly:
    step: int
    loss: float
    grad_norm: float
    reason: str     # e.g. "loss nan", "loss 9.12 is 7.3 standard deviations above ..."


class LossGuard:
    """Judges each step's loss and gradient norm against the recent good steps."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._recent: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=cfg.spike_window)

    @property
    def reads_every_step(self) -> bool:
        return self.cfg.spike_zscore > 0 or self.cfg.policy == "rollback"

    def check(self, step: int, loss: float, grad_norm: float) -> Anomaly | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Anomaly(step, loss, grad_norm, f"loss {loss}, gradient norm {grad_norm}")
        if self.cfg.spike_zscore > 0 and len(self._recent) >= MIN_HISTORY:
            losses = [value for _, value in self._recent]
            mean = statistics.fmean(losses)
            # A floor on the spread: on a plateau a tiny standard deviation would turn noise
            # into "spikes".
            spread = max(statistics.pstdev(losses), 1e-3 * abs(mean))
            z = (loss - mean) / spread
            if z > self.cfg.spike_zscore:
                return Anomaly(step, loss, grad_norm,
                               f"loss {loss:.4g} is {z:.1f} standard deviations above the mean "
                               f"{mean:.4g} of the last {len(losses)} steps "
                               f"(health.spike_zscore={self.cfg.spike_zscore})")
        self._recent.append((step, loss))
        return None

    def forget_after(self, step: int) -> None:
        """After a rollback to `step`: the losses of the abandoned steps no longer count."""
        kept = [(s, v) for s, v in self._recent if s <= step]
        self._recent.clear()
        self._recent.extend(kept)
