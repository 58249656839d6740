"""The local executor: each replica is a thread of this process holding its own copy of its
group's state, placed on one of the deployment's devices (contracts/placement.py):
its state counts against that device's memory, and its executions take that device's slots.

A call split into several parts runs them on their replicas' threads side by side; a call of
one part runs on the caller's thread with that replica's state (no hand-over). A part that
raises is run once more (a dense part on another replica when there is one); if it fails
again, a GroupError names the group and the tokens of the part."""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from fxscale.contracts.metrics import CALL_BUCKETS_S, Histogram, quantile
from fxscale.contracts.placement import Demand, Placement


@dataclass(frozen=True)
class StateSlots:
    """Which arguments of a call are the model's state: weights and buffers (copied per
    replica) and KV caches (each replica its own, zeroed)."""

    indices: tuple[int, ...]
    caches: frozenset[int]  # the indices that are KV caches


class GroupError(RuntimeError):
    """A group's call failed twice; `tokens` is the range of the step's tokens it held."""

    def __init__(self, group: str, tokens: tuple[int, int] | None, cause: BaseException):
        where = f" (tokens {tokens[0]}-{tokens[1]} of the step)" if tokens else ""
        super().__init__(f"group {group!r} failed{where}: {type(cause).__name__}: {cause}")
        self.group, self.tokens = group, tokens


class StateLostError(GroupError):
    """Replicas died with the KV blocks they held (replicas of another process; a process
    may host several): their requests must be recomputed, not retried on empty blocks."""

    def __init__(self, group: str, replicas: Iterable[int], cause: BaseException) -> None:
        super().__init__(group, None, cause)
        self.lost_replicas, self.cause = frozenset(replicas), cause


class LocalReplica:
    """A worker thread with its own state: for each state tensor of the model (by id), this
    replica's copy (replica 0 of a pool holds the model's own tensors); its calls take the
    slots of its device."""

    defers = False  # a replica elsewhere may submit calls and settle them with the step

    def __init__(self, key: int, slots: threading.Semaphore, name: str, device: int = 0
                 ) -> None:
        self.key, self.slots, self.device = key, slots, device
        self.state: dict[int, torch.Tensor] = {}
        self.inbox: queue.Queue = queue.Queue()
        self.executions, self.busy_s = 0, 0.0
        self.thread = threading.Thread(target=self._loop, name=f"fxscale-{name}-{key}",
                                       daemon=True)
        self.thread.start()
        self.location: dict[str, Any] = {"process": os.getpid(), "device": device}

    def take(self, known: dict[int, tuple[torch.Tensor, bool]]) -> None:
        """Hold its copies of these model state tensors (id -> (tensor, is a KV cache)) it
        does not hold yet: replica 0 the tensors themselves, others a copy of each weight
        and a zeroed cache."""
        for ident, (tensor, cache) in known.items():
            if ident not in self.state:
                self.state[ident] = tensor if self.key == 0 else \
                    torch.zeros_like(tensor) if cache else tensor.clone()

    def run(self, fn: Callable[..., Any], args: list[Any], state: StateSlots,
            at_least_s: float = 0.0) -> Future:
        """Queue a call on this replica's thread."""
        future: Future = Future()
        self.inbox.put((fn, args, state, at_least_s, future))
        return future

    def run_here(self, fn: Callable[..., Any], args: list[Any], state: StateSlots,
                 at_least_s: float = 0.0) -> tuple[Any, float]:
        """Run a call on the caller's thread with this replica's copies in place of the
        model's state tensors (the argument indices in `state`), holding its slot for at
        least `at_least_s` (an injected service time); (result, seconds)."""
        with self.slots:
            start = time.perf_counter()
            try:
                result = self.execute(fn, args, state)
                left = at_least_s - (time.perf_counter() - start)
                if left > 0:
                    time.sleep(left)  # releases the interpreter lock, as a kernel would
            finally:
                seconds = time.perf_counter() - start
                self.executions += 1
                self.busy_s += seconds
        return result, seconds

    def execute(self, fn: Callable[..., Any], args: list[Any], state: StateSlots) -> Any:
        """fn on args, its own copies in place of the model's state tensors."""
        for index in state.indices:
            args[index] = self.state[id(args[index])]
        return fn(*args)

    def _loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            fn, args, state, at_least_s, future = item
            try:
                future.set_result(self.run_here(fn, args, state, at_least_s))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                future.set_exception(err)

    def stop(self) -> None:
        """Finish queued calls, end the thread, drop the state."""
        self.inbox.put(None)
        self.thread.join()
        self.state = {}

    def state_bytes(self, caches: set[int]) -> tuple[int, int]:
        """Bytes of the weights and of the KV caches it holds (`caches`: ids of the model's
        cache tensors)."""
        return split_bytes(self.state, caches)


