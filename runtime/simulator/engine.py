"""The serving engine in simulated time, composing its steps with the engine's own scheduler.

Requests arrive as the trace says. Whenever an engine is free and has work, the scheduler
(runtime/scheduling, the same code the live engine runs) composes its next step; the step
takes the engine's own time (scheduling, building the step's tensors, sampling; measured on
the live engine as seconds per step and per request in it) plus, group after group, the
time each group's execution takes, split over the group's replicas exactly as the engine
splits it (runtime/scheduling/parts.py): parts run side by side, as many at once as there
are execution slots. When the step ends, each request whose chunk ended at its last known
token gets a token at that time; a request ends with its trace's output length.

`policy="model"` runs several engines (model replicas), each a step at a time on one slot,
requests going to the least loaded; `policy="operator"` one engine whose groups have the
replicas given. Pure Python, no torch.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable

from fxscale.contracts.step import Step
from fxscale.contracts.trace import Request
from fxscale.runtime.scheduling import Scheduler, SchedulerConfig
from fxscale.runtime.scheduling.parts import Layout, layout_of, micro_batches, token_slices


@dataclass(frozen=True)
class GroupModel:
    """One group as the simulator sees it."""

    name: str
    kind: str                              # "rows", "attention" or "whole"
    seconds: Callable[[int, int], float]   # (tokens, context tokens) -> one execution's s


@dataclass(frozen=True)
class EngineCosts:
    """The engine's own time per step: fixed, plus per request and per token in the step."""

    per_step_s: float = 0.0
    per_request_s: float = 0.0
    per_token_s: float = 0.0

    def of(self, step: Step) -> float:
        """Seconds of engine time a step costs beside its groups."""
        return self.per_step_s + self.per_request_s * len(step.chunks) + \
            self.per_token_s * step.num_tokens

    @classmethod
    def fit(cls, points: list[tuple[int, int, float]]) -> EngineCosts:
        """Least squares over (requests, tokens, seconds) points (fit_plane)."""
        return cls(*fit_plane(points))


