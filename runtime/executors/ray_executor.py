"""The Ray executor: each replica of a group is a Ray actor, a process of its own on a node of
a Ray cluster, holding only its group's state (weights; an attention replica its KV blocks).

The engine, the scheduler and the pools stay in the server's process: a pool's replica here
is a `RayReplica`, the local replica whose executions are calls of its actor. The model's
weights go into Ray's object store once (numpy views of the tensors, bf16 as 16-bit
integers) and every actor maps them from there without a copy, so a new replica's time to
ready is the bytes it maps plus an actor start, not a model load; KV caches are allocated
zeroed in the actor and never leave it. A group's function (its FX graph) is sent to an actor
once.

A step's activations pass from actor to actor: a group call returns a `Handle` (Ray's ref to
its result, still in the actor or the object store), the calls that consume it are sent that
handle, and Ray hands the data over when it is ready. The server submits a whole step
without waiting and waits once, for the step's logits (`RayExecutor.settle`), where each
call's time in its actor is recorded and failures are sorted out. `pass_handles=False` brings
every result back to the server instead (one round trip per call, measured against).
Consecutive calls in one actor (`actors="device"`: the groups placed on a device share its
process) are one Ray task: the server holds a call back while the next goes to the same actor
and sends the run as one task when a call goes elsewhere or the step settles (`fuse_runs=False`
sends every call as a task of its own, measured against; with one actor per replica every
call is sent at once). The actor keeps each call's result
for the step (until the stepping thread's next step), and a call it feeds in the same actor
is sent only its number and reads the result in place (`local_handoff=False` sends Ray's ref
instead, one task per call, measured against). A call whose function raises returns its
error as its result (`Failed`), so the calls after it in the run still run, and each error
names the group that raised it.

Each device of the deployment (fxscale.Devices) is one bundle of a Ray placement group
(spread over the cluster's nodes; with `Devices.per_node`, one packed group per node), and a
replica placed on device d runs in device d's bundle, so the fxscale placement (and a plan
pinning groups to devices) decides which node each group runs on. An actor that dies is
replaced at the next call: a dense replica's call is then run again, an attention replica's
requests are recomputed (their KV blocks went with it; StateLostError).

Without an address, a local Ray instance is started on 127.0.0.1 (no dashboard) and stopped
by close(); with one, the executor joins that cluster and leaves it running.
`compiled_graph=True` runs steps whose shape repeats as one Ray Compiled Graph
(compiled_graph.py). Nothing else in fxscale imports Ray, nor either module (an optional
extra: pip install "fxscale[ray]")."""
from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fxscale.contracts.devices import Devices
from fxscale.runtime.executors.local import (
    GroupError,
    LocalPool,
    LocalReplica,
    StateLostError,
    StateSlots,
    known_bytes,
)

try:
    import ray
    from ray._private import ray_constants
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as missing:  # pragma: no cover - the error says how to install it
    raise ImportError('backend="ray" needs Ray: pip install "fxscale[ray]"') from missing

from fxscale.runtime.executors.compiled_graph import CompiledSteps  # noqa: E402 - needs Ray

READY_TIMEOUT_S = 120.0  # the placement group's bundles and an actor's start
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class Shipped:
    """A tensor between processes as a numpy array, which Ray moves without pickling its
    bytes (a torch tensor it pickles: 2-3x slower at a few MB); bf16 as int16."""

    array: np.ndarray
    dtype: str


def pack(value: Any) -> Any:
    """Tensors in a value (nested in lists and tuples) as Shipped arrays."""
    if isinstance(value, torch.Tensor):
        return Shipped(to_shared(value), dtype_name(value))
    if isinstance(value, (list, tuple)):
        return type(value)(pack(v) for v in value)
    return value


def unpack(value: Any, device: str = "cpu") -> Any:
    """The tensors of a packed value, writable copies of their own on `device`."""
    if isinstance(value, Shipped):
        return from_shared(np.array(value.array), value.dtype).to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(unpack(v, device) for v in value)
    return value


@dataclass(frozen=True)
class Failed:
    """What a call that raised returns in place of its result and its seconds: its error,
    and the number of the call that raised it (`origin`; a call that read a failed result
    returns the producer's Failed: one failure, named for the group that raised)."""

    error: Exception
    origin: int | None = None


class Inherited(Exception):
    """Raised in a call that reads a failed result: the producer's failure."""

    def __init__(self, failed: Failed) -> None:
        super().__init__(repr(failed.error))
        self.failed = failed


def sendable(error: BaseException) -> Exception:
    """An error that survives pickling to the server: itself, or a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - whatever pickling raises, the error is told in text
        return RuntimeError(f"{type(error).__name__}: {error}")


class Pending:
    """The ref of a call's result, known once the run holding the call is sent."""

    ref: Any = None