class LocalPool:
    """The replicas of one group (see the module docstring). The model's state tensors a
    group's calls pass are learnt from the calls; replica 0 holds the model's own, a new
    replica copies the weights and zeroes the KV caches it knows of when it starts (and any
    tensor first seen later, on first use). Each replica is placed on a device when it starts
    (an attention replica next to its other layers) and frees that memory when it stops."""

    def __init__(self, name: str, stateful: bool, placement: Placement,
                 service: Callable[[int, int], float] | None = None,
                 replica: Callable[..., LocalReplica] = LocalReplica) -> None:
        self.name, self.stateful, self.placement = name, stateful, placement
        # what starts a replica: (key, device slots, group, device) -> a LocalReplica, or
        # one of its kind that runs elsewhere (runtime/executors/ray_executor.py)
        self.new_replica = replica
        # service-time injection: (tokens, context tokens) -> seconds an execution takes
        self.service = service
        self.known: dict[int, tuple[torch.Tensor, bool]] = {}  # id -> (tensor, is a cache)
        self.replicas: dict[int, LocalReplica] = {}
        self.draining: set[int] = set()  # attention replicas admitting nothing, not serving
        self.target = 1
        self.next_key = 0
        self.lock = threading.Lock()
        self.ready_s: list[float] = []  # time each new replica took to take its state
        self.max_batch = 1 << 16  # tokens: a step's are split, never queued
        self.called = False       # replicas start at the first call (its state is known)
        self.reset_counters()

    def reset_counters(self) -> None:
        """Start the statistics afresh (after a warm-up)."""
        # (tokens, context tokens read, seconds): attention's time grows with its context
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=512)
        self.histogram = Histogram(CALL_BUCKETS_S)
        self.arrivals = 0      # tokens run
        self.executions = 0
        self.busy_s = 0.0
        self.retries = 0
        self.started = time.perf_counter()

    # ---- replicas ------------------------------------------------------------------------------
    def learn(self, args: list[Any], state: StateSlots) -> None:
        """Note the model's state tensors of a call and give every replica its copies; a
        dense group starts its replicas at its first call."""
        new = [i for i in state.indices if id(args[i]) not in self.known]
        if new:
            with self.lock:
                for i in new:
                    self.known[id(args[i])] = (args[i], i in state.caches)
                added = {id(args[i]): self.known[id(args[i])] for i in new}
                for replica in self.replicas.values():
                    replica.take(added)
                    self.placement.charge(self.name, replica.key, *known_bytes(added))
        if not self.called:
            self.called = True
            if not self.stateful:
                self.scale(self.target)

    def demand(self, key: int) -> Demand:
        """What a replica with this key would hold (to place it, or to check it would fit)."""
        with self.lock:
            weights, kv = known_bytes(self.known)
        return Demand(self.name, key, weights, kv, key if self.stateful else None)

    def add(self, key: int) -> None:
        """Start a replica with this key (an attention replica: the scheduler's replica id)
        on a device with room (PlacementError when none has)."""
        start = time.perf_counter()
        device = self.placement.place(self.demand(key))
        replica = None
        try:
            replica = self.new_replica(key, self.placement.slots[device], self.name, device)
            with self.lock:
                replica.take(dict(self.known))
                self.replicas[key] = replica
                self.next_key = max(self.next_key, key + 1)
        except BaseException:  # nothing of a replica that did not start stays behind
            if replica is not None:
                replica.stop()
            self.placement.release(self.name, key)
            raise
        self.ready_s.append(time.perf_counter() - start)

    def remove(self, key: int) -> None:
        """Stop the replica with this key and free its device's memory."""
        with self.lock:
            replica = self.replicas.pop(key)
            self.draining.discard(key)
        replica.stop()
        self.placement.release(self.name, key)

    def additions(self, replicas: int, replace: list[int] = ()) -> list[Demand]:
        """The replicas `scale(replicas, replace)` would start (to check they fit first)."""
        keys = range(self.next_key, self.next_key + replicas - len(self._kept(replace))) \
            if self.called else ()
        return [self.demand(key) for key in keys]

    def removals(self, replicas: int, replace: list[int] = ()) -> list[tuple[str, int]]:
        """The replicas `scale(replicas, replace)` would stop, as (group, key): those in
        `replace`, then the newest."""
        kept = self._kept(replace)
        with self.lock:
            keys = sorted(self.replicas)
        return [(self.name, key) for key in keys if key not in kept[:replicas]]

    def _kept(self, replace: list[int]) -> list[int]:
        """The replicas that stay when those keyed in `replace` go, oldest first."""
        with self.lock:
            return sorted(k for k in self.replicas if k not in replace)

    def scale(self, replicas: int, replace: list[int] = ()) -> None:
        """Have this many replicas (a dense group; started once its state is known); those
        keyed in `replace` (on a device the group may no longer use) stop first."""
        self.target = replicas
        if not self.called:
            return
        for _, key in self.removals(replicas, replace):
            self.remove(key)
        while len(self.replicas) < replicas:
            self.add(self.next_key)

    # ---- calls -----------------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], parts: list[tuple[int | None, list[Any],
                                                      tuple[int, int], int]],
            state: StateSlots) -> list[Any]:
        """Run fn on each part (replica key or None, arguments, token range, context
        tokens); results in order. A failing part runs once more, then raises GroupError."""
        keys = self._keys(parts)
        floors = [self.service(t1 - t0, context) if self.service else 0.0
                  for _, _, (t0, t1), context in parts]
        if self.replicas[keys[0]].defers:  # handles to results where they run (Ray's)
            return [self.replicas[k].submit(fn, list(args), state, floor, self, tokens,
                                            context)
                    for k, (_, args, tokens, context), floor in zip(keys, parts, floors)]
        if len(parts) == 1:
            futures = [None]
        else:
            futures = [self.replicas[k].run(fn, list(args), state, floor)
                       for k, (_, args, _, _), floor in zip(keys, parts, floors)]
        results = []
        for key, future, (_, args, tokens, context), floor in zip(keys, futures, parts,
                                                                   floors):
            try:
                result, seconds = self.replicas[key].run_here(fn, list(args), state, floor) \
                    if future is None else future.result()
            except StateLostError:
                raise  # its KV blocks are gone: the engine recomputes its requests
            except Exception as first:  # noqa: BLE001 - retried once, then named
                result, seconds = self._retry(fn, key, args, tokens, state, first)
            results.append(result)
            self.record(tokens[1] - tokens[0], context, seconds)
        return results

    def record(self, tokens: int, context: int, seconds: float) -> None:
        """Count one execution of `tokens` tokens that read `context` KV tokens."""
        with self.lock:
            self.samples.append((tokens, context, seconds))
            self.arrivals += tokens
            self.executions += 1
            self.busy_s += seconds
            self.histogram.observe(seconds)

    def _keys(self, parts) -> list[int]:
        """The replica of each part: its key, or the dense replicas in turn."""
        dense = sorted(self.replicas)
        return [key if key is not None else dense[i % len(dense)]
                for i, (key, _, _, _) in enumerate(parts)]

    def _retry(self, fn, key, args, tokens, state: StateSlots, first: BaseException) -> Any:
        """Run a failed part once more: on another dense replica if there is one."""
        others = [k for k in self.replicas if k != key] if not self.stateful else []
        self.retries += 1
        try:
            return self.replicas[others[0] if others else key].run_here(fn, list(args), state)
        except Exception:  # noqa: BLE001 - the second failure is the caller's error
            raise GroupError(self.name, tokens, first) from first

    def counters(self) -> dict[str, float]:
        """What the autoscaler reads each interval: tokens run so far (it differences them),
        the queue (none: a step's tokens are split, not queued) and the replicas now."""
        return {"arrivals": self.arrivals, "queue": 0,
                "replicas": len(self.replicas.keys() - self.draining)}

    def execution_samples(self) -> list[tuple[int, float]]:
        """Recent executions: (tokens, seconds)."""
        with self.lock:
            return [(tokens, seconds) for tokens, _, seconds in self.samples]

    def context_execution_samples(self) -> list[tuple[int, int, float]]:
        """Recent executions: (tokens, context tokens read, seconds)."""
        with self.lock:
            return list(self.samples)

    def held(self) -> list[tuple[int, int, int]]:
        """(device, weight bytes, KV bytes) of the state each replica holds now, measured
        from its tensors."""
        caches = {ident for ident, (_, cache) in self.known.items() if cache}
        return [(r.device, *r.state_bytes(caches)) for r in list(self.replicas.values())]

    def stats(self) -> dict[str, Any]:
        """Replicas, executions, tokens per execution, latency, state bytes per replica."""
        samples = self.execution_samples()
        with self.lock:
            histogram = self.histogram.report()
            executions, busy = self.executions, self.busy_s
        replicas = list(self.replicas.values())
        caches = {ident for ident, (_, cache) in self.known.items() if cache}
        weights, kv = replicas[-1].state_bytes(caches) if replicas else (0, 0)
        wall = max(time.perf_counter() - self.started, 1e-9)
        seconds = [t for _, t in samples]
        return {"replicas": len(replicas), "target": self.target, "stateful": self.stateful,
                "completed": executions, "retries": self.retries, "queue": 0,
                "busy_s": busy, "execution_mean_s": busy / executions if executions else None,
                "utilisation": busy / wall / max(1, len(replicas)),
                "batch_mean": (sum(n for n, _ in samples) / len(samples)) if samples else None,
                "latency_p50_s": quantile(seconds, 0.5), "latency_p99_s": quantile(seconds, 0.99),
                "latency_histogram": histogram,
                "weight_bytes_per_replica": weights, "kv_bytes_per_replica": kv,
                "time_to_ready_s": self.ready_s[-1] if self.ready_s else None,
                "locations": {str(r.key): r.location for r in replicas}}

    def stop(self) -> None:
        """Stop every replica and forget the model's state."""
        for key in list(self.replicas):
            self.remove(key)
        self.known.clear()


def known_bytes(known: dict[int, tuple[torch.Tensor, bool]]) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) of state tensors given as id -> (tensor, is a cache)."""
    return split_bytes({ident: tensor for ident, (tensor, _) in known.items()},
                       {ident for ident, (_, cache) in known.items() if cache})


def split_bytes(by_id: dict[int, torch.Tensor], caches: set[int]) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) of these tensors (`caches`: ids of the KV caches)."""
    weights = kv = 0
    for ident, tensor in by_id.items():
        size = tensor.numel() * tensor.element_size()
        if ident in caches:
            kv += size
        else:
            weights += size
    return weights, kv
