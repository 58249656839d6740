"""Queueing formulas for operator-group replica pools (M/M/c, Erlang C). Pure Python.

A group with c replicas, Poisson arrivals at rate lam and exponential service at rate mu per
replica is an M/M/c queue. With offered load a = lam / mu and utilisation rho = a / c < 1:
- Erlang B by the stable recursion B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1));
- Erlang C (probability an arrival waits) C = c B(c) / (c - a (1 - B(c)));
- waiting time: P(W > t) = C exp(-(c mu - lam) t), mean W = C / (c mu - lam).
Approximations, documented where they are used: service is not exponential (batched kernels
are close to deterministic; M/M/c over-estimates their waits, which errs on the safe side) and
arrivals to inner groups are the departures of the groups before them.
"""
from __future__ import annotations

import math


def erlang_b(servers: int, load: float) -> float:
    """Blocking probability of an M/M/c/c system with offered load `load` (Erlangs)."""
    if servers < 0 or load < 0:
        raise ValueError(f"servers and load must be >= 0, got {servers}, {load}")
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = load * blocking / (k + load * blocking)
    return blocking


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival has to wait in an M/M/c queue (1.0 when unstable)."""
    if servers <= 0 or load >= servers:
        return 1.0
    if load == 0:
        return 0.0
    blocking = erlang_b(servers, load)
    return servers * blocking / (servers - load * (1.0 - blocking))


def erlang_c_wait(servers: int, arrival_rate: float, service_rate: float,
                  percentile: float | None = None) -> float:
    """Mean waiting time (or its `percentile` in (0, 1)) before service starts, in seconds."""
    if service_rate <= 0:
        raise ValueError(f"service rate must be positive, got {service_rate}")
    load = arrival_rate / service_rate
    if servers <= 0 or load >= servers:
        return math.inf
    waiting = erlang_c(servers, load)
    drain = servers * service_rate - arrival_rate
    if percentile is None:
        return waiting / drain
    if not 0 < percentile < 1:
        raise ValueError(f"percentile must be in (0, 1), got {percentile}")
    tail = 1.0 - percentile
    return 0.0 if waiting <= tail else math.log(waiting / tail) / drain
