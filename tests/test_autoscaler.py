"""The local runtime's planner and autoscaler: replicas from measured load, hysteresis,
decisions with reasons, and a live server that scales under load and back when idle."""
from __future__ import annotations

import logging
import math
import time

import pytest
import torch

import fxscale
from fxscale.contracts.devices import PlacementError
from fxscale.contracts.plan import SLO
from fxscale.models import zoo
from fxscale.runtime.autoscaling.autoscaler import Autoscaler
from fxscale.runtime.planner.pools import GroupLoad, fit_execution, plan_pools, step_time


def load(name="g", rate=0.0, fixed=0.01, per_call=0.0, max_batch=1, queue=0, replicas=1):
    return GroupLoad(name, rate, fixed, per_call, max_batch, queue, replicas)


def test_fit_recovers_fixed_and_per_call_time_and_stays_non_negative():
    samples = [(b, 0.004 + 0.0005 * b) for b in (1, 2, 4, 8, 16)]
    fixed, per_call = fit_execution(samples)
    assert math.isclose(fixed, 0.004, rel_tol=1e-9) and math.isclose(per_call, 0.0005,
                                                                      rel_tol=1e-9)
    assert fit_execution([(1, 0.01), (1, 0.03)]) == pytest.approx((0.02, 0.0))  # no slope
    assert fit_execution([(1, 0.05), (4, 0.01)]) == pytest.approx((0.03, 0.0))  # flat
    fixed, per_call = fit_execution([(1, 0.001), (10, 0.1)])         # through the origin
    assert fixed == 0.0 and per_call > 0


def test_the_step_is_the_fixed_point_of_its_groups_times():
    """S = F / (1 - sum lam p / r): the step holds the tokens that arrived during it."""
    loads = [load("a", rate=200.0, fixed=0.002, per_call=0.001),
             load("b", rate=200.0, fixed=0.003, per_call=0.0005)]
    step, shares = step_time(loads, {"a": 1, "b": 2}, 1.0)
    assert math.isclose(step, 0.005 / (1 - 200 * 0.001 - 200 * 0.0005 / 2))
    tokens = 200.0 * step
    assert math.isclose(shares["a"], 0.002 + 0.001 * tokens)
    assert math.isclose(shares["b"], 0.003 + 0.0005 * tokens / 2)
    assert math.isclose(sum(shares.values()), step)
    assert step_time(loads[:1], {"a": 1}, 1.0)[0] < math.inf
    assert step_time([load("a", rate=1000.0, fixed=0.001, per_call=0.001)], {"a": 1},
                     1.0)[0] == math.inf  # a token of work per token of time: never drains


def test_an_unstable_group_gets_the_fewest_replicas_that_meet_the_target():
    slo = SLO(ttft=1.0, tbt=0.05)
    g = load(rate=1500.0, fixed=0.005, per_call=0.001)   # 1.5 tokens of work per token
    plan = plan_pools([g], slo, budget=8, interval_s=1.0, headroom=0.2)
    c = plan.replicas["g"]
    assert plan.meets_slo and c >= 2
    target = slo.tbt * 0.8
    assert 0.005 / (1 - 1.5 / c) <= target                 # enough
    assert c == 2 or 0.005 / (1 - 1.5 / (c - 1)) > target  # and no more than enough
    assert math.isclose(plan.tbt_s, 0.005 / (1 - 1.5 / c))


def test_light_load_plans_one_replica_per_group_and_meets_the_slo():
    loads = [load("a", rate=5.0, fixed=0.002, per_call=0.0001),
             load("b", rate=5.0, fixed=0.004, per_call=0.0001)]
    plan = plan_pools(loads, SLO(1.0, 0.1), budget=2, interval_s=1.0)
    assert plan.replicas == {"a": 1, "b": 1} and plan.meets_slo
    assert "<=" in plan.reason


def test_replicas_go_where_they_shorten_the_step_most():
    heavy = load("heavy", rate=300.0, fixed=0.001, per_call=0.002)   # 0.6 of the load
    light = load("light", rate=300.0, fixed=0.001, per_call=0.0005)
    plan = plan_pools([heavy, light], SLO(1.0, 0.006), budget=4, interval_s=1.0, headroom=0.0)
    assert plan.replicas["heavy"] > plan.replicas["light"] and plan.meets_slo


