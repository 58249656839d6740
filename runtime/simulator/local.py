"""A discrete-event model of the local runtime (fxscale/serving.py) driven by measured group
profiles: what the server should do on this machine, predicted before it does it.

It mirrors the server's mechanisms, not its code: every request runs passes (a prefill, then
one decode per further token) that visit the groups in order; each visit is a call queued
at the group's pool (shortest queue; stateful groups keep a request on one replica);
row-wise groups gather a batch (until full, until arrivals pause for a quarter of a mean
execution, at most one mean execution) and only calls of the same signature batch (same
phase, same prompt length in prefill, same context for groups that read the cache length);
a signature's first batch also runs its calls one by one (the server's check);
`budget` slots run at once, a freed slot going to the waiting replica whose turn serves most
(runtime/pools/budget.py; batches gather by contracts/batching.py). An execution takes what
the group's profile measured at its phase, batch and length, or else what the profile's fit
(runtime/devices/fit.py) gives; its mean, which
gathering reads, is of wall times, as on the server; what an execution takes on the server
beyond its profile can be added to the group's latency (fxscale/fidelity.py measures it).
Each visit also costs `hop_s[phase]` of work outside the executions (the request thread's
Python between calls, the replica's own Python, thread switches), run on a core; its
`hop_locked` share is Python that holds the one interpreter lock first: the locked parts of
different requests take turns, and a replica thread starts an execution only once it gets
the lock too. Executions and hops share the machine (processor sharing) as its measured
`capacity` says: capacity[n-1] is the throughput of n jobs at once relative to one (at most
the cores; less where they share memory bandwidth).
Replica counts follow a given timeline (e.g. the live run's autoscaler decisions).
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from fxscale.contracts.batching import gather_until
from fxscale.contracts.profile import GroupProfile, ProfilePoint
from fxscale.contracts.trace import Request
from fxscale.runtime.devices.fit import predict


@dataclass(frozen=True)
class SimGroup:
    """A group as the model needs it: order, batching, and its latency per phase."""

    name: str
    batches: bool          # row-wise: batches across requests
    stateful: bool         # requests stay on one replica
    context_keyed: bool    # reads the cache length: decode calls batch only at equal context
    latency: Callable[[str, int, int], float]   # (phase, batch, length or context) -> s


@dataclass
class _Call:
    request: int
    phase: str
    length: int            # prompt length (prefill) or context (decode)
    queued: float
    key: tuple


@dataclass(eq=False)  # replicas are compared by identity (lists, pins)
class _Replica:
    group: int
    queue: deque = field(default_factory=deque)
    busy: bool = False
    waiting: bool = False
    check_at: float | None = None


def profile_latency(group: GroupProfile) -> Callable[[str, int, int], float]:
    """A group's latency at (phase, batch, length): the profile's median where it measured
    that point (CPU GEMMs have quirks a smooth fit misses: a 3-token prefill can cost more
    than a 4-token one), its fit (runtime/fit.py) elsewhere."""
    if not group.fit:
        raise ValueError(f"group {group.name}: the profile has no fit; run "
                         "runtime.fit.fit_profile on it first")
    phases = group.fit["phases"]
    measured = {(p.phase, p.batch, p.length): p.median_s for p in group.points}

    def latency(phase: str, batch: int, length: int) -> float:
        if (phase, batch, length) in measured:
            return measured[phase, batch, length]
        fit = phases.get(phase)
        if fit is None:
            raise ValueError(f"group {group.name}: no {phase} points in the profile")
        coef = [fit["overhead_s"], fit["per_token_s"], fit["extra_per_token_s"],
                fit["per_pair_s"]]
        point = ProfilePoint(phase, batch, length, 0.0, 0.0, 0.0, 0)
        return max(0.0, predict(coef, fit["knot_tokens"], point, group.stateful))

    return latency


class _Processors:
    """Processor sharing: with n jobs running, each progresses at capacity[n-1] / n (at
    most 1), capacity[n-1] being the machine's throughput with n jobs at once relative to one
    (measured: cores share memory bandwidth, so two jobs on two cores are not 2x); past the
    curve's end, its last value."""

    def __init__(self, capacity: tuple[float, ...], schedule: Callable) -> None:
        self.capacity, self.schedule = capacity, schedule
        self.jobs: dict[int, list] = {}      # id -> [work left (s at full speed), on_done]
        self.ids = itertools.count()
        self.last = 0.0
        self.version = 0

    def _rate(self) -> float:
        n = len(self.jobs)
        return min(1.0, self.capacity[min(n, len(self.capacity)) - 1] / n) if n else 1.0

    def _advance(self, now: float) -> None:
        rate = self._rate()
        for job in self.jobs.values():
            job[0] -= (now - self.last) * rate
        self.last = now

    def start(self, now: float, work: float, on_done: Callable[[float], None]) -> None:
        """Run `work` seconds of one core's time; call on_done when it is done."""
        self._advance(now)
        self.jobs[next(self.ids)] = [work, on_done]
        self._next(now)

    def _next(self, now: float) -> None:
        """Schedule the earliest completion (earlier schedules become stale)."""
        self.version += 1
        if self.jobs:
            version = self.version
            left = min(job[0] for job in self.jobs.values())
            self.schedule(now + max(0.0, left) / self._rate(),
                          lambda t: self._complete(t, version))

    def _complete(self, now: float, version: int) -> None:
        if version != self.version:
            return
        self._advance(now)
        done = [key for key, job in self.jobs.items() if job[0] <= 1e-12]
        callbacks = [self.jobs.pop(key)[1] for key in done]
        self._next(now)
        for callback in callbacks:
            callback(now)