def fit_plane(points: list[tuple[float, float, float]], relative: bool = False
              ) -> tuple[float, float, float]:
    """(c0, c1, c2), each >= 0, minimising |c0 + c1 x1 + c2 x2 - y|^2 over (x1, x2, y) points
    (with `relative`, the squared relative errors: small and large executions count alike);
    a regressor that never varies or whose coefficient comes out negative is dropped and the
    rest refitted; points far above the rest (a replica's first use copying its weights) are
    left out."""
    if len(points) > 10:
        ordered = sorted(p[2] for p in points)
        median = ordered[len(ordered) // 2]
        spread = ordered[int(0.9 * len(ordered))] - median
        points = [p for p in points if p[2] <= median + 10 * max(spread, 1e-4)]
    weights = [1.0 / max(p[2], 1e-9) if relative else 1.0 for p in points]
    regressors = [i for i in (0, 1) if len({p[i] for p in points}) > 1]
    while True:
        columns = [weights] + [[w * p[i] for w, p in zip(weights, points)] for i in regressors]
        coefficients = least_squares(columns, [w * p[2] for w, p in zip(weights, points)])
        if coefficients is None:  # too few distinct points: all of it fixed
            return max(0.0, sum(p[2] for p in points) / max(1, len(points))), 0.0, 0.0
        fitted = dict(zip(regressors, coefficients[1:]))
        negative = [i for i, c in fitted.items() if c < 0]
        if not negative:
            return max(0.0, coefficients[0]), fitted.get(0, 0.0), fitted.get(1, 0.0)
        regressors.remove(negative[0])


def least_squares(columns: list[list[float]], y: list[float]) -> list[float] | None:
    """Coefficients minimising |sum_j c_j column_j - y|^2 (None when the columns are not
    independent): the normal equations, solved by Gaussian elimination."""
    n = len(columns)
    a = [[sum(u * v for u, v in zip(columns[i], columns[j])) for j in range(n)]
         + [sum(u * v for u, v in zip(columns[i], y))] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * z for x, z in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def group_parts(group: GroupModel, layout: Layout, replicas: int) -> list[tuple[int, float]]:
    """(tokens, seconds) of each execution of a group in a step (its layout), split as the
    engine splits it: by attention replica, by token slices over the replicas, or whole."""
    if group.kind == "attention":
        return [(p.t1 - p.t0, group.seconds(p.t1 - p.t0, p.context)) for p in layout.parts]
    if group.kind == "rows":
        return [(b - a, group.seconds(b - a, 0))
                for a, b in token_slices(layout.tokens, replicas)]
    return [(layout.tokens, group.seconds(layout.tokens, 0))]


def group_time(group: GroupModel, step: Step, replicas: int, slots: int,
               layout: Layout | None = None) -> float:
    """Seconds a group's execution of a step takes, split as the engine splits it; parts
    beyond the slots wait for one (in waves). `layout`: the step's, when already known."""
    parts = group_parts(group, layout or layout_of(step), replicas)
    times = sorted((s for _, s in parts), reverse=True)
    return sum(times[i] for i in range(0, len(times), max(1, slots)))


def step_time(groups: list[GroupModel], step: Step, replicas: dict[str, int], slots: int,
              costs: EngineCosts, overlap: bool = False) -> float:
    """Seconds one step takes: the engine's own time and every group in turn; with `overlap`
    its two micro-batches' group executions run side by side (as long as the longer one, or
    as the slots allow all their executions: whichever is longer), while the engine's own
    time of each, Python under one interpreter lock, does not overlap."""
    halves = micro_batches(step) if overlap else [step]
    layouts = [layout_of(half) for half in halves]
    paths = [sum(group_time(g, half, replicas.get(g.name, 1), slots, layout) for g in groups)
             for half, layout in zip(halves, layouts)]
    own = sum(costs.of(half) for half in halves)
    if len(halves) == 1:
        return own + paths[0]
    # every execution on one slot, one after another
    work = sum(group_time(g, half, replicas.get(g.name, 1), 1, layout) for g in groups
               for half, layout in zip(halves, layouts))
    return own + max(max(paths), work / slots)


def simulate_engine(groups: list[GroupModel], requests: list[Request], config: SchedulerConfig,
                    num_blocks: int, replicas: dict[str, int], slots: int,
                    costs: EngineCosts = EngineCosts(), engines: int = 1,
                    attention_replicas: int = 1, overlap: bool = False) -> list[list[float]]:
    """Each request's token times (seconds from the start) when the engine(s) serve the
    requests (see the module docstring)."""
    if engines < 1 or attention_replicas < 1 or slots < 1:
        raise ValueError(f"engines, attention replicas and slots must be >= 1, got "
                         f"{engines}, {attention_replicas}, {slots}")
    schedulers = [Scheduler(config, [num_blocks] * (attention_replicas if engines == 1 else 1),
                            first_replica=k) for k in range(engines)]
    times: list[list[float]] = [[] for _ in requests]
    owner: dict[int, int] = {}
    events: list[tuple[float, int, str, int]] = []  # (time, order, kind, index)
    order = itertools.count()
    for i, request in enumerate(requests):
        heapq.heappush(events, (request.arrival_s, next(order), "arrive", i))
    busy = [False] * engines
    free_slots = slots if engines > 1 else 1  # model replicas take a slot per step
    waiting_for_slot: list[int] = []
    pending: dict[int, Step] = {}

    def start(e: int, now: float) -> None:
        nonlocal free_slots
        if busy[e] or not schedulers[e].has_work():
            return
        if engines > 1:
            if free_slots == 0:
                if e not in waiting_for_slot:
                    waiting_for_slot.append(e)
                return
            free_slots -= 1
        step = schedulers[e].schedule()
        if not step.chunks:
            if engines > 1:
                free_slots += 1
            return
        busy[e] = True
        pending[e] = step
        took = step_time(groups, step, replicas, slots if engines == 1 else 1, costs, overlap)
        heapq.heappush(events, (now + took, next(order), "done", e))

    while events:
        now, _, kind, index = heapq.heappop(events)
        if kind == "arrive":
            request = requests[index]
            e = min(range(engines), key=lambda k: len(schedulers[k].requests))
            owner[index] = e
            schedulers[e].add(index, max(1, request.prompt_tokens),
                              max(1, request.output_tokens))
            if not (events and events[0][0] <= now and events[0][2] == "arrive"):
                for k in range(engines):  # requests arriving at one instant start together
                    start(k, now)
            continue
        step = pending.pop(index)
        busy[index] = False
        scheduler = schedulers[index]
        scheduler.complete(step)
        for chunk in step.chunks:
            if not chunk.samples:
                continue
            times[chunk.request].append(now)
            state = scheduler.requests[chunk.request]
            if state.num_output >= state.max_new_tokens:
                scheduler.finish(chunk.request)
        if engines > 1:
            free_slots += 1
            while waiting_for_slot and free_slots:
                start(waiting_for_slot.pop(0), now)
        start(index, now)
    return times