@dataclass(frozen=True)
class Handle:
    """A tensor a group call produces, where that call runs: Ray's ref to the call's result
    (`ref`, or a `Pending` one while the call's run is held back; sent to an actor: `slot`,
    its place in the call's inputs), which of its outputs
    (`index`), the tokens of the part it ran (`rows`, along the output's token dim), and the
    actor it ran in (`home`, an actor id) with its number there (`call`): sent to that same
    actor, a handle has no ref and no slot, and the actor reads its own kept result."""

    ref: Any = None
    index: int | None = None
    rows: int | None = None
    slot: int | None = None
    home: str | None = None
    call: int | None = None

    def __getitem__(self, index: int) -> Handle:
        return replace(self, index=index)

    def narrow(self, dim: int, start: int, length: int) -> Any:
        return Narrowed(self, dim, start, length)

    @staticmethod
    def joined(parts: tuple[Any, ...], dim: int) -> Joined:
        """Parts concatenated along dim (merge's torch.cat, lazily)."""
        return Joined(tuple(parts), dim)


@dataclass(frozen=True)
class Narrowed:
    """Tokens [start, start + length) of a lazy tensor along dim."""

    value: Any
    dim: int
    start: int
    length: int

    def narrow(self, dim: int, start: int, length: int) -> Any:
        return Narrowed(self, dim, start, length)


@dataclass(frozen=True)
class Joined:
    """Lazy tensors (parts of one call, in token order) concatenated along dim."""

    parts: tuple[Any, ...]
    dim: int

    def narrow(self, dim: int, start: int, length: int) -> Any:
        """A slice of the parts it overlaps only, when their token counts are known: a
        consumer is sent only the tokens it reads."""
        rows = [getattr(p, "rows", None) for p in self.parts]
        if dim != self.dim or None in rows:
            return Narrowed(self, dim, start, length)
        taken, offset = [], 0
        for part, count in zip(self.parts, rows):
            lo, hi = max(start, offset), min(start + length, offset + count)
            if lo < hi:
                taken.append(part if (lo, hi) == (offset, offset + count)
                             else Narrowed(part, dim, lo - offset, hi - lo))
            offset += count
        return taken[0] if len(taken) == 1 else Joined(tuple(taken), dim)


def send_handles(value: Any, refs: list[Any], home: str | None = None) -> Any:
    """A value with each handle's ref moved to `refs` (Ray resolves refs that are a call's
    own arguments before the call runs) and the handle pointing at its slot there; a handle
    whose call ran in actor `home` (the one the value goes to) keeps only its number."""
    if isinstance(value, Handle):
        if home is not None and value.home == home:
            return replace(value, ref=None, home=None)
        ref = value.ref  # a Pending stays one until its run is sent (Ledger.send_run)
        if isinstance(ref, Pending) and ref.ref is not None:
            ref = ref.ref
        slot = next((i for i, r in enumerate(refs) if r is ref), None)
        if slot is None:
            slot = len(refs)
            refs.append(ref)
        return replace(value, ref=None, home=None, call=None, slot=slot)
    if isinstance(value, Narrowed):
        return replace(value, value=send_handles(value.value, refs, home))
    if isinstance(value, Joined):
        return replace(value, parts=tuple(send_handles(p, refs, home) for p in value.parts))
    if isinstance(value, (list, tuple)):
        return type(value)(send_handles(v, refs, home) for v in value)
    return value


def receive_handles(value: Any, inputs: tuple[Any, ...], device: str,
                    kept: dict[int, Any] | None = None) -> Any:
    """The tensors a value's handles stand for, from the call's resolved inputs, or from
    `kept` (this actor's results by call number) for a handle without a slot."""
    if isinstance(value, Handle):
        if value.slot is None:
            result = kept_result(kept or {}, value.call)
            return result if value.index is None else result[value.index]
        result = inputs[value.slot]
        if isinstance(result, Failed):  # the producer's failure, raised in its reader
            raise Inherited(result)
        return unpack(result if value.index is None else result[value.index], device)
    if isinstance(value, Narrowed):
        return receive_handles(value.value, inputs, device, kept).narrow(
            value.dim, value.start, value.length)
    if isinstance(value, Joined):
        return torch.cat([receive_handles(p, inputs, device, kept) for p in value.parts],
                         dim=value.dim)
    if isinstance(value, (list, tuple)):
        return type(value)(receive_handles(v, inputs, device, kept) for v in value)
    return value


def kept_result(kept: dict[int, Any], call: int) -> Any:
    """A result this actor kept; Inherited with its call's Failed when it failed."""
    if call not in kept:
        raise RuntimeError(f"call {call}'s result is not kept in this actor (a call reads the "
                           "kept results of its own step only)")
    result = kept[call]
    if isinstance(result, Failed):
        raise Inherited(result)
    return result


@dataclass
class Submitted:
    """One group call of a step, not waited for yet: the replica, actor and pool it ran on,
    its tokens and context tokens, its number, the ref its handles wait for and the ref of
    its seconds in the actor (both once its run is sent)."""

    replica: RayReplica
    actor: Any  # the actor it was sent to (the replica's may be replaced since)
    pool: LocalPool
    tokens: tuple[int, int]
    context: int
    call: int
    result: Pending = field(default_factory=Pending)
    seconds: Any = None


