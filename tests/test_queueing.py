"""Erlang B/C and M/M/c waits against textbook values and closed forms."""
from __future__ import annotations

import math
import random

import pytest

from fxscale.runtime.planner.queueing import erlang_b, erlang_c, erlang_c_wait


def test_erlang_b_textbook_values():
    # classic table values: B(c, a)
    assert erlang_b(1, 1.0) == pytest.approx(0.5)
    assert erlang_b(2, 1.0) == pytest.approx(0.2)
    assert erlang_b(10, 5.0) == pytest.approx(0.018385, rel=1e-4)


def test_erlang_c_matches_the_factorial_formula():
    for servers, load in ((1, 0.5), (3, 2.2), (10, 8.0), (50, 45.0)):
        top = load ** servers / math.factorial(servers) * servers / (servers - load)
        bottom = sum(load ** k / math.factorial(k) for k in range(servers)) + top
        assert erlang_c(servers, load) == pytest.approx(top / bottom, rel=1e-9)
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(4, 4.0) == 1.0 and erlang_c(4, 0.0) == 0.0


def test_mm1_wait_and_percentile():
    lam, mu = 3.0, 5.0
    assert erlang_c_wait(1, lam, mu) == pytest.approx((lam / mu) / (mu - lam))
    p99 = erlang_c_wait(1, lam, mu, percentile=0.99)
    # P(W > t) = rho exp(-(mu - lam) t) = 0.01
    assert (lam / mu) * math.exp(-(mu - lam) * p99) == pytest.approx(0.01)
    assert erlang_c_wait(2, 10.0, 5.0) == math.inf


def test_simulated_mmc_queue_agrees_with_erlang_c():
    rng = random.Random(7)
    servers, lam, mu = 3, 2.4, 1.0
    free_at = [0.0] * servers
    clock, waits = 0.0, []
    for _ in range(200_000):
        clock += rng.expovariate(lam)
        k = min(range(servers), key=free_at.__getitem__)
        start = max(clock, free_at[k])
        waits.append(start - clock)
        free_at[k] = start + rng.expovariate(mu)
    assert sum(waits) / len(waits) == pytest.approx(erlang_c_wait(servers, lam, mu), rel=0.05)
    assert sorted(waits)[int(0.99 * len(waits))] == pytest.approx(
        erlang_c_wait(servers, lam, mu, percentile=0.99), rel=0.08)
