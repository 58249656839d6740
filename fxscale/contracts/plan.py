"""What a deployment is asked to meet: the SLO (time to first token and time between tokens,
met by a fraction of requests). No torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    """Latency targets: TTFT and mean time between tokens (seconds), met by `attainment` of
    requests (and predicted at that percentile)."""

    ttft: float
    tbt: float
    attainment: float = 0.99

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tbt > 0):
            raise ValueError(f"SLO ttft and tbt must be positive seconds, got {self.ttft}, "
                             f"{self.tbt}")
        if not 0 < self.attainment < 1:
            raise ValueError(f"SLO attainment must be in (0, 1), got {self.attainment}")
