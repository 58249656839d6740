"""A served deployment in simulated time: the engine simulator's steps (engine.py) on replicas
that change while requests flow, placed on the deployment's devices, scaled by the live
autoscaler itself.

Everything but the groups' execution times is the live engine's own code: the scheduler
(runtime/scheduling) composes every step and holds the KV blocks; the placement
(contracts/placement.py) puts each replica on a device or refuses it; the autoscaler
(runtime/autoscaling) decides every interval on what the simulated pools measured, as it does
on the live pools. A group's execution takes what its profile says (GroupModel), and each
step the engine's own time (EngineCosts). `policy="model"`: one whole-model group, each
replica an engine of its own on one device, taking a slot of that device per step, requests
to the least loaded; `policy="operator"`: one engine whose dense groups and attention
replicas scale apart. Replicas start at once (a live replica's copy of its weights takes
milliseconds here). Pure Python, no torch.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any

from fxscale.contracts.devices import Devices
from fxscale.contracts.placement import Demand, Placement
from fxscale.contracts.plan import SLO
from fxscale.contracts.step import Step
from fxscale.contracts.trace import Request
from fxscale.runtime.autoscaling.autoscaler import Autoscaler
from fxscale.runtime.scheduling import Scheduler, SchedulerConfig
from fxscale.runtime.scheduling.parts import layout_of
from fxscale.runtime.simulator.engine import EngineCosts, GroupModel, group_parts, step_time


@dataclass(frozen=True)
class DeployedGroup:
    """A group as deployed: its execution model and what one replica holds."""

    model: GroupModel
    stateful: bool
    weight_bytes: int
    kv_bytes: int


@dataclass(frozen=True)
class Deployment:
    """What is served, on what, and how it scales."""

    policy: str                      # "operator" or "model"
    groups: tuple[DeployedGroup, ...]  # in the order the live server first places them
    config: SchedulerConfig
    num_blocks: int                  # per attention (model) replica
    devices: Devices
    slo: SLO
    costs: EngineCosts = EngineCosts()
    autoscale: bool = True
    interval_s: float = 1.0
    down_after: int = 3
    headroom: float = 0.2


class SimulatedPool:
    """What the autoscaler reads of one group, counted in simulated time."""

    def __init__(self, name: str, stateful: bool) -> None:
        self.name, self.stateful = name, stateful
        self.replicas = 1
        self.arrivals = 0
        self.samples: deque[tuple[int, float]] = deque(maxlen=512)
        self.max_batch = 1 << 16

    def counters(self) -> dict[str, float]:
        return {"arrivals": self.arrivals, "queue": 0, "replicas": self.replicas}

    def execution_samples(self) -> list[tuple[int, float]]:
        return list(self.samples)


@dataclass
class SimulatedEngine:
    """One engine: its scheduler, its device (a model replica's), whether it runs a step."""

    key: int
    scheduler: Scheduler
    device: int = 0
    busy: bool = False
    draining: bool = False
    step: Step | None = None


class DeploymentSimulation:
    """Serve requests on a Deployment in simulated time (see the module docstring)."""

    def __init__(self, deployment: Deployment) -> None:
        if deployment.policy not in ("operator", "model"):
            raise ValueError(f"policy must be 'operator' or 'model', got "
                             f"{deployment.policy!r}")
        self.d = deployment
        self.now = 0.0
        self.placement = Placement(deployment.devices, clock=lambda: self.now)
        self.pools = {g.model.name: SimulatedPool(g.model.name, g.stateful)
                      for g in deployment.groups}
        self.dense = {g.model.name: 1 for g in deployment.groups if not g.stateful}
        self.engines: list[SimulatedEngine] = []
        self.keys = itertools.count()
        self.free_slots = [deployment.devices.slots] * deployment.devices.count
        self.events: list[tuple[float, int, str, int]] = []
        self.order = itertools.count()
        self.samples: list[dict[str, Any]] = []
        first = SimulatedEngine(next(self.keys), Scheduler(deployment.config,
                                                           [deployment.num_blocks]))
        self.engines.append(first)
        for group in deployment.groups:  # replica 0 of every group, in the live order
            device = self.placement.place(self._demand(group, first.key))
            if group.stateful:
                first.device = device
        self.autoscaler = Autoscaler(lambda: dict(self.pools), deployment.slo,
                                     deployment.devices.total_slots, deployment.interval_s,
                                     deployment.down_after, deployment.headroom,
                                     clock=lambda: self.now, scale=self.scale,
                                     kv=self.kv_demand)
        self.autoscaler.begin()

    # ---- replicas ------------------------------------------------------------------------------
    def _demand(self, group: DeployedGroup, key: int) -> Demand:
        return Demand(group.model.name, key, group.weight_bytes, group.kv_bytes,
                      key if group.stateful else None)

    def _stateful(self) -> list[DeployedGroup]:
        return [g for g in self.d.groups if g.stateful]

    def _add_engine_or_replica(self) -> None:
        """A new model replica (model) or attention replica (operator), placed."""
        if self.d.policy == "model":
            key = next(self.keys)
            devices = [self.placement.place(self._demand(g, key)) for g in self._stateful()]
            self.engines.append(SimulatedEngine(
                key, Scheduler(self.d.config, [self.d.num_blocks], first_replica=key),
                devices[0] if devices else 0))
            return
        scheduler = self.engines[0].scheduler
        key = scheduler.add_replica(self.d.num_blocks)
        for group in self._stateful():
            self.placement.place(self._demand(group, key))

    def _attention_keys(self) -> list[int]:
        """The attention (model) replicas that admit requests."""
        if self.d.policy == "model":
            return [e.key for e in self.engines if not e.draining]
        return sorted(k for k, p in self.engines[0].scheduler.pools.items() if not p.draining)

    def scale(self, name: str, replicas: int) -> None:
        """The autoscaler's resize: every new replica checked against the devices first
        (PlacementError: nothing changed); removed ones drain, then free their memory."""
        group = next(g for g in self.d.groups if g.model.name == name)
        if not group.stateful:
            have = self.dense[name]
            self.placement.check([self._demand(group, k) for k in range(have, replicas)])
            for key in range(have, replicas):
                self.placement.place(self._demand(group, key))
            for key in range(replicas, have):
                self.placement.release(name, key)
            self.dense[name] = self.pools[name].replicas = replicas
            return
        live = self._attention_keys()
        self.placement.check([self._demand(g, -1 - i) for i in range(replicas - len(live))
                              for g in self._stateful()])
        for _ in range(replicas - len(live)):
            self._add_engine_or_replica()
        for key in live[replicas:]:
            if self.d.policy == "model":
                next(e for e in self.engines if e.key == key).draining = True
            else:
                self.engines[0].scheduler.drain(key)
        self._retire_drained()

    def _retire_drained(self) -> None:
        """Free drained replicas that hold no request any more."""
        if self.d.policy == "model":
            for engine in [e for e in self.engines if e.draining and
                           not e.scheduler.has_work() and not e.busy]:
                self.engines.remove(engine)
                for group in self._stateful():
                    self.placement.release(group.model.name, engine.key)
        else:
            scheduler = self.engines[0].scheduler
            for key in [k for k, p in scheduler.pools.items() if p.draining and not p.tables]:
                scheduler.remove_replica(key)
                for group in self._stateful():
                    self.placement.release(group.model.name, key)
        count = len(self.engines) if self.d.policy == "model" else \
            len(self.engines[0].scheduler.pools)
        for group in self._stateful():
            self.pools[group.model.name].replicas = count

    def _serving(self) -> list[SimulatedEngine]:
        """The engines taking requests (a retiring model replica is no longer counted, as
        the live server stops counting it)."""
        return [e for e in self.engines if not e.draining]

    def kv_demand(self) -> tuple[int, int]:
        """(KV blocks the requests held need, blocks per replica): as the live server's."""
        return sum(e.scheduler.blocks_wanted() for e in self._serving()), self.d.num_blocks

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, requests: list[Request], sample_s: float | None = None) -> dict[str, Any]:
        """Serve the requests; each one's token times, the decisions, and what the deployment
        held every `sample_s` (default: every autoscaler interval)."""
        times: list[list[float]] = [[] for _ in requests]
        owner: dict[int, SimulatedEngine] = {}
        rejected: list[int] = []
        for i, request in enumerate(requests):
            self._push(request.arrival_s, "arrive", i)
        if self.d.autoscale:
            self._push(self.d.interval_s, "tick", 0)
        self._push(0.0, "sample", 0)
        sample_s = sample_s or self.d.interval_s
        while self.events:
            self.now, _, kind, index = heapq.heappop(self.events)
            if kind == "arrive":
                engine = min((e for e in self.engines if not e.draining),
                             key=lambda e: len(e.scheduler.requests))
                try:
                    engine.scheduler.add(index, max(1, requests[index].prompt_tokens),
                                         max(1, requests[index].output_tokens))
                    owner[index] = engine
                except ValueError:  # longer than a replica's cache: the server refuses it
                    rejected.append(index)
                if not (self.events and self.events[0][0] <= self.now
                        and self.events[0][2] == "arrive"):
                    self._start_all()
            elif kind == "tick":
                self.autoscaler.step()
                if self._busy():
                    self._push(self.now + self.d.interval_s, "tick", 0)
                self._start_all()
            elif kind == "sample":
                self._sample()
                if self._busy():
                    self._push(self.now + sample_s, "sample", 0)
            else:
                self._finish_step(self.engines_by_key[index], times)
        self._sample()
        return {"token_times": times, "rejected": rejected,
                "autoscaler": self.autoscaler.report(), "samples": self.samples,
                "devices": self.placement.stats()}

    def _busy(self) -> bool:
        """Whether requests are held or still to arrive."""
        return any(e.scheduler.has_work() for e in self.engines) or \
            any(k == "arrive" for _, _, k, _ in self.events)

    @property
    def engines_by_key(self) -> dict[int, SimulatedEngine]:
        return {e.key: e for e in self.engines}

    def _push(self, at: float, kind: str, index: int) -> None:
        heapq.heappush(self.events, (at, next(self.order), kind, index))

    def _start_all(self) -> None:
        for engine in list(self.engines):
            self._start(engine)

    def _start(self, engine: SimulatedEngine) -> None:
        """Compose and time the engine's next step, if it is free and has a slot."""
        if engine.busy or not engine.scheduler.has_work():
            return
        model = self.d.policy == "model"
        if model and self.free_slots[engine.device] == 0:
            return  # its device's slots are busy: it starts when one frees
        step = engine.scheduler.schedule()
        if not step.chunks:
            return
        if model:
            self.free_slots[engine.device] -= 1
        engine.busy, engine.step = True, step
        models = [g.model for g in self.d.groups]
        slots = 1 if model else self.d.devices.total_slots
        layout = layout_of(step)
        for g in models:
            pool = self.pools[g.name]
            for tokens, seconds in group_parts(g, layout, self.dense.get(g.name, 1)):
                pool.samples.append((tokens, seconds))
                pool.arrivals += tokens
        took = step_time(models, step, self.dense, slots, self.d.costs)
        self._push(self.now + took, "done", engine.key)

    def _finish_step(self, engine: SimulatedEngine, times: list[list[float]]) -> None:
        step, engine.step, engine.busy = engine.step, None, False
        scheduler = engine.scheduler
        scheduler.complete(step)
        for chunk in step.chunks:
            if not chunk.samples:
                continue
            times[chunk.request].append(self.now)
            state = scheduler.requests[chunk.request]
            if state.num_output >= state.max_new_tokens:
                scheduler.finish(chunk.request)
        if self.d.policy == "model":
            self.free_slots[engine.device] += 1
        self._retire_drained()
        self._start_all()

    def _sample(self) -> None:
        """What the deployment holds now (the live demo samples the same)."""
        serving = self._serving()
        used = sum(e.scheduler.blocks()["used"] for e in serving)
        running = sum(len(e.scheduler.running) for e in serving)
        waiting = sum(len(e.scheduler.waiting) for e in serving)
        stats = self.placement.stats()["devices"]
        self.samples.append({
            "t": self.now, "kv_blocks_used": used, "running": running, "waiting": waiting,
            "replicas": {name: pool.replicas for name, pool in sorted(self.pools.items())},
            "device_weight_bytes": [r["weight_bytes"] for r in stats],
            "device_kv_bytes": [r["kv_bytes"] for r in stats]})


def simulate_deployment(deployment: Deployment, requests: list[Request],
                        sample_s: float | None = None) -> dict[str, Any]:
    """Serve the requests on the deployment in simulated time (DeploymentSimulation.run)."""
    return DeploymentSimulation(deployment).run(requests, sample_s)
