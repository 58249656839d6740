"""Replicas per operator group for the engine, planned from what its pools measured.

The engine runs steps: each step takes the tokens that arrived during the one before
(decodes and prompt chunks) through every group in turn, and a group's replicas split the
step's tokens between them. A group's execution over T tokens on r replicas takes
fixed_s + per_token_s x T / r seconds (fitted to the executions its pool timed: a
weight-bound group has a large fixed part). With tokens arriving at lam per second, a step
of S seconds holds T = lam S tokens (Little's law), so

    S = sum_g fixed_g + sum_g per_token_g lam_g S / r_g  =>  S = F / (1 - sum_g lam_g p_g / r_g)

(unstable, S infinite, when the sum reaches 1). A decoding request gets one token per step,
so its time between tokens is S. Groups run one after another, so a plan needs as many
execution slots as its widest group has replicas: every group may have up to `budget`
replicas. The plan starts from one replica per group and adds the replica that shortens the
step most, until the step meets the SLO's time between tokens with headroom, or no replica
within the budget shortens it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GroupLoad:
    """One group's measured load and execution profile."""

    name: str
    arrival_rate: float   # tokens per second through the group over the last interval
    fixed_s: float        # seconds of an execution, whatever its tokens
    per_call_s: float     # seconds each token of an execution adds (on one replica)
    max_batch: int        # tokens an execution may take
    queue: int            # tokens waiting now (none in the engine: they wait as requests)
    replicas: int         # live replicas now

    def demand(self, interval_s: float) -> float:
        """Tokens per second to serve: arrivals, plus the backlog drained over one interval."""
        return self.arrival_rate + self.queue / interval_s

    def execution_s(self, tokens: float, replicas: int = 1) -> float:
        """Seconds of one execution of `tokens` tokens split over `replicas` replicas."""
        return self.fixed_s + self.per_call_s * tokens / replicas


@dataclass(frozen=True)
class PoolPlan:
    """Replicas per group, the latencies they predict, and why."""

    replicas: dict[str, int]
    latency_s: dict[str, float]   # each group's share of a step
    tbt_s: float                  # the step: a decoding request's time between tokens
    busy_slots: float             # execution slots busy on average over a step
    meets_slo: bool
    reason: str

    def to_dict(self) -> dict:
        """JSON-ready (an unstable step's infinite times become null)."""
        data = asdict(self)
        data["latency_s"] = {k: _finite(v) for k, v in self.latency_s.items()}
        data["tbt_s"] = _finite(self.tbt_s)
        return data


def _finite(value: float) -> float | None:
    """The value, or None when infinite (strict JSON has no Infinity)."""
    return value if math.isfinite(value) else None


def fit_execution(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed_s, per_token_s) >= 0 by least squares over (tokens, seconds) samples."""
    if not samples:
        return 1e-3, 0.0
    n = len(samples)
    mean_b = sum(b for b, _ in samples) / n
    mean_s = sum(s for _, s in samples) / n
    spread = sum((b - mean_b) ** 2 for b, _ in samples)
    if spread == 0:  # one size seen: no slope to fit, the time is all fixed
        return mean_s, 0.0
    slope = sum((b - mean_b) * (s - mean_s) for b, s in samples) / spread
    if slope <= 0:
        return mean_s, 0.0
    fixed = mean_s - slope * mean_b
    if fixed < 0:  # through the origin: the time is all per token
        return 0.0, sum(b * s for b, s in samples) / sum(b * b for b, _ in samples)
    return fixed, slope


def work_per_token(loads: list[GroupLoad], replicas: dict[str, int],
                   interval_s: float) -> float:
    """Seconds of per-token work a step does per second of arrivals (1 or more: unstable)."""
    return sum(g.demand(interval_s) * g.per_call_s / replicas[g.name] for g in loads)


def step_time(loads: list[GroupLoad], replicas: dict[str, int],
              interval_s: float) -> tuple[float, dict[str, float]]:
    """(the step's seconds, each group's seconds of it) with these replicas (module doc)."""
    fixed = sum(g.fixed_s for g in loads)
    load = work_per_token(loads, replicas, interval_s)
    if load >= 1:
        return math.inf, {g.name: math.inf for g in loads}
    step = fixed / (1 - load)
    return step, {g.name: g.execution_s(g.demand(interval_s) * step, replicas[g.name])
                  for g in loads}


def plan_pools(loads: list[GroupLoad], slo, budget: int, interval_s: float,
               headroom: float = 0.2) -> PoolPlan:
    """The replicas per group whose step meets the SLO's time between tokens (module doc)."""
    if budget < 1 or interval_s <= 0 or not 0 <= headroom < 1:
        raise ValueError(f"budget >= 1, interval_s > 0 and headroom in [0, 1) needed, got "
                         f"{budget}, {interval_s}, {headroom}")
    replicas = {g.name: 1 for g in loads}
    target = slo.tbt * (1 - headroom)
    step, shares = step_time(loads, replicas, interval_s)
    while step > target:
        now = (step, work_per_token(loads, replicas, interval_s))  # unstable: less work first
        trials = []
        for g in loads:
            if replicas[g.name] < budget:
                trial = {**replicas, g.name: replicas[g.name] + 1}
                trials.append(((step_time(loads, trial, interval_s)[0],
                                work_per_token(loads, trial, interval_s)), g.name))
        best = min(trials, default=None)
        if best is None or not best[0] < now:
            break
        replicas[best[1]] += 1
        step, shares = step_time(loads, replicas, interval_s)
    busy = sum(shares[n] * replicas[n] for n in replicas) / step \
        if math.isfinite(step) and step > 0 else float(max(replicas.values(), default=0))
    meets = step <= target
    gaining = [g.name for g in loads if g.per_call_s > 0]  # replicas shorten only these
    if meets:
        reason = f"predicted step (time between tokens) {_ms(step)} <= {target * 1e3:.1f} ms"
    elif all(replicas[name] >= budget for name in gaining):
        reason = (f"budget bound: every group that gains from replicas has the budget's "
                  f"{budget}; predicted step {_ms(step)} > {target * 1e3:.1f} ms")
    else:
        reason = f"predicted step {_ms(step)} > {target * 1e3:.1f} ms at best"
    return PoolPlan(replicas, shares, step, busy, meets, reason)


def _ms(seconds: float) -> str:
    """Milliseconds for a reason string (unbounded when infinite)."""
    return f"{seconds * 1e3:.1f} ms" if math.isfinite(seconds) else "unbounded"