def test_over_the_budget_the_plan_says_so_instead_of_pretending():
    loads = [load(n, rate=3000.0, fixed=0.01, per_call=0.001) for n in "abc"]  # 9x the time
    plan = plan_pools(loads, SLO(1.0, 0.1), budget=2, interval_s=1.0)
    assert not plan.meets_slo and "budget" in plan.reason
    assert all(r == 2 for r in plan.replicas.values())
    assert plan.to_dict()["tbt_s"] is None  # infinite becomes JSON null


def test_bad_planner_input_is_named():
    with pytest.raises(ValueError, match="budget"):
        plan_pools([load()], SLO(1.0, 0.1), budget=0, interval_s=1.0)


# Step S(r) = 1 ms / (1 - 0.01 lam / r): the plan (S <= 40 ms) wants 3 replicas from
# lam > 195 tokens/s, the shrink plan (S <= 30 ms) keeps 3 down to lam > 193.3: a band.
THRESHOLD_LOADS = [196, 194, 196, 194, 195, 194, 194, 194]


class FakePool:
    """A pool whose measured load the test sets: tokens per interval; executions of 1 ms
    plus `per_token_s` per token."""

    def __init__(self, per_token_s: float = 0.01, max_batch: int = 1 << 16) -> None:
        self.arrivals, self.replicas, self.max_batch = 0, 1, max_batch
        self.samples = [(b, 0.001 + per_token_s * b) for b in (1, 2, 4, 8)]
        self.scaled_to: list[int] = []

    def counters(self):
        return {"arrivals": self.arrivals, "queue": 0, "replicas": self.replicas}

    def execution_samples(self):
        return list(self.samples)

    def scale(self, n):
        self.replicas = n
        self.scaled_to.append(n)


def stepped(pool: FakePool, down_after: int):
    """An autoscaler on a fake clock, and a function that runs one interval of `tokens`."""
    clock = [0.0]
    scaler = Autoscaler(lambda: {"g": pool}, SLO(1.0, 0.05), budget=4, interval_s=1.0,
                        down_after=down_after, clock=lambda: clock[0])
    scaler.last = {"g": (0.0, pool.counters())}

    def interval(tokens):
        pool.arrivals += tokens
        clock[0] += 1.0
        return scaler.step()

    return scaler, interval


def test_autoscaler_grows_at_once_shrinks_after_the_hysteresis_and_logs_why(caplog):
    pool = FakePool()
    scaler, interval = stepped(pool, down_after=3)

    with caplog.at_level(logging.INFO, logger="fxscale.autoscaler"):
        interval(250)                  # 2.5 s of work a second on one replica: grow now
        assert pool.replicas >= 3 and scaler.decisions[-1].new == pool.replicas
        grown = pool.replicas
        interval(0)
        interval(0)                    # two quiet intervals: not yet
        assert pool.replicas == grown
        interval(0)                    # the third: shrink
        assert pool.replicas == 1
    ups = [d for d in scaler.decisions if d.new > d.old]
    downs = [d for d in scaler.decisions if d.new < d.old]
    assert len(ups) == 1 and len(downs) == 1
    assert ups[0].reason.startswith("up:") and "tokens/s" in ups[0].reason
    assert "3 intervals in a row" in downs[0].reason
    assert "g: 1 -> " in caplog.text and "-> 1 replicas" in caplog.text
    assert len(scaler.timeline) == 4 and scaler.report()["decisions"][0]["scope"] == "g"


def test_autoscaler_shrinks_to_the_most_the_quiet_intervals_asked_for():
    pool = FakePool()
    scaler, interval = stepped(pool, down_after=3)
    for tokens in (250, 150, 150, 0):  # 3 replicas; then 2, 2 and 1 would do
        interval(tokens)
    assert pool.scaled_to == [3, 2], pool.scaled_to


def test_autoscaler_does_not_flap_on_a_load_at_the_threshold():
    pool = FakePool()
    scaler, interval = stepped(pool, down_after=2)
    for tokens in THRESHOLD_LOADS:  # 3 replicas, then 2 would do (just)
        interval(tokens)
    assert len(pool.scaled_to) == 1, f"flapped: {pool.scaled_to}"