@dataclass
class Run:
    """Consecutive calls of a step to one actor, held back to be sent as one task: each
    call's arguments (handles to other actors' results as slots of `refs`) and its ledger
    entry."""

    actor: Any
    home: str  # the actor's id
    calls: list[tuple] = field(default_factory=list)
    refs: list[Any] = field(default_factory=list)
    submitted: list[Submitted] = field(default_factory=list)

    def release(self) -> None:
        """Its calls are sent (or ran, or failed to be sent): their replicas stop waiting."""
        for submitted in self.submitted:
            submitted.replica.release_held()


@dataclass
class Ledger:
    """The calls this thread (its `lane`) has submitted for its step, the run it holds
    back, the step's number, and (`held`, with compiled graphs) the runs closed so far, all
    held back until the step settles."""

    step: int
    lane: int = field(default_factory=threading.get_ident)
    calls: list[Submitted] = field(default_factory=list)
    run: Run | None = None
    held: list[Run] | None = None

    def send(self) -> None:
        """Close the run held back: sent, or with compiled graphs held until the step
        settles (through a graph, or send_held)."""
        run, self.run = self.run, None
        if run is None:
            return
        if self.held is not None:
            self.held.append(run)
        else:
            self.send_run(run)

    def send_held(self) -> None:
        """Send the held runs, in order (each reads only runs before it)."""
        runs, self.held = self.held or [], None
        for run in runs:
            self.send_run(run)

    def release_held(self) -> None:
        """The held runs ran through a graph: their replicas count them sent."""
        runs, self.held = self.held or [], None
        for run in runs:
            run.release()

    def send_run(self, run: Run) -> None:
        """Send a run as one task of its actor: two objects per call (its result and its
        seconds there, read by different places)."""
        try:
            refs = [resolved(ref) for ref in run.refs]
            objects = run.actor.chain.options(num_returns=2 * len(run.calls)).remote(
                self.lane, self.step, run.calls, *refs)
        except Exception as error:  # noqa: BLE001 - e.g. an argument Ray cannot pickle
            failed = ray.put(Failed(sendable(error), run.submitted[0].call))
            objects = [failed] * (2 * len(run.calls))  # settled as the run's failure
        finally:
            run.release()
        for i, submitted in enumerate(run.submitted):
            submitted.result.ref, submitted.seconds = objects[2 * i], objects[2 * i + 1]


