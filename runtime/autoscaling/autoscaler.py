"""The engine's autoscaler: every interval, measure each group's pool (tokens run, the
executions' fixed and per-token time), plan replicas (runtime/planner/pools.py) and apply
the plan through the server (attention groups move together).

Hysteresis, so it does not oscillate (contracts/scaling.py, the rule the simulator follows
too): a group grows as soon as the plan asks for more, and shrinks only after a plan with
more headroom has asked for fewer for `down_after` intervals in a row (to the most those
intervals asked for). Every change is a Decision with its reason, kept in order and logged
to "fxscale.autoscaler".

Attention groups move together (a request's KV blocks of every layer live on one attention
replica): the first of them decides for all, one decision per interval. They (a model replica,
for the model policy) hold the KV blocks: they get at least
the replicas whose blocks hold every request's KV at its full length with the headroom, so a
deployment short of KV room adds it (the same rule for both policies).

The devices bound what a plan can get (their slots are the plan's budget; their memory
refuses a replica that fits nowhere, contracts/devices.py): a group the devices cannot grow
as far as planned grows as far as they allow, and the decision says that the devices bind
(a hold is recorded, and logged, once when binding starts).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from fxscale.contracts.devices import PlacementError
from fxscale.contracts.plan import SLO
from fxscale.contracts.scaling import Decision, Hysteresis, action
from fxscale.runtime.planner.pools import GroupLoad, PoolPlan, fit_execution, plan_pools

# Shrinking plans with this much more headroom than growing (0.6 of the TBT instead of 0.8
# by default): a band, so a group whose load sits at a threshold does not flap.
DOWN_BAND = 0.2

log = logging.getLogger("fxscale.autoscaler")


class Autoscaler:
    """Plans and applies replicas per group every `interval_s` (see the module docstring)."""

    def __init__(self, pools: Callable[[], dict[str, Any]], slo: SLO, budget: int,
                 interval_s: float = 1.0, down_after: int = 3, headroom: float = 0.2,
                 clock: Callable[[], float] = time.perf_counter,
                 scale: Callable[[str, int], Any] | None = None,
                 kv: Callable[[], tuple[int, int]] | None = None,
                 max_replicas: int = 64) -> None:
        if interval_s <= 0 or down_after < 1:
            raise ValueError(f"autoscaler: interval_s > 0 and down_after >= 1 needed, got "
                             f"{interval_s}, {down_after}")
        self.pools, self.slo, self.budget = pools, slo, budget
        self.interval_s, self.down_after, self.headroom = interval_s, down_after, headroom
        self.clock = clock
        # (KV blocks the requests held need, blocks a replica holds); None: not sized by KV
        self.kv, self.max_replicas = kv, max_replicas
        # how a decision is applied (the server's scale: attention groups move together)
        self.scale = scale or (lambda name, n: self.pools()[name].scale(n))
        self.start_time = clock()
        self.last: dict[str, tuple[float, dict]] = {}
        self.hysteresis: dict[str, Hysteresis] = {}  # per group
        self.decisions: list[Decision] = []
        self.bound: dict[str, str] = {}  # group -> why the devices bind it (while they do)
        self.timeline: list[dict] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="fxscale-autoscaler",
                                       daemon=True)

    def begin(self) -> None:
        """Measure from now on (each pool's counters as they stand)."""
        self.start_time = self.clock()
        for name, pool in self.pools().items():
            self.last[name] = (self.start_time, pool.counters())

    def start(self) -> Autoscaler:
        """Begin planning every interval, on a thread of its own."""
        self.begin()
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop planning (the replicas stay as they are)."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - one bad interval must not end autoscaling
                log.exception("autoscaler step failed; replicas unchanged, next interval "
                              "plans again")

    def measure(self, name: str, pool: Any, now: float) -> GroupLoad:
        """A pool's load since the last measurement."""
        counters = pool.counters()
        then, before = self.last.get(name, (self.start_time, dict.fromkeys(counters, 0)))
        self.last[name] = (now, counters)
        elapsed = max(now - then, 1e-9)
        fixed, per_token = fit_execution(pool.execution_samples())
        return GroupLoad(name, (counters["arrivals"] - before["arrivals"]) / elapsed, fixed,
                         per_token, pool.max_batch, int(counters["queue"]),
                         int(counters["replicas"]))

    def step(self) -> PoolPlan:
        """Measure, plan and apply once."""
        now = self.clock()
        pools = self.pools()
        loads = [self.measure(name, pool, now) for name, pool in sorted(pools.items())]
        plan = plan_pools(loads, self.slo, self.budget, self.interval_s, self.headroom)
        tight = plan_pools(loads, self.slo, self.budget, self.interval_s,
                           min(0.95, self.headroom + DOWN_BAND))
        t = now - self.start_time
        wanted, per_replica = self.kv() if self.kv else (0, 0)
        attention_done = False  # attention groups move together: one decision per step
        for load in loads:
            if getattr(pools[load.name], "stateful", False):
                if attention_done:
                    continue
                attention_done = True
            have = load.replicas
            up, down = plan.replicas[load.name], max(plan.replicas[load.name],
                                                     tight.replicas[load.name])
            why = (f"up: {load.demand(self.interval_s):.1f} tokens/s, "
                   f"{load.fixed_s * 1e3:.2f} ms + {load.per_call_s * 1e3:.3f} ms per token "
                   f"per execution; {plan.reason}")
            if per_replica and getattr(pools[load.name], "stateful", False):
                need = self._kv_replicas(wanted, per_replica, self.headroom)
                down = max(down, self._kv_replicas(wanted, per_replica,
                                                   min(0.95, self.headroom + DOWN_BAND)))
                if need > up:
                    up, why = need, (f"up: KV: the requests held want {wanted} blocks; "
                                     f"{need} replicas of {per_replica} blocks hold them with "
                                     f"{self.headroom:.0%} headroom")
            rule = self.hysteresis.setdefault(load.name, Hysteresis(self.down_after))
            if up > have:
                rule.done()
                self._apply(Decision(t, load.name, have, up, "scale up", why))
                continue
            rule.ask(have, down)
            if rule.due:
                down = rule.ceiling  # shrink to the most any of those intervals asked for
                rule.done()
                self._apply(Decision(t, load.name, have, down, "scale down", (
                    f"down: {down} replicas met the SLO with {DOWN_BAND:.0%} more headroom for "
                    f"{self.down_after} intervals in a row "
                    f"({load.demand(self.interval_s):.1f} tokens/s); {tight.reason}")))
        self.timeline.append({"t": t, "replicas": {name: pool.counters()["replicas"]
                                                   for name, pool in sorted(pools.items())},
                              "predicted_tbt_s": plan.to_dict()["tbt_s"],
                              "kv_blocks_wanted": wanted,
                              "busy_slots": plan.busy_slots, "meets_slo": plan.meets_slo})
        return plan

    def _kv_replicas(self, wanted: int, per_replica: int, headroom: float) -> int:
        """Replicas of `per_replica` blocks that hold `wanted` blocks with the headroom."""
        return max(1, min(self.max_replicas,
                          math.ceil(wanted / (per_replica * (1 - headroom)))))

    def _apply(self, decision: Decision) -> None:
        """Resize a pool (as far as the devices allow) and record why."""
        try:
            self.scale(decision.scope, decision.new)
            self.bound.pop(decision.scope, None)
        except PlacementError as err:
            got = decision.old
            for fewer in range(decision.new - 1, decision.old, -1):
                try:
                    self.scale(decision.scope, fewer)
                except PlacementError:
                    continue
                got = fewer
                break
            if got == decision.old and decision.scope in self.bound:
                return  # still bound: said already
            self.bound[decision.scope] = str(err)
            decision = replace(decision, new=got, action=action(decision.old, got) if
                               got != decision.old else "hold (devices bind)",
                               reason=f"{decision.reason}; devices bind at {got} (wanted "
                                      f"{decision.new}): {err}")
        self.decisions.append(decision)
        log.info("t=%.1fs %s: %d -> %d replicas (%s)", decision.t, decision.scope,
                 decision.old, decision.new, decision.reason)

    def report(self) -> dict:
        """Decisions and timeline, JSON-ready."""
        return {"decisions": [d.to_dict() for d in self.decisions], "timeline": self.timeline}
