"""Replica pools: one per operator group, each replica a worker with its own copy of the
group's weights, fed by capacity-weighted shortest-queue dispatch.

A call carries the group's compiled callable, its arguments and which of them are weights.
A replica substitutes its own copies of those weights (materialised when it is created, so
its time to ready is the time to copy its group's bytes) and runs the callable. Stateful
groups keep each request on one replica (affinity). A replica that raises has its call
retried once on another replica; a second failure reaches the caller as a GroupError naming
the group and the cause. Scale-down drains: a removed replica finishes its queue first.
Execution threads are bounded by a shared budget (a semaphore): replicas are logical, the
budget is what runs at once.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class GroupError(RuntimeError):
    """A group failed on two replicas: names the group and the cause."""


@dataclass
class Call:
    """One invocation of a group: what to run, on which arguments, for which request."""

    run: Callable[..., Any]
    args: tuple
    weights: tuple[int, ...]          # positions of weight tensors among args
    request: int | None
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
        self.calls = 0
        start = time.perf_counter()
        self.weights = {key: t.clone() for key, t in weights.items()}
        self.ready_s = time.perf_counter() - start
        self.bytes = sum(t.numel() * t.element_size() for t in self.weights.values())
        self.thread = threading.Thread(target=self._loop, name=f"{pool.name}#{self.id}",
                                       daemon=True)
        self.thread.start()

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
                call = self.queue.popleft()
            self._run(call)
        self.pool.retired(self)

    def _own(self, call: Call) -> list:
        """The call's arguments with this replica's weight copies in place of the originals."""
        args = list(call.args)
        for position in call.weights:
            source = args[position]
            mine = self.weights.get(id(source))
            if mine is None:  # a weight first seen after this replica was created
                mine = self.weights[id(source)] = source.clone()
                self.pool.weight_sources[id(source)] = source
            args[position] = mine
        return args

    def _run(self, call: Call) -> None:
        """Execute one call under the execution budget; hand failures to the pool."""
        with self.pool.budget:
            start = time.perf_counter()
            try:
                if self.broken or (self.fail_next and not call.attempts):
                    self.fail_next -= not self.broken
                    raise RuntimeError(f"injected fault in replica {self.id}")
                result = call.run(*self._own(call))
            except Exception as err:  # noqa: BLE001 - any failure is retried or reported
                self.pool.failed(self, call, err)
                return
            finally:
                elapsed = time.perf_counter() - start
                self.busy_s += elapsed
                self.calls += 1
        self.pool.record(call, elapsed)
        call.future.set_result(result)

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

    def __init__(self, name: str, stateful: bool, budget: threading.Semaphore,
                 replicas: int = 1) -> None:
        self.name, self.stateful, self.budget = name, stateful, budget
        self.lock = threading.Lock()
        self.replicas: list[Replica] = []
        self.weight_sources: dict[int, Any] = {}
        self.affinity: dict[int, Replica] = {}
        self.latencies: deque[float] = deque(maxlen=4096)
        self.completed = 0
        self.retries = 0
        self.created = time.perf_counter()
        self.target = replicas

    # ---- dispatch ---------------------------------------------------------------------
    def submit(self, call: Call) -> Future:
        """Queue a call on the best replica; returns its future."""
        with self.lock:
            if not any(r for r in self.replicas if not r.draining and not r.dead):
                self._grow(max(1, self.target))
            self._choose(call).put(call)
        return call.future

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
            pinned = min(live, key=lambda r: len(r.queue))
            self.affinity[call.request] = pinned
            return pinned
        return min(live, key=lambda r: len(r.queue))

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
        if replicas < 1:
            raise ValueError(f"group {self.name}: replicas must be >= 1, got {replicas}")
        with self.lock:
            self.target = replicas
            live = [r for r in self.replicas if not r.draining and not r.dead]
            if replicas > len(live):
                self._grow(replicas - len(live))
            surplus = max(0, len(live) - replicas)
            for replica in sorted(live, key=lambda r: len(r.queue))[:surplus]:
                with replica.wake:
                    replica.draining = True
                    replica.wake.notify()

    def retired(self, replica: Replica) -> None:
        """A drained or killed replica's thread has ended: forget it."""
        with self.lock:
            if replica in self.replicas:
                self.replicas.remove(replica)

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
    def record(self, call: Call, elapsed: float) -> None:
        """Book one completed call."""
        with self.lock:
            self.completed += 1
            self.latencies.append(time.perf_counter() - call.queued_at)

    def stats(self) -> dict[str, Any]:
        """Replicas, queue, utilisation, completed calls, latency percentiles, ready times."""
        with self.lock:
            live = [r for r in self.replicas if not r.draining and not r.dead]
            latencies = sorted(self.latencies)
            elapsed = max(1e-9, time.perf_counter() - self.created)
            return {
                "replicas": len(live), "draining": len(self.replicas) - len(live),
                "queue": sum(len(r.queue) for r in self.replicas),
                "completed": self.completed, "retries": self.retries,
                "utilisation": sum(r.busy_s for r in self.replicas) / elapsed / max(1, len(live)),
                "latency_p50_s": _quantile(latencies, 0.5),
                "latency_p99_s": _quantile(latencies, 0.99),
                "weight_bytes_per_replica": live[0].bytes if live else 0,
                "replica_ready_s": [r.ready_s for r in live],
            }


def _quantile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values (None when empty)."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