def resolved(ref: Any) -> Any:
    """Ray's ref for a Pending one (its run sent before)."""
    if not isinstance(ref, Pending):
        return ref
    if ref.ref is None:
        raise RuntimeError("a call's run was not sent before a call in another actor read "
                           "its result")
    return ref.ref


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Ray processes started inside listen on 127.0.0.1 only: Ray's switch for a machine
    that is not part of a cluster, read by the processes it starts (the environment) and by
    this one (its constant), both restored after."""
    saved_env = os.environ.get(LOOPBACK_SWITCH)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_SWITCH], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = saved_env


def start_private_ray() -> None:
    """Start a Ray instance for this process alone: on 127.0.0.1, no dashboard, this
    machine's CPUs (ray.shutdown() stops it). address="local": a new instance even when
    this machine runs a Ray cluster already (plain ray.init() would join that one, and
    refuse num_cpus)."""
    with loopback_only():
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="ERROR", configure_logging=False,
                 log_to_driver=False)


_connection_lock = threading.Lock()
_connection_users = 0  # executors on the Ray connection an executor made (the last ends it)
_connection_address: str | None = None  # its address (None: the private instance)


def connect(address: str | None) -> bool:
    """Connect this process to Ray for an executor (or one_ray_instance): a private instance
    (no address) or the cluster at `address`, or the connection an earlier user made
    (shared: counted, so the last user to close ends it). False when the process was
    already connected otherwise (ray.init by the user): that connection is left alone."""
    global _connection_users, _connection_address
    with _connection_lock:
        if ray.is_initialized() and _connection_users == 0:
            return False
        if not ray.is_initialized():
            if address is None:
                start_private_ray()
            else:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            _connection_address = address
        elif address != _connection_address:
            where = "a private Ray instance" if _connection_address is None else \
                f"the Ray cluster at {_connection_address}"
            raise ValueError(f"this process already serves on {where} and a process has one "
                             f"Ray connection: serve here with address="
                             f"{_connection_address!r}, or from another process")
        _connection_users += 1
        return True


def disconnect() -> None:
    """A user of the connection (an executor that connected, one_ray_instance) is done: the
    last one stops the private instance, or leaves the cluster it joined (running)."""
    global _connection_users
    with _connection_lock:
        _connection_users -= 1
        if _connection_users == 0 and ray.is_initialized():
            ray.shutdown()


@contextlib.contextmanager
def one_ray_instance() -> Iterator[None]:
    """One private Ray instance for every executor started inside (each would otherwise
    start and stop its own, seconds each): a connection of its own, which the executors
    share (connect), ended at the end; an instance already running is used and left
    running."""
    connected = connect(None)
    try:
        yield
    finally:
        if connected:
            disconnect()


def dtype_name(tensor: torch.Tensor) -> str:
    """'float32', 'bfloat16', ... (a torch attribute name)."""
    return str(tensor.dtype).removeprefix("torch.")


def to_shared(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array the object store keeps (bf16 as int16)."""
    t = tensor.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_shared(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The tensor over an object-store array, without a copy (read-only: group calls never
    write their weights)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


class GroupActor:
    """A process hosting replicas (its own one, or every replica on its device): each
    replica's state by name, and the group functions it was sent."""

    def __init__(self, threads: int, device: str, setup: Callable[[], Any] | None) -> None:
        torch.set_num_threads(threads)
        if setup is not None:  # e.g. register the ops the group functions call
            setup()
        self.device = device
        self.state: dict[str, dict[int, torch.Tensor]] = {}  # replica -> id -> tensor
        self.functions: dict[int, Callable[..., Any]] = {}
        # per stepping thread (lane): its current step and that step's results (or errors)
        self.kept: dict[int, tuple[int, dict[int, Any]]] = {}
        # a compiled graph runs its calls on a thread of its own, beside the actor's
        self.one_at_a_time = threading.Lock()

    def where(self) -> dict[str, Any]:
        """The node, host and process it runs in."""
        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "process": os.getpid()}

    def take(self, replica: str, weights: dict[int, tuple[list, str]],
             caches: dict[int, tuple[tuple[int, ...], str]]) -> None:
        """Map a replica's weights from the object store (id -> ([ref], dtype)) and allocate
        its zeroed KV caches (id -> (shape, dtype))."""
        mapped = {ident: from_shared(ray.get(ref), dtype).to(self.device)
                  for ident, ([ref], dtype) in weights.items()}
        mapped.update({ident: torch.zeros(shape, dtype=getattr(torch, dtype), device=self.device)
                       for ident, (shape, dtype) in caches.items()})
        with self.one_at_a_time:
            self.state.setdefault(replica, {}).update(mapped)

    def run(self, replica: str, key: int, fn: Callable[..., Any] | None, args: list[Any],
            state_ids: dict[int, int]) -> Any:
        """fn (sent once, then known by key) on args, the replica's state in the state
        slots; the result packed to leave the actor."""
        with self.one_at_a_time:
            return pack(self._apply(replica, key, fn, unpack(args, self.device), state_ids))

    def _apply(self, replica: str, key: int, fn: Callable[..., Any] | None, args: list[Any],
               state_ids: dict[int, int]) -> Any:
        if fn is not None:
            self.functions[key] = fn
        state = self.state.get(replica, {})  # a group without state has none
        for index, ident in state_ids.items():
            args[index] = state[ident]
        with torch.no_grad():
            return self.functions[key](*args)

    def chain(self, lane: int, step: int, calls: list[tuple], *inputs: Any) -> tuple:
        """A run of a step's calls in order, each run() with its handles taken from `inputs`
        (other actors' results, resolved by Ray) or from the results kept here; each result
        (or error) kept for later calls of the step; per call (result, seconds it took here),
        two objects: the seconds reach the server, the result only the calls that read it.
        A call that raises returns its error as both (`Failed`); the run goes on."""
        with self.one_at_a_time:
            return self._chain(lane, step, calls, inputs)

    def chain_graph(self, work: tuple, *runs: tuple) -> tuple:
        """chain() as a compiled graph's node: `work` is (lane, step, calls, picks), the
        graph's input for this node; `runs` the outputs of the runs it reads, and each pick
        (which of them, index in its output) one input of the calls, in chain()'s order."""
        lane, step, calls, picks = work
        return self.chain(lane, step, calls, *(runs[run][index] for run, index in picks))

    def _chain(self, lane: int, step: int, calls: list[tuple], inputs: tuple) -> tuple:
        kept = self._kept(lane, step)
        out: list[Any] = []
        for replica, key, fn, args, state_ids, at_least_s, call in calls:
            start = time.perf_counter()
            if fn is not None:  # known from now on, even if this call fails
                self.functions[key] = fn
            try:
                args = unpack(receive_handles(args, inputs, self.device, kept), self.device)
                result = self._apply(replica, key, None, args, state_ids)
                packed = pack(result)
            except Inherited as inherited:
                kept[call] = failed = inherited.failed
            except Exception as error:  # noqa: BLE001 - the server names it and its group
                kept[call] = failed = Failed(sendable(error), call)
            else:
                kept[call] = result
                left = at_least_s - (time.perf_counter() - start)
                if left > 0:  # an injected service time (tests and benchmarks of the engine)
                    time.sleep(left)
                out += [packed, time.perf_counter() - start]
                continue
            out += [failed, failed]
        return tuple(out)

    def _kept(self, lane: int, step: int) -> dict[int, Any]:
        """The results kept for a lane's step; a new step drops the lane's last one (a lane
        sends a step once its last one has settled: every call of it has finished)."""
        current = self.kept.get(lane)
        if current is None or current[0] != step:
            current = self.kept[lane] = (step, {})
        return current[1]

    def drop(self, replica: str) -> None:
        """Forget a replica's state."""
        with self.one_at_a_time:
            self.state.pop(replica, None)