class BoundPool(FakePool):
    """A pool on devices with room for `room` replicas: more is refused, as a Server does."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def scale(self, n):
        if n > self.room:
            raise PlacementError(f"no device has room for replica {n}")
        super().scale(n)


def test_autoscaler_grows_as_far_as_the_devices_allow_and_says_they_bind(caplog):
    pool = BoundPool(room=2)
    scaler, interval = stepped(pool, down_after=3)
    with caplog.at_level(logging.INFO, logger="fxscale.autoscaler"):
        interval(250)                  # the plan wants 3 or more; 2 fit
    assert pool.replicas == 2 and pool.scaled_to == [2]
    grown = scaler.decisions[-1]
    assert (grown.old, grown.new, grown.action) == (1, 2, "scale up")
    assert "devices bind at 2" in grown.reason and "room for replica" in grown.reason
    assert "devices bind" in caplog.text
    interval(250)                      # still bound as said: no new decision
    interval(250)
    assert scaler.decisions == [grown] and pool.replicas == 2
    full = BoundPool(room=1)           # bound from the start: one hold, said once
    scaler, interval = stepped(full, down_after=3)
    for _ in range(3):
        interval(250)
    assert [(d.old, d.new, d.action) for d in scaler.decisions] == \
        [(1, 1, "hold (devices bind)")] and full.scaled_to == []


def test_attention_replicas_grow_to_hold_the_kv_the_requests_want_and_shrink_with_it():
    pool = FakePool()
    pool.stateful = True
    wanted = [300]
    clock = [0.0]
    scaler = Autoscaler(lambda: {"attention": pool}, SLO(1.0, 0.05), budget=2,
                        interval_s=1.0, down_after=2, clock=lambda: clock[0],
                        kv=lambda: (wanted[0], 100))
    scaler.last = {"attention": (0.0, pool.counters())}

    def interval():
        clock[0] += 1.0
        scaler.step()

    interval()                         # no compute load; 300 blocks over 100 each + 20%
    assert pool.replicas == 4 and "KV: the requests held want 300 blocks" in \
        scaler.decisions[-1].reason    # beyond the compute budget of 2: KV is memory
    wanted[0] = 70
    interval()
    assert pool.replicas == 4          # hysteresis
    interval()
    assert pool.replicas == 2          # 70 blocks with 40% headroom: 2 replicas of 100
    assert scaler.timeline[-1]["kv_blocks_wanted"] == 70


def test_autoscale_needs_an_slo():
    with pytest.raises(ValueError, match="SLO"):
        fxscale.serve(torch.nn.Linear(2, 2), autoscale=True)


def test_live_server_scales_groups_under_load_and_back_when_idle():
    model = zoo.build("llama", layers=1, hidden=64).model.eval()
    slo = SLO(ttft=1.0, tbt=1e-4)  # unattainable: every group gets what the budget allows
    with fxscale.serve(model, budget=2, slo=slo, autoscale=True,
                       autoscale_interval_s=0.2) as server:
        server.autoscaler.down_after = 2
        ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(0))
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, 6:].tolist()
        deadline = time.perf_counter() + 60
        while not any(d.new > d.old for d in server.autoscaler.decisions):
            futures = [server.generate(ids, max_new_tokens=8) for _ in range(8)]
            assert all(f.result() == expected for f in futures)
            assert time.perf_counter() < deadline, "no scale-up under load"
        # the decisions, not the pools now: two idle intervals later it may have shrunk again
        grown = {d.scope for d in server.autoscaler.decisions if d.new > d.old}
        assert grown and grown <= set(server.pools)
        while not any(d.new < d.old for d in server.autoscaler.decisions):
            time.sleep(0.2)            # idle: the plan asks for one replica per group
            assert time.perf_counter() < deadline, "no scale-down when idle"
        stats = server.stats()
    decisions = stats["autoscaler"]["decisions"]
    assert all(d["reason"] for d in decisions)
    assert stats["autoscaler"]["timeline"]


def test_a_failing_interval_is_logged_and_the_next_one_plans_again(caplog):
    pool = FakePool()
    broken = [True]
    original = pool.counters

    def counters():
        if broken[0]:
            broken[0] = False
            raise RuntimeError("counters unavailable")
        return original()

    pool.counters = counters
    scaler = Autoscaler(lambda: {"g": pool}, SLO(1.0, 0.05), budget=4, interval_s=0.05)
    scaler.last = {"g": (scaler.clock(), original())}
    with caplog.at_level(logging.ERROR, logger="fxscale.autoscaler"):
        scaler.thread.start()
        deadline = time.perf_counter() + 10
        while len(scaler.timeline) < 2:
            assert time.perf_counter() < deadline, "autoscaler stopped after a failure"
            time.sleep(0.01)
        scaler.stop()
    assert "counters unavailable" in caplog.text
