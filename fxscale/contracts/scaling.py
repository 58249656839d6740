"""Scaling decisions and the one hysteresis rule both autoscalers follow: the live runtime's
(per group replicas) and the simulator's (devices of a deployment). No torch.

Hysteresis: grow at once; shrink only after `down_after` intervals in a row asked for less
(the caller chooses what to shrink to; the live autoscaler takes the most any of those
intervals asked for, kept in `ceiling`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    """One autoscaler decision: when, what it scaled, from, to, and why."""

    t: float                            # seconds since the run started
    scope: str                          # the group scaled, or "deployment" (its devices)
    old: int                            # replicas (a group) or devices (a deployment) before
    new: int                            # ... and after
    action: str                         # "scale up", "scale down" or "hold ..."
    reason: str
    observed_rps: float | None = None   # the arrival rates a deployment decision came from
    estimate_rps: float | None = None
    planned_rps: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def action(old: int, new: int) -> str:
    """What a change from `old` to `new` is called in a Decision."""
    return "scale up" if new > old else "scale down" if new < old else "hold"


@dataclass
class Hysteresis:
    """The shrink side of the rule for one scaled quantity (see the module docstring)."""

    down_after: int
    below: int = 0     # intervals in a row that asked for less than there is
    ceiling: int = 0   # the most any of those intervals asked for

    def __post_init__(self) -> None:
        if self.down_after < 1:
            raise ValueError(f"down_after must be >= 1, got {self.down_after}")

    def ask(self, have: int, wanted: int) -> None:
        """Record one interval's wish: fewer than `have` counts towards a shrink; as many or
        more starts the count again."""
        if wanted < have:
            self.below += 1
            self.ceiling = max(self.ceiling, wanted)
        else:
            self.done()

    @property
    def due(self) -> bool:
        """Whether enough intervals in a row asked for less."""
        return self.below >= self.down_after

    def done(self) -> None:
        """Start counting afresh (after a change, or a wish for as many or more)."""
        self.below = self.ceiling = 0