class RayReplica(LocalReplica):
    """A replica whose state and executions live in a Ray actor (its thread here waits
    for the actor's calls, holding its device's slot as a local replica does)."""

    def __init__(self, key: int, slots: threading.Semaphore, name: str, device: int,
                 executor: RayExecutor) -> None:
        actor, where = executor.actor_for(device)  # first: no thread is left if it fails
        super().__init__(key, slots, name, device)
        self.actor, self.location = actor, where
        self.group, self.executor = name, executor
        self.name = f"{name}#{key}"  # its state's name in the actor
        self.known: dict[int, tuple[torch.Tensor, bool]] = {}  # what its actor holds
        self.sent: set[int] = set()  # functions its actor has from it
        self.recovering = threading.Lock()
        self.stopped = False
        self.held = 0  # its calls in runs not sent yet
        self.all_sent = threading.Condition()
        with executor.lock:
            executor.replicas.add(self)

    def hold(self) -> None:
        """Count a call of it held back in a run."""
        with self.all_sent:
            self.held += 1

    def release_held(self) -> None:
        """A held call of it was sent (or failed to be)."""
        with self.all_sent:
            self.held -= 1
            self.all_sent.notify_all()

    def take(self, known: dict[int, tuple[torch.Tensor, bool]]) -> None:
        """Have its actor map these weights and allocate these caches."""
        new = {ident: item for ident, item in known.items() if ident not in self.known}
        if new:
            self._send(new)
            self.known.update(new)

    def state_bytes(self, caches: set[int]) -> tuple[int, int]:
        """Bytes of the weights and KV caches its actor holds (the sizes of the model
        tensors it mirrors)."""
        return known_bytes(self.known)

    def _send(self, known: dict[int, tuple[torch.Tensor, bool]]) -> None:
        weights = {ident: ([self.executor.shared(tensor)], dtype_name(tensor))
                   for ident, (tensor, cache) in known.items() if not cache}
        caches = {ident: (tuple(tensor.shape), dtype_name(tensor))
                  for ident, (tensor, cache) in known.items() if cache}
        ray.get(self.actor.take.remote(self.name, weights, caches), timeout=READY_TIMEOUT_S)

    @property
    def defers(self) -> bool:
        """Whether its pool submits its calls (handles) or executes them (results here)."""
        return self.executor.pass_handles

    def _call(self, fn: Callable[..., Any], args: list[Any], state: StateSlots
              ) -> tuple[int, Callable[..., Any] | None, list[Any], dict[int, int]]:
        """(function key, the function when its actor lacks it, args without the state,
        state slot -> model tensor id) of a call (the actor fills in its own state)."""
        state_ids = {index: id(args[index]) for index in state.indices}
        for index in state_ids:
            args[index] = None
        key = id(fn)
        return key, None if key in self.sent else fn, args, state_ids

    def execute(self, fn: Callable[..., Any], args: list[Any], state: StateSlots) -> Any:
        """fn on args in its actor, the result brought back here (pass_handles=False)."""
        key, sent, args, state_ids = self._call(fn, args, state)
        actor = self.actor  # another thread may replace it meanwhile
        try:
            result = unpack(ray.get(actor.run.remote(
                self.name, key, sent, pack(args), state_ids)), self.executor.device)
        except ray.exceptions.RayActorError as died:
            raise self.recover(actor, died) from died
        self.sent.add(key)
        return result

    def submit(self, fn: Callable[..., Any], args: list[Any], state: StateSlots,
               at_least_s: float, pool: LocalPool, tokens: tuple[int, int], context: int
               ) -> Handle:
        """fn on args in its actor, not waited for: a handle to its result (the step's
        settle() records it or sorts out its failure)."""
        key, sent, args, state_ids = self._call(fn, args, state)
        actor = self.actor  # another thread may replace it meanwhile
        home = actor._actor_id.hex()
        executor, ledger = self.executor, self.executor.ledger()
        if ledger.run is not None and ledger.run.home != home:
            ledger.send()  # first: this call's arguments may read that run's results
        run = ledger.run = ledger.run or Run(actor, home)
        handoff = executor.local_handoff
        args = send_handles(pack(args), run.refs, home if handoff else None)
        call = next(executor.calls)
        submitted = Submitted(self, actor, pool, tokens, context, call)
        run.calls.append((self.name, key, sent, args, state_ids, at_least_s, call))
        run.submitted.append(submitted)
        ledger.calls.append(submitted)
        self.hold()
        self.sent.add(key)  # a failed call clears it (recover)
        # sent at once where a call's result is read through Ray, or where no two groups
        # share an actor (one process per replica): nothing would join its run
        if not (executor.fuse_runs and handoff and executor.per_device):
            ledger.send()
        return Handle(submitted.result, rows=tokens[1] - tokens[0], home=home, call=call)

    def recover(self, dead: Any, died: BaseException) -> GroupError:
        """Its actor died: a new one takes over (once, whichever call saw the death first)
        with its weights mapped again; the error for the calls that died: StateLostError
        when KV blocks were lost (the engine recomputes their requests), else a GroupError
        (the step runs again)."""
        with self.recovering:
            if self.actor is dead and not self.stopped:
                self.actor, self.location = self.executor.replace(self.device, dead)
                self.sent.clear()
                self._send(self.known)
        if any(cache for _, cache in self.known.values()):
            return StateLostError(self.group, (self.key,), died)
        return GroupError(self.group, None, died)

    def stop(self) -> None:
        """Finish queued and submitted calls (an actor runs its calls in the order sent: a
        last one returns after them), then end its actor (or its state in a shared one)."""
        super().stop()
        with self.all_sent:  # a step's run holding a call of it is sent when the step settles
            self.all_sent.wait_for(lambda: self.held == 0, timeout=READY_TIMEOUT_S)
        with self.executor.lock:
            self.executor.replicas.discard(self)
        with self.recovering:
            self.stopped = True  # a call that failed meanwhile does not start a new actor
            try:
                ray.get(self.actor.where.remote(), timeout=READY_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # dead or stuck: ended below all the same
        self.executor.retire(self.actor, self.name)


ACTOR_MODES = ("replica", "device")


class RayExecutor:
    """One server's Ray: the cluster it started or joined, a placement group with a bundle
    per device, and the actors of the replicas: `actors="replica"`, each replica its own
    process; `actors="device"`, one process per device hosting every replica placed there
    (groups the placement co-locates share a process: fewer processes, the same hops)."""

    def __init__(self, devices: Devices, address: str | None = None, threads: int = 1,
                 device: str = "cpu", actors: str = "replica", spares: int = 1,
                 setup: Callable[[], Any] | None = None, pass_handles: bool = True,
                 compiled_graph: bool = False) -> None:
        if actors not in ACTOR_MODES:
            raise ValueError(f"actors must be one of {ACTOR_MODES}, got {actors!r}")
        self.threads, self.device, self.per_device = threads, device, actors == "device"
        self.pass_handles = pass_handles  # may change while no step runs (benchmarks do)
        self.local_handoff = True  # likewise
        self.fuse_runs = True  # likewise
        self.compiled: CompiledSteps | None = None  # set once connected (it asks Ray)
        self.ledgers = threading.local()  # each stepping thread's submitted calls
        self.steps, self.calls = itertools.count(), itertools.count()  # numbers, unique
        self.setup = setup  # what each actor runs first (a module-level function)
        # started actors waiting per device: a new replica takes one and pays only the
        # bytes it maps (an actor's start, a process importing torch, takes seconds)
        self.spare_count = 0 if self.per_device else spares
        self.spares: dict[int, list[Any]] = {d: [] for d in range(devices.count)}
        self.hosts: dict[int, tuple[Any, dict[str, Any]]] = {}  # device -> its actor
        self.refs: dict[int, Any] = {}  # model tensor id -> its object in the store
        self.lock = threading.Lock()
        self.actors: set[Any] = set()
        self.replicas: set[RayReplica] = set()  # running, each in its actor
        self.groups: list[Any] = []  # placement groups: one, or one per node
        self.owns_connection = connect(address)
        gpu = device.startswith("cuda")
        # a device's share of the cluster: a whole GPU, or an equal part of the CPUs
        unit = {"GPU": 1.0} if gpu else \
            {"CPU": min(1.0, ray.cluster_resources().get("CPU", 1.0) / devices.count)}
        # device d: bundle d of one SPREAD group, or bundle d % per_node of its node's
        # STRICT_PACK group (a node's devices on one Ray node)
        per_node = devices.per_node or devices.count
        sizes = [min(per_node, devices.count - start)
                 for start in range(0, devices.count, per_node)]
        strategy = "SPREAD" if devices.per_node is None else "STRICT_PACK"
        self.groups = [placement_group([unit] * size, strategy=strategy) for size in sizes]
        self.bundle_of = [(d // per_node, d % per_node) for d in range(devices.count)]
        try:
            ray.get([group.ready() for group in self.groups], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            nodes = "" if devices.per_node is None else \
                f", {devices.per_node} of them on each node"
            raise RuntimeError(f"Ray could not reserve {devices.count} bundles of {unit}"
                               f"{nodes} within {READY_TIMEOUT_S:.0f} s (cluster: "
                               f"{ray.cluster_resources()}); give fewer devices or more "
                               "nodes") from None
        self.actor_class = ray.remote(GroupActor)
        # actors share their bundle's resources (a GPU actor sees its bundle's GPU)
        self.share = {"num_gpus": 0.01, "num_cpus": 0} if gpu else {"num_cpus": 0}
        for index in self.spares:  # started now, they come up while the model compiles
            if self.per_device:
                self.hosts[index] = (self._launch(index), {})
            self._refill(index)
        # after connect(): a Ray call before it would start a default Ray instance, not
        # the loopback-only one, and this executor would then run on that
        self.compiled_graph = compiled_graph and pass_handles

    def replica(self, key: int, slots: threading.Semaphore, name: str, device: int
                ) -> RayReplica:
        """A pool's replica factory (LocalPool's `replica`)."""
        return RayReplica(key, slots, name, device, self)

    def _launch(self, device: int) -> Any:
        """Start an actor in device `device`'s bundle (it runs once its process is up)."""
        actor = self.actor_class.options(
            max_restarts=0, **self.share,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.groups[self.bundle_of[device][0]],
                placement_group_bundle_index=self.bundle_of[device][1])).remote(
                    self.threads, self.device, self.setup)
        self.actors.add(actor)
        return actor

    def _refill(self, device: int) -> None:
        """Start spare actors for a device up to the count kept."""
        with self.lock:
            while len(self.spares[device]) < self.spare_count:
                self.spares[device].append(self._launch(device))

    def _running(self, actor: Any, device: int) -> tuple[Any, dict[str, Any]]:
        """(actor, where it runs) once it runs (a clear error, and no actor, when it does
        not start)."""
        try:
            where = ray.get(actor.where.remote(), timeout=READY_TIMEOUT_S)
        except BaseException:
            self.stop_actor(actor)
            raise
        return actor, {**where, "device": device}

    def actor_for(self, device: int) -> tuple[Any, dict[str, Any]]:
        """The actor a new replica on device `device` lives in, running: the device's
        host, or one of its own (a spare when one waits); (handle, where it is)."""
        if self.per_device:
            with self.lock:
                host = self.hosts.get(device) or (self._launch(device), {})
                self.hosts[device] = host
            if not host[1]:
                host = self._running(host[0], device)
                with self.lock:
                    self.hosts[device] = host
            return host
        with self.lock:
            spares = self.spares[device]
            actor = spares.pop(0) if spares else self._launch(device)
        self._refill(device)
        return self._running(actor, device)

    def wait_for_spares(self) -> None:
        """Return once every spare actor runs (a benchmark of warm starts waits so)."""
        with self.lock:
            spares = [actor for actors in self.spares.values() for actor in actors]
        ray.get([actor.where.remote() for actor in spares], timeout=READY_TIMEOUT_S)

    def replace(self, device: int, dead: Any) -> tuple[Any, dict[str, Any]]:
        """The actor that takes over from a dead one (a device's host is replaced once,
        for all its replicas)."""
        with self.lock:
            if self.hosts.get(device, (None,))[0] is dead:
                del self.hosts[device]
        self.stop_actor(dead)
        return self.actor_for(device)

    def retire(self, actor: Any, replica: str) -> None:
        """A replica stopped: end its actor, or drop its state from its device's host."""
        if not self.per_device:
            self.stop_actor(actor)
            return
        try:
            ray.get(actor.drop.remote(replica), timeout=READY_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            pass  # the host died: its state went with it

    def stop_actor(self, actor: Any) -> None:
        """End an actor (its process and what it holds)."""
        with self.lock:
            self.actors.discard(actor)
        ray.kill(actor, no_restart=True)

    @property
    def compiled_graph(self) -> bool:
        """Whether steps of a repeating shape run through a Ray Compiled Graph (pass_handles
        only); may change while no step runs (benchmarks do: off tears the graph down)."""
        return self.compiled is not None

    @compiled_graph.setter
    def compiled_graph(self, on: bool) -> None:
        if on and self.compiled is None:
            self.compiled = CompiledSteps()
        elif not on and self.compiled is not None:
            self.compiled, compiled = None, self.compiled
            compiled.close()

    def ledger(self) -> Ledger:
        """This thread's step's calls."""
        ledger = getattr(self.ledgers, "ledger", None)
        if ledger is None:
            ledger = self.ledgers.ledger = Ledger(
                next(self.steps), held=None if self.compiled is None else [])
        return ledger

    def settle(self, value: Any) -> Any:
        """A step's output brought here, once every call of the step has finished: each
        call's seconds recorded in its pool. A replica whose actor died is replaced (its
        pool counts a retry) and the step's error raised: StateLostError when KV blocks
        were lost, else a GroupError (the engine runs the step again). `value` None: the
        step failed here; its calls are waited for, dead actors replaced, and only lost KV
        blocks raised (the step's own error follows)."""
        ledger = self.ledger()
        ledger.send()
        calls = ledger.calls
        self.ledgers.ledger = None
        errors: list[GroupError] = []
        refs: list[Any] = []
        sent = send_handles(value, refs)
        seconds = outputs = None
        if ledger.held and value is not None:
            seconds, outputs = self._through_graph(ledger, refs)
        if seconds is None:
            ledger.send_held()
            try:  # one wait for the step: every call's seconds and the output's parts
                got = ray.get([call.seconds for call in calls] + [resolved(r) for r in refs])
                seconds, outputs = got[:len(calls)], got[len(calls):]
            except ray.exceptions.RayError:
                seconds = outputs = None
        if seconds is None or any(isinstance(took, Failed) for took in seconds):
            seen: set[str] = set()  # in submission order a call's inputs come first
            seconds = [self._outcome(call, errors, seen) for call in calls]
            outputs = None
        for call, took in zip(calls, seconds):
            if took is not None:
                call.pool.record(call.tokens[1] - call.tokens[0], call.context, took)
                call.replica.executions += 1
                call.replica.busy_s += took
        lost = [e for e in errors if isinstance(e, StateLostError)]
        if lost:  # first: recomputed, not rerun; every replica a dead actor hosted at once
            raise StateLostError(lost[0].group, (k for e in lost for k in e.lost_replicas),
                                 lost[0].cause)
        if errors and value is not None:
            raise errors[0]
        if value is None:
            return None
        if outputs is None:
            outputs = ray.get([resolved(r) for r in refs])
        return receive_handles(sent, tuple(outputs), self.device)

    def _through_graph(self, ledger: Ledger, refs: list[Any]
                       ) -> tuple[list | None, list | None]:
        """(each call's seconds, the output's parts) of a step run through a compiled
        graph; (None, None) when it takes the plain path: another shape, or the graph failed
        (nothing of it kept) or a call in it failed (the plain path runs the step again and
        sorts the failure out: calls only write the KV slots they wrote before)."""
        compiled = self.compiled
        got = None if compiled is None else \
            compiled.run(ledger.lane, ledger.step, ledger.held, refs)
        if got is None:
            return None, None
        outputs, where = got
        ledger.release_held()
        seconds = [outputs[k][2 * i + 1] for k, i in (where[id(c.result)] for c in ledger.calls)]
        return seconds, [outputs[k][2 * i] for k, i in (where[id(r)] for r in refs)]

    def _outcome(self, call: Submitted, errors: list[GroupError], seen: set[str]
                 ) -> float | None:
        """A call's seconds, or None when it failed; its own failure added to `errors` (its
        actor died: replaced; or its function raised), not one it inherited from a call it
        read (a death names the actor; a raised error the call that raised it; a task that
        failed as a whole counts once, for its first call)."""
        try:
            took = ray.get(call.seconds)
        except ray.exceptions.RayActorError as died:  # also an inherited death
            if died.actor_id in (None, call.actor._actor_id.hex()):
                self._actor_lost(call, died, errors)
            return None
        except ray.exceptions.RayError as failed:  # the task itself failed: its calls alike
            cause = getattr(failed, "cause", None) or failed
            took = Failed(cause, None if repr(cause) in seen else call.call)
            seen.add(repr(cause))
        if not isinstance(took, Failed):
            return took
        if isinstance(took.error, ray.exceptions.RayActorError):  # dead before it was sent
            if took.origin == call.call:
                self._actor_lost(call, took.error, errors)
            return None
        if took.origin == call.call:  # its own failure, not one it read
            errors.append(GroupError(call.replica.group, None, took.error))
            call.pool.retries += 1
            call.replica.sent.clear()  # the run again sends its functions again
        return None

    def _actor_lost(self, call: Submitted, died: BaseException, errors: list[GroupError]
                    ) -> None:
        """A call's actor died: every replica it hosted is replaced now, not at its own next
        call (one left on the dead actor would report its KV blocks lost again a step
        later, so its requests would count two losses); their errors added, the call's pool
        counts a retry."""
        with self.lock:
            hosted = [r for r in self.replicas if r.actor is call.actor]
        for replica in hosted or [call.replica]:  # none: replaced by a call before it
            errors.append(replica.recover(call.actor, died))
        call.pool.retries += 1

    def shared(self, tensor: torch.Tensor) -> Any:
        """The object-store copy of a model tensor, put there once."""
        with self.lock:
            ref = self.refs.get(id(tensor))
            if ref is None:
                ref = self.refs[id(tensor)] = ray.put(to_shared(tensor))
            return ref

    def close(self) -> None:
        """End every actor and the placement group; the last executor on the connection the
        executors made stops its private Ray instance, or leaves the cluster it joined
        (running)."""
        self.spare_count = 0
        self.compiled_graph = False  # first: its actor loops end before the actors do
        for actor in list(self.actors):
            self.stop_actor(actor)
        for spares in self.spares.values():
            spares.clear()
        self.hosts.clear()
        self.refs.clear()
        for group in self.groups:
            remove_placement_group(group)
        self.groups = []
        if self.owns_connection:
            self.owns_connection = False
            disconnect()
