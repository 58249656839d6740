"""Replicas per operator group for the local runtime, planned from what its pools measured.

A group's execution takes fixed_s + per_call_s x batch seconds (fitted to the executions
its pool timed: a weight-bound group has a large fixed part, so batching is nearly free).
- A group that batches is a bulk server: with calls arriving at lam per replica, the batch
  that gathers during one execution is b = lam fixed_s / (1 - lam per_call_s) (at least 1,
  at most max_batch; beyond it the group is unstable). A call waits on average half an
  execution for the batch in progress (while the replica is busy), then its own execution.
  A replica is busy lam (fixed_s + per_call_s b) / b of the time: all of it once b > 1.
- A group that does not batch is an M/M/c queue (runtime/queueing.py).
A token passes every group once, so its time between tokens is the sum of the groups'
latencies. The plan starts from one replica per group (more where a group is unstable),
then adds the replica that cuts the most latency per budget slot it occupies, until the
predicted time between tokens meets the SLO with headroom or the budget has no slot left.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fxscale.contracts.plan import SLO
from fxscale.runtime.planner.queueing import erlang_c_wait


@dataclass(frozen=True)
class GroupLoad:
    """One group's measured load and execution profile."""

    name: str
    arrival_rate: float   # calls per second over the last interval
    fixed_s: float        # seconds of an execution, independent of its batch
    per_call_s: float     # seconds each call of a batch adds
    max_batch: int        # 1: the group does not batch
    queue: int            # calls waiting now
    replicas: int         # live replicas now

    def demand(self, interval_s: float) -> float:
        """Calls per second to serve: arrivals, plus the backlog drained over one interval."""
        return self.arrival_rate + self.queue / interval_s

    def execution_s(self, batch: float) -> float:
        """Seconds of one execution of `batch` calls."""
        return self.fixed_s + self.per_call_s * batch


@dataclass(frozen=True)
class PoolPlan:
    """Replicas per group, the latencies they predict, and why."""

    replicas: dict[str, int]
    latency_s: dict[str, float]
    tbt_s: float
    busy_slots: float
    meets_slo: bool
    reason: str

    def to_dict(self) -> dict:
        """JSON-ready (an unstable group's infinite latency becomes null)."""
        data = asdict(self)
        data["latency_s"] = {k: _finite(v) for k, v in self.latency_s.items()}
        data["tbt_s"] = _finite(self.tbt_s)
        return data


def _finite(value: float) -> float | None:
    """The value, or None when infinite (strict JSON has no Infinity)."""
    return value if math.isfinite(value) else None


def fit_execution(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed_s, per_call_s) >= 0 by least squares over (batch, seconds) samples."""
    if not samples:
        return 1e-3, 0.0
    n = len(samples)
    mean_b = sum(b for b, _ in samples) / n
    mean_s = sum(s for _, s in samples) / n
    spread = sum((b - mean_b) ** 2 for b, _ in samples)
    if spread == 0:  # one batch size seen: no slope to fit, the time is all fixed
        return mean_s, 0.0
    slope = sum((b - mean_b) * (s - mean_s) for b, s in samples) / spread
    if slope <= 0:
        return mean_s, 0.0
    fixed = mean_s - slope * mean_b
    if fixed < 0:  # through the origin: the time is all per call
        return 0.0, sum(b * s for b, s in samples) / sum(b * b for b, _ in samples)
    return fixed, slope


def group_state(load: GroupLoad, replicas: int, interval_s: float) -> tuple[float, float]:
    """(latency of one call in seconds, busy budget slots) with this many replicas."""
    demand = load.demand(interval_s)
    if demand <= 0:
        return load.execution_s(1), 0.0
    if load.max_batch <= 1:
        service = load.execution_s(1)
        wait = erlang_c_wait(replicas, demand, 1.0 / service)
        return wait + service, min(replicas, demand * service)
    lam = demand / replicas
    if lam * load.per_call_s >= 1:
        return math.inf, float(replicas)
    batch = max(1.0, lam * load.fixed_s / (1 - lam * load.per_call_s))
    if batch > load.max_batch:
        return math.inf, float(replicas)
    execution = load.execution_s(batch)
    busy = min(1.0, lam * execution / batch)
    return execution * (1 + busy / 2), replicas * busy


def plan_pools(loads: list[GroupLoad], slo: SLO, budget: int, interval_s: float,
               headroom: float = 0.2) -> PoolPlan:
    """The replicas per group that meet the SLO's time between tokens (see above)."""
    if budget < 1 or interval_s <= 0 or not 0 <= headroom < 1:
        raise ValueError(f"budget >= 1, interval_s > 0 and headroom in [0, 1) needed, got "
                         f"{budget}, {interval_s}, {headroom}")
    replicas = {g.name: 1 for g in loads}
    state = {g.name: group_state(g, 1, interval_s) for g in loads}
    target = slo.tbt * (1 - headroom)

    def busy() -> float:
        return sum(s[1] for s in state.values())

    while True:
        tbt = sum(s[0] for s in state.values())
        if tbt <= target:
            break
        best, best_gain = None, -1.0
        for g in loads:
            if replicas[g.name] >= budget:
                continue
            trial = group_state(g, replicas[g.name] + 1, interval_s)
            extra = trial[1] - state[g.name][1]
            if busy() + extra > budget + 1e-9 and math.isfinite(state[g.name][0]):
                continue
            if not math.isfinite(state[g.name][0]):  # unstable: capacity first
                gain = score = math.inf
            else:
                gain = state[g.name][0] - trial[0]
                score = gain / max(extra, 1e-3)
            if gain > 0 and score > best_gain:
                best, best_gain = g, score
        if best is None:
            break
        replicas[best.name] += 1
        state[best.name] = group_state(best, replicas[best.name], interval_s)
    tbt = sum(s[0] for s in state.values())
    meets = tbt <= target
    if meets:
        reason = f"predicted time between tokens {tbt * 1e3:.1f} ms <= {target * 1e3:.1f} ms"
    elif busy() >= budget - 1e-9 or not math.isfinite(tbt):
        reason = (f"budget bound: {busy():.2f} of {budget} slots busy; predicted time between "
                  f"tokens {_ms(tbt)} > {target * 1e3:.1f} ms")
    else:
        reason = f"predicted time between tokens {_ms(tbt)} > {target * 1e3:.1f} ms at best"
    return PoolPlan(replicas, {k: s[0] for k, s in state.items()}, tbt, busy(), meets, reason)


def _ms(seconds: float) -> str:
    """Milliseconds for a reason string (unbounded when infinite)."""
    return f"{seconds * 1e3:.1f} ms" if math.isfinite(seconds) else "unbounded"
