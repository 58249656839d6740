"""What arrival rate the autoscaler plans for, from the rates it observed each interval.

Two estimators, the same for every policy:
- `reactive`: the larger of the last observed rate and an exponentially weighted mean of the
  observed rates (scales up at once, down gradually).
- `holt`: Holt's linear trend (double exponential smoothing) forecast `lead` intervals ahead,
  the time new capacity takes to serve, never below the last observed rate: a predictive
  autoscaler, as production planners offer, that starts capacity before a ramp arrives.
"""
from __future__ import annotations

FORECASTS = ("reactive", "holt")
HOLT_LEVEL = 0.5  # smoothing of the level: half of each new observation
HOLT_TREND = 0.3  # smoothing of the trend: damps one-interval noise
MAX_ZERO_STEPS = 1000  # past this many empty intervals both estimators are at zero


class RateForecast:
    """The rate to plan for, updated once per decision interval."""

    def __init__(self, kind: str, ewma: float, lead_intervals: float, first: float) -> None:
        if kind not in FORECASTS:
            raise ValueError(f"forecast must be one of {FORECASTS}, got {kind!r}")
        self.kind, self.ewma, self.lead = kind, ewma, max(1.0, lead_intervals)
        self.estimate = self.level = first
        self.trend = 0.0

    def observe(self, rate: float) -> float:
        """Take one interval's observed rate; return the rate to plan for."""
        if self.kind == "reactive":
            self.estimate = max(rate, self.ewma * self.estimate + (1 - self.ewma) * rate)
            return self.estimate
        level = HOLT_LEVEL * rate + (1 - HOLT_LEVEL) * (self.level + self.trend)
        self.trend = HOLT_TREND * (level - self.level) + (1 - HOLT_TREND) * self.trend
        self.level = level
        self.estimate = max(rate, level + self.trend * self.lead, 0.0)
        return self.estimate

    def idle(self, intervals: int) -> float:
        """Take `intervals` intervals without arrivals at once."""
        for _ in range(min(intervals, MAX_ZERO_STEPS)):
            self.observe(0.0)
        if intervals > MAX_ZERO_STEPS:
            self.estimate = self.level = self.trend = 0.0
        return self.estimate
