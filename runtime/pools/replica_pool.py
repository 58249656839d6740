"""Replica pools: one per operator group, each replica a worker with its own copy of the
group's weights, fed by capacity-weighted shortest-queue dispatch.

A call carries the group's compiled callable, its arguments and which of them are weights.
A replica substitutes its own copies of those weights (materialised when it is created, so
its time to ready is the time to copy its group's bytes) and runs the callable. Stateful
groups keep each request on one replica (affinity). A replica that raises has its call
retried once on another replica; a second failure reaches the caller as a GroupError naming
the group and the cause. Scale-down drains: a removed replica finishes its queue first.
Execution threads are bounded by a shared budget (runtime/budget.py): replicas are logical,
the budget is what runs at once. A row-wise group's replica takes every queued call whose
signature matches the first, up to the pool's max batch, and runs them as one
(runtime/batching.py); the first batch of each signature is checked against one-by-one
execution, and a signature that fails to batch or disagrees runs one by one from then on.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from fxscale.contracts.batching import gather_until
from fxscale.contracts.metrics import quantile
from fxscale.runtime.pools.batching import run_batched, same_results
from fxscale.runtime.pools.budget import Budget

log = logging.getLogger("fxscale.runtime")
# Replicas of one pool at most: each is a thread holding a copy of the group's weights.
MAX_REPLICAS = 64
# Upper bounds (seconds) of the call-latency histogram in stats(), Prometheus style.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GroupError(RuntimeError):
    """A group failed on two replicas: names the group and the cause."""


@dataclass
class Call:
    """One invocation of a group: what to run, on which arguments, for which request."""

    run: Callable[..., Any]
    args: tuple
    weights: tuple[int, ...]          # positions of weight tensors among args
    request: int | None
    key: Hashable | None = None       # batching signature (None: runs alone)
    future: Future = field(default_factory=Future)
    attempts: int = 0
    queued_at: float = field(default_factory=time.perf_counter)


class Replica:
    """A worker thread with its own weight copies and its own queue."""

    _ids = itertools.count()

    def __init__(self, pool: ReplicaPool, weights: dict[int, Any]) -> None:
        self.id = next(self._ids)
        self.pool = pool
        self.queue: deque[Call] = deque()
        self.wake = threading.Condition()
        self.draining = False
        self.dead = False
        self.fail_next = 0   # fault injection: raise on the next n first attempts (transient)
        self.broken = False  # fault injection: raise on every call
        self.busy_s = 0.0
        self.kernel_cpu_s = 0.0  # this thread's CPU inside the group's callable
        self.running = 0     # calls taken from the queue and executing now
        start = time.perf_counter()
        self.weights = {key: t.clone() for key, t in weights.items()}
        self.ready_s = time.perf_counter() - start
        self.bytes = sum(t.numel() * t.element_size() for t in self.weights.values())
        self.thread = threading.Thread(target=self._loop, name=f"{pool.name}#{self.id}",
                                       daemon=True)
        self.thread.start()

    def load(self) -> int:
        """Calls queued or executing here: what shortest-queue dispatch compares."""
        return len(self.queue) + self.running

    def put(self, call: Call) -> None:
        """Queue a call."""
        with self.wake:
            self.queue.append(call)
            self.wake.notify()

    def _loop(self) -> None:
        """Run queued calls until drained (or killed)."""
        while True:
            with self.wake:
                while not self.queue and not self.draining and not self.dead:
                    self.wake.wait()
                if self.dead or (self.draining and not self.queue):
                    break
                self._gather()
                if self.dead:  # killed while it gathered: its calls moved elsewhere
                    break
            # take the batch only once a budget slot is held: calls queue up while it waits
            with self.pool.budget.slot(self):
                with self.wake:
                    calls = self._take() if self.queue and not self.dead else []
                    self.running = len(calls)
                if calls:
                    self._run(calls)
                self.running = 0
        self.pool.retired(self)

    def _gather(self) -> None:
        """Let a batchable queue fill (caller holds `wake`): wait while calls keep arriving,
        at most one mean execution (and the pool's batch wait) after the oldest arrived."""
        pool = self.pool
        key = self.queue[0].key
        if pool.max_batch <= 1 or key is None or key in pool.refused:
            return
        execution = pool.mean_execution_s()
        while self.queue and len(self.queue) < pool.max_batch and not self.dead:
            now = time.perf_counter()
            ready = gather_until(self.queue[0].queued_at, self.queue[-1].queued_at, execution,
                                 pool.batch_wait_s)
            if now >= ready:
                return
            self.wake.wait(ready - now)

    def priority(self, now: float) -> float:
        """What a budget slot would serve here: the calls a batch takes (one when calls do
        not batch), plus one per mean execution time the oldest call has waited."""
        queue = self.queue
        try:
            first = queue[0]
        except IndexError:  # emptied by a crash (kill) while it waited
            return -1.0
        batches = first.key is not None and first.key not in self.pool.refused
        served = min(len(queue), self.pool.max_batch) if batches else 1
        return served + (now - first.queued_at) / self.pool.mean_execution_s()

    def _take(self) -> list[Call]:
        """The next call and the queued calls that batch with it (caller holds `wake`)."""
        first = self.queue.popleft()
        limit = self.pool.max_batch
        if first.key is None or limit <= 1 or first.key in self.pool.refused:
            return [first]
        calls, rest = [first], deque()
        while self.queue:
            call = self.queue.popleft()
            (calls if call.key == first.key and len(calls) < limit else rest).append(call)
        self.queue = rest
        return calls

    def _own(self, call: Call) -> list:
        """The call's arguments with this replica's weight copies in place of the originals."""
        args = list(call.args)
        for position in call.weights:
            source = args[position]
            mine = self.weights.get(id(source))
            if mine is None:  # a weight first seen after this replica was created
                mine = self.weights[id(source)] = source.clone()
                self.bytes += mine.numel() * mine.element_size()
                self.pool.weight_sources[id(source)] = source
            args[position] = mine
        return args

    def _run(self, calls: list[Call]) -> None:
        """Execute calls (one, or a batch; the caller holds a budget slot); each call's
        failure goes to the pool on its own, its result to its future."""
        start = time.perf_counter()
        try:
            if self.broken or (self.fail_next and not any(c.attempts for c in calls)):
                self.fail_next -= not self.broken
                raise RuntimeError(f"injected fault in replica {self.id}")
            outcomes = self._execute(calls)
        except Exception as err:  # noqa: BLE001 - any failure is retried or reported
            outcomes = [err] * len(calls)
        finally:
            self.busy_s += time.perf_counter() - start
        self.pool.record_done([c for c, o in zip(calls, outcomes)
                               if not isinstance(o, Exception)])
        for call, outcome in zip(calls, outcomes):
            if isinstance(outcome, Exception):
                self.pool.failed(self, call, outcome)
            else:
                call.future.set_result(outcome)

    def _execute(self, calls: list[Call]) -> list[Any]:
        """Each call's result or exception: one execution for a batch, checked on its
        signature's first use; one by one when the batch fails or disagrees (a signature is
        refused only when its calls succeed one by one)."""
        owned = [self._own(call) for call in calls]
        run = calls[0].run
        if len(calls) == 1:
            return [self._timed(run, owned[0], 1)]
        key = calls[0].key
        try:
            batched = self._timed(run_batched, (run, owned), len(calls))
        except Exception as err:  # noqa: BLE001 - vmap cannot run it, or a call is bad
            single = self._one_by_one(run, owned)
            if not any(isinstance(o, Exception) for o in single):
                self.pool.refuse(key, f"{type(err).__name__}: {err}")
            return single
        if key not in self.pool.verified:
            single = self._one_by_one(run, owned)
            if any(isinstance(o, Exception) for o in single):
                return single
            if not same_results(batched, single):
                self.pool.refuse(key, "batched results differ from one-by-one results")
                return single
            self.pool.verified.add(key)
        return batched

    def _one_by_one(self, run: Callable[..., Any], owned: list[list]) -> list[Any]:
        """Each call run alone: its result, or the exception it raised."""
        outcomes: list[Any] = []
        for args in owned:
            try:
                outcomes.append(self._timed(run, args, 1))
            except Exception as err:  # noqa: BLE001 - this call's own failure
                outcomes.append(err)
        return outcomes

    def _timed(self, function: Callable[..., Any], args: Any, batch: int) -> Any:
        """Call `function(*args)` and book it as one execution of `batch` calls."""
        start, cpu = time.perf_counter(), time.thread_time()
        result = function(*args)
        self.kernel_cpu_s += time.thread_time() - cpu
        self.pool.record_execution(batch, time.perf_counter() - start)
        return result

    def python_cpu_s(self) -> float:
        """CPU seconds this replica's thread spent outside the group's callable: the
        server's own Python (gathering, dispatch, results), which holds the interpreter lock."""
        clock = time.pthread_getcpuclockid(self.thread.ident)  # Linux and most Unixes
        return time.clock_gettime(clock) - self.kernel_cpu_s

    def kill(self) -> list[Call]:
        """Stop at once (a crash): return the calls it had not started."""
        with self.wake:
            self.dead = True
            orphans = list(self.queue)
            self.queue.clear()
            self.wake.notify()
        return orphans


class ReplicaPool:
    """A group's replicas and its dispatch, scaling, fault handling and metrics."""

    def __init__(self, name: str, stateful: bool, budget: Budget,
                 replicas: int = 1, max_batch: int = 1, batch_wait_s: float = 0.05) -> None:
        self.name, self.stateful, self.budget = name, stateful, budget
        self.max_batch = max_batch        # > 1: row-wise calls from several requests batch
        self.batch_wait_s = batch_wait_s
        self.verified: set[Hashable] = set()
        self.refused: set[Hashable] = set()
        self.lock = threading.Lock()
        self.replicas: list[Replica] = []
        self.weight_sources: dict[int, Any] = {}
        self.affinity: dict[int, Replica] = {}  # request -> its replica, while it runs
        self.target = replicas
        self.reset_counters()

    def reset_counters(self) -> None:
        """Start the pool's statistics afresh (after a server's warm-up requests)."""
        with self.lock:
            self.batch_sizes: Counter[int] = Counter()
            self.executions: deque[tuple[int, float]] = deque(maxlen=512)  # (batch, seconds)
            self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, since then
            self.busy_s = 0.0                 # execution seconds of every replica
            self.execution_count = 0          # executions (calls or batches)
            self.arrivals = 0
            self.latencies: deque[float] = deque(maxlen=4096)
            self.completed = 0
            self.retries = 0
            self.created = time.perf_counter()
            for replica in self.replicas:
                replica.busy_s = 0.0

    def forget(self, request: int) -> None:
        """A request has finished: drop its affinity (its replica may go away later)."""
        with self.lock:
            self.affinity.pop(request, None)

    # ---- dispatch ---------------------------------------------------------------------
    def submit(self, call: Call) -> Future:
        """Queue a call on the best replica; returns its future."""
        with self.lock:
            self.arrivals += 1
            if not any(r for r in self.replicas if not r.draining and not r.dead):
                self._grow(max(1, self.target))
            self._choose(call).put(call)
        return call.future

    def execution_samples(self) -> list[tuple[int, float]]:
        """(batch, seconds) of the most recent executions: the group's measured profile."""
        with self.lock:
            return list(self.executions)

    def counters(self) -> dict[str, float]:
        """What the autoscaler reads each interval: arrivals so far (it differences them),
        and the queue and live replicas now."""
        with self.lock:
            return {"arrivals": self.arrivals,
                    "queue": sum(len(r.queue) for r in self.replicas),
                    "replicas": sum(1 for r in self.replicas if not r.draining and not r.dead)}

    def mean_execution_s(self) -> float:
        """Mean seconds of one execution (a call or a batch) so far; 1 ms before any."""
        # plain attributes, read without the lock: the budget asks while holding its own
        count = self.execution_count
        return self.busy_s / count if count else 1e-3

    def refuse(self, key: Hashable, reason: str) -> None:
        """Stop batching calls of this signature (they run one by one), with a warning."""
        with self.lock:
            if key in self.refused:
                return
            self.refused.add(key)
        log.warning("group %s: calls of one shape run one by one from now on (%s)",
                    self.name, reason)

    def _choose(self, call: Call, avoid: Replica | None = None) -> Replica:
        """Affinity for stateful groups, else the shortest queue (capacity-weighted: every
        CPU replica has one thread, so weight 1)."""
        live = [r for r in self.replicas if not r.draining and not r.dead and r is not avoid]
        if not live:
            live = [r for r in self.replicas if not r.draining and not r.dead]
        if self.stateful and call.request is not None:
            pinned = self.affinity.get(call.request)
            if pinned in live:
                return pinned
            # first call, or its replica is draining/dead: (re)pin; the KV cache lives with
            # the request, so moving it is a pointer change
            pinned = min(live, key=Replica.load)
            self.affinity[call.request] = pinned
            return pinned
        return min(live, key=Replica.load)

    # ---- faults ---------------------------------------------------------------------------
    def failed(self, replica: Replica, call: Call, err: Exception) -> None:
        """Retry a failed call once on another replica, then report it."""
        call.attempts += 1
        if call.attempts > 1:
            call.future.set_exception(GroupError(
                f"group {self.name} failed twice (replicas retried once): "
                f"{type(err).__name__}: {err}"))
            return
        with self.lock:
            self.retries += 1
            if self.stateful and call.request is not None:
                self.affinity.pop(call.request, None)
            self._choose(call, avoid=replica).put(call)

    def kill(self, index: int = 0) -> None:
        """Crash one replica (fault injection): its queued calls move to the others."""
        with self.lock:
            live = [r for r in self.replicas if not r.dead]
            victim = live[index % len(live)]
            orphans = victim.kill()
            self.replicas.remove(victim)
            if not any(not r.draining for r in self.replicas):
                self._grow(1)
            for call in orphans:
                self._choose(call).put(call)

    # ---- scaling ------------------------------------------------------------------------
    def scale(self, replicas: int) -> None:
        """Live resize: new replicas copy the weights; removed ones drain their queues."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or \
                not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"group {self.name}: replicas must be >= 1 and at most "
                             f"{MAX_REPLICAS}, got {replicas!r}")
        with self.lock:
            self.target = replicas
            live = [r for r in self.replicas if not r.draining and not r.dead]
            if replicas > len(live):
                self._grow(replicas - len(live))
            surplus = max(0, len(live) - replicas)
            for replica in sorted(live, key=Replica.load)[:surplus]:
                with replica.wake:
                    replica.draining = True
                    replica.wake.notify()

    def retired(self, replica: Replica) -> None:
        """A drained or killed replica's thread has ended: forget it."""
        with self.lock:
            if replica in self.replicas:
                self.replicas.remove(replica)
            for request in [r for r, pinned in self.affinity.items() if pinned is replica]:
                del self.affinity[request]

    def _grow(self, count: int) -> None:
        """Add replicas (caller holds the lock)."""
        for _ in range(count):
            self.replicas.append(Replica(self, dict(self.weight_sources)))

    def close(self) -> None:
        """Drain every replica and wait for it."""
        with self.lock:
            for replica in self.replicas:
                with replica.wake:
                    replica.draining = True
                    replica.wake.notify()
            threads = [r.thread for r in self.replicas]
        for thread in threads:
            thread.join()

    # ---- metrics --------------------------------------------------------------------------
    def record_execution(self, batch: int, seconds: float) -> None:
        """Book one execution (a call or a batch): the group's measured profile."""
        with self.lock:
            self.busy_s += seconds
            self.batch_sizes[batch] += 1
            self.execution_count += 1
            self.executions.append((batch, seconds))

    def record_done(self, calls: list[Call]) -> None:
        """Book completed calls: their count and queue + execution latency."""
        now = time.perf_counter()
        with self.lock:
            for call in calls:
                latency = now - call.queued_at
                self.latencies.append(latency)
                self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
            self.completed += len(calls)

    def _histogram(self) -> dict[str, int]:
        """Cumulative counts of every call's latency at or below each bound (and +Inf), as
        Prometheus histograms are: they only grow (caller holds the lock)."""
        running, counts = 0, {}
        for bound, count in zip([*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"],
                                self.latency_counts):
            running += count
            counts[bound] = running
        return counts

    def stats(self) -> dict[str, Any]:
        """Replicas, queue, utilisation, completed calls, latency percentiles, ready times."""
        with self.lock:
            live = [r for r in self.replicas if not r.draining and not r.dead]
            latencies = list(self.latencies)
            elapsed = max(1e-9, time.perf_counter() - self.created)
            return {
                "replicas": len(live), "draining": len(self.replicas) - len(live),
                "queue": sum(len(r.queue) for r in self.replicas),
                "completed": self.completed, "retries": self.retries,
                "batches": self.execution_count,
                "batch_mean": sum(b * n for b, n in self.batch_sizes.items())
                / max(1, self.execution_count),
                "execution_mean_s": self.mean_execution_s(),
                "execution_s": self.busy_s,
                "python_cpu_s": sum(r.python_cpu_s() for r in live)
                if hasattr(time, "pthread_getcpuclockid") else None,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "utilisation": sum(r.busy_s for r in self.replicas) / elapsed / max(1, len(live)),
                "latency_p50_s": quantile(latencies, 0.5),
                "latency_p99_s": quantile(latencies, 0.99),
                "latency_histogram": self._histogram(),
                "weight_bytes_per_replica": live[0].bytes if live else 0,
                "replica_ready_s": [r.ready_s for r in live],
            }