class LocalSimulation:
    """Replay requests through the modelled runtime; `run()` gives per-request timings."""

    def __init__(self, groups: list[SimGroup], requests: list[Request], budget: int,
                 replicas: Callable[[float], dict[str, int]], max_batch: int = 16,
                 batch_wait_s: float = 0.05, hop_s: dict[str, float] | None = None,
                 capacity: tuple[float, ...] = (1.0, 2.0), hop_locked: float = 1.0) -> None:
        self.groups, self.requests, self.budget = groups, requests, budget
        self.replicas_at, self.max_batch = replicas, max_batch
        self.batch_wait_s = batch_wait_s
        self.hop_s = hop_s or {"prefill": 0.0, "decode": 0.0}
        self.hop_locked = hop_locked
        self.events: list = []
        self.order = itertools.count()
        self.free = budget
        self.processors = _Processors(capacity, self._at)
        # (seconds, then): Python waiting for the interpreter lock, in turn
        self.lock_queue: deque[tuple[float, Callable[[float], None]]] = deque()
        self.interpreting = False
        self.waiting: list[_Replica] = []
        self.pools: list[list[_Replica]] = [[_Replica(i)] for i in range(len(groups))]
        self.pinned: dict[tuple[int, int], _Replica] = {}
        self.executions = [[0, 0.0] for _ in groups]  # count, seconds
        self.verified: set[tuple[int, tuple]] = set()  # (group, signature) batched before
        n = len(requests)
        self.position = [(0, 0)] * n   # (pass, group index) of each request
        self.token_times: list[list[float]] = [[] for _ in range(n)]

    # ---- events --------------------------------------------------------------------------
    def _at(self, when: float, what: Callable[[float], None]) -> None:
        heapq.heappush(self.events, (when, next(self.order), what))

    def run(self) -> list[list[float]]:
        """Token times of every request (seconds from the start)."""
        for i, r in enumerate(self.requests):  # arrival: its thread's Python, then a call
            self._at(r.arrival_s, lambda now, i=i: self._hop(i, now))
        while self.events:
            now, _, what = heapq.heappop(self.events)
            what(now)
        return self.token_times

    # ---- requests ------------------------------------------------------------------------
    def _visit(self, i: int, now: float) -> None:
        """Request i calls its current group."""
        pass_index, g = self.position[i]
        request, group = self.requests[i], self.groups[g]
        phase = "prefill" if pass_index == 0 else "decode"
        length = request.prompt_tokens if phase == "prefill" else \
            request.prompt_tokens + pass_index
        key = (phase, length) if phase == "prefill" or group.context_keyed else (phase,)
        self._resize(g, now)
        replica = self._choose(g, i)
        replica.queue.append(_Call(i, phase, length, now, key))
        self._consider(replica, now)

    def _done(self, call: _Call, now: float) -> None:
        """A call finished: the request moves on (next group, next pass, or finished)."""
        i = call.request
        pass_index, g = self.position[i]
        if g + 1 < len(self.groups):
            self.position[i] = (pass_index, g + 1)
        else:
            self.token_times[i].append(now)
            if pass_index + 1 >= self.requests[i].output_tokens:
                return
            self.position[i] = (pass_index + 1, 0)
        self._hop(i, now)

    def _hop(self, i: int, now: float) -> None:
        """Request i's work before its next call: all of it needs a core, its locked share
        (Python) the interpreter lock too."""
        seconds = self.hop_s["prefill" if self.position[i][0] == 0 else "decode"]
        locked = seconds * self.hop_locked
        self._interpret(now, locked, lambda t: self.processors.start(
            t, seconds - locked, lambda v: self._visit(i, v)))

    def _interpret(self, now: float, seconds: float, then: Callable[[float], None]) -> None:
        """Queue `seconds` of Python for the interpreter lock; `then` runs once it is done."""
        self.lock_queue.append((seconds, then))
        self._next_python(now)

    def _next_python(self, now: float) -> None:
        """Run the next queued Python under the interpreter lock (one at a time)."""
        if self.interpreting or not self.lock_queue:
            return
        seconds, then = self.lock_queue.popleft()
        self.interpreting = True

        def done(t: float) -> None:
            self.interpreting = False
            then(t)
            self._next_python(t)

        self.processors.start(now, seconds, done)

    # ---- pools -----------------------------------------------------------------------------
    def _resize(self, g: int, now: float) -> None:
        """Follow the replica timeline; a replica to remove stays until it is idle (the
        server's drains its queue first)."""
        want = max(1, self.replicas_at(now).get(self.groups[g].name, 1))
        pool = self.pools[g]
        while len(pool) < want:
            pool.append(_Replica(g))
        while len(pool) > want:
            gone = min(pool, key=lambda r: len(r.queue) + r.busy + r.waiting)
            if gone.busy or gone.waiting or gone.queue:
                break  # draining replicas are not modelled: keep it until idle
            pool.remove(gone)

    def _choose(self, g: int, i: int) -> _Replica:
        """Shortest queue; stateful groups keep a request on its replica."""
        pool = self.pools[g]
        if self.groups[g].stateful:
            pinned = self.pinned.get((g, i))
            if pinned in pool:
                return pinned
        best = min(pool, key=lambda r: len(r.queue) + r.busy)
        if self.groups[g].stateful:
            self.pinned[(g, i)] = best
        return best

    def _mean_execution(self, g: int) -> float:
        count, seconds = self.executions[g]
        return seconds / count if count else 1e-3

    def _consider(self, replica: _Replica, now: float) -> None:
        """Ask for a slot once the replica's batch has gathered (or schedule a re-check)."""
        if replica.busy or replica.waiting or not replica.queue:
            return
        group = self.groups[replica.group]
        if group.batches and self.max_batch > 1 and len(replica.queue) < self.max_batch:
            ready_at = gather_until(replica.queue[0].queued, replica.queue[-1].queued,
                                    self._mean_execution(replica.group), self.batch_wait_s)
            if now < ready_at - 1e-12:
                if replica.check_at is None or replica.check_at > ready_at:
                    replica.check_at = ready_at
                    self._at(ready_at, lambda t, r=replica: self._recheck(r, t))
                return
        if self.free:
            self.free -= 1
            self._start(replica, now)
        else:
            replica.waiting = True
            self.waiting.append(replica)

    def _recheck(self, replica: _Replica, now: float) -> None:
        replica.check_at = None
        self._consider(replica, now)

    def _priority(self, replica: _Replica, now: float) -> float:
        """What a slot serves at this replica (runtime/replica_pool.Replica.priority)."""
        first = replica.queue[0]
        served = min(len(replica.queue), self.max_batch) if self.groups[replica.group].batches \
            else 1
        return served + (now - first.queued) / self._mean_execution(replica.group)

    def _start(self, replica: _Replica, now: float) -> None:
        """Take the batch that matches the first call and run it."""
        group = self.groups[replica.group]
        first = replica.queue.popleft()
        calls = [first]
        if group.batches and self.max_batch > 1:
            rest = deque()
            while replica.queue:
                call = replica.queue.popleft()
                (calls if call.key == first.key and len(calls) < self.max_batch
                 else rest).append(call)
            replica.queue = rest
        length = max(c.length for c in calls)
        seconds, executions = group.latency(first.phase, len(calls), length), 1
        if len(calls) > 1 and (replica.group, first.key) not in self.verified:
            # the server checks a signature's first batch against one-by-one execution
            self.verified.add((replica.group, first.key))
            seconds += len(calls) * group.latency(first.phase, 1, length)
            executions += len(calls)
        replica.busy = True
        # the replica thread starts once it gets the interpreter lock (its own Python is
        # booked in the hops, per call), then its kernels run without it
        self._interpret(now, 0.0, lambda t: self.processors.start(
            t, seconds, lambda end: self._finish(replica, calls, now, end, executions)))

    def _finish(self, replica: _Replica, calls: list[_Call], started: float, now: float,
                executions: int) -> None:
        replica.busy = False
        # wall seconds (slowed by sharing and the lock) and executions, as the server books
        self.executions[replica.group][0] += executions
        self.executions[replica.group][1] += now - started
        for call in calls:
            self._done(call, now)
        if self.waiting:  # hand the slot over to the best waiter
            best = max(self.waiting, key=lambda r: self._priority(r, now))
            self.waiting.remove(best)
            best.waiting = False
            self._start(best, now)
        else:
            self.free += 1
        self._consider(replica, now)
