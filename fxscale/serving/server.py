"""`fxscale.serve`: serve a model on the engine, its operator groups in replica pools.

    devices = fxscale.Devices(count=2, memory=512 << 20, slots=1)
    with fxscale.serve(model, policy="operator", devices=devices) as server:
        logits = server.submit(input_ids).result()
        tokens = server.generate(input_ids, max_new_tokens=32).result()
        for token in server.generate(input_ids, max_new_tokens=32, stream=True): ...
        server.scale("model.layers.*#1/attention", 2)
        server.stats()

Requests go to the engine (runtime/engine): iteration-level continuous batching with chunked
prefill over a paged KV cache; each step is one flat batch of tokens, compiled once through
the fxscale backend and run group by group on per-group pools of replicas (runtime/executors:
threads of this process). Every replica is placed on one of the deployment's `devices`
(fxscale.Devices: count, memory, slots; by default one device of unbounded memory with `budget`
slots): its weights and KV caches must fit in that device's memory, and its calls take that
device's slots; a replica that fits nowhere is refused (PlacementError), and the autoscaler
then scales as far as the devices allow and says so. `policy="operator"`: one engine whose
groups scale alone (a row-wise group splits a step's tokens over its replicas; attention
replicas each hold the KV blocks of their requests, so all attention groups scale together).
`policy="model"`: the whole model is one group, each replica of it an engine of its own, and
requests go to the least loaded one (a vLLM-style deployment). Both use the same scheduler
and kernels. A model whose attention cannot be routed to the paged cache is served by the
same engine one request at a time, with a warning.

`backend="ray"` runs every replica as a Ray actor instead of a thread (runtime/executors/
ray_executor.py: `address=` joins a cluster, `actors="device"` hosts a device's replicas in
one process; a step's activations pass from actor to actor, `pass_handles=False` brings each
call's result back here instead, `compiled_graph=True` runs steps of a repeating shape as a
Ray Compiled Graph); the engine and scheduler stay here.

Each server owns its compiled code (a private entry per runner, so servers never share
Dynamo's recompile limit), and close() releases it with the replicas' state.
`Server.apply(plan)` deploys a Plan (from the planner, or its JSON); `autoscale=True` plans
and applies replicas per group every interval (runtime/autoscaling/autoscaler.py).
"""
from __future__ import annotations

import copy
import fnmatch
import ipaddress
import itertools
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import torch

from fxscale.contracts.devices import Devices
from fxscale.contracts.metrics import merge_reports, percentiles
from fxscale.contracts.placement import Demand, Placement
from fxscale.contracts.plan import LIVE_POLICIES, SLO, Plan
from fxscale.contracts.sampling import Sampling
from fxscale.runtime.autoscaling.autoscaler import Autoscaler
from fxscale.runtime.engine import Engine
from fxscale.runtime.engine.attention import find_attention
from fxscale.runtime.engine.attention import register as register_attention
from fxscale.runtime.engine.engine import EngineClosedError
from fxscale.runtime.engine.pooled import PooledRunner
from fxscale.runtime.engine.runner import SequentialRunner, private_copy
from fxscale.runtime.scheduling import SchedulerConfig

SWITCH_INTERVAL_S = 0.0005  # the interpreter's default is 5 ms (see _ProcessSettings)
# Every replica is a thread with its own copies: bounds that keep a typo from starting
# thousands of them (the autoscaler never asks a group for more than the budget).
MAX_REPLICAS_PER_GROUP = 64
MAX_REPLICAS = 2048
MAX_BUDGET = 256
MAX_PENDING = 4096
MAX_BATCH = 1024          # requests per step
MAX_BATCHED_TOKENS = 1 << 16
BACKENDS = ("local", "ray")


class OverloadError(RuntimeError):
    """The server has `max_pending` requests in flight and no slot freed in time."""


class ServerClosedError(RuntimeError):
    """The server is closed (or closed while a request waited for admission)."""


class _ProcessSettings:
    """Process-wide settings running servers need: intra-op threads (`budget` is what runs at
    once) and a short interpreter switch interval (the engine and replica threads hand work
    over through the interpreter lock; the 5 ms default would keep a replica waiting out
    whole slices). The first server to start sets them, the last to close restores them."""

    lock = threading.Lock()
    holders = 0
    saved: tuple[int, float] | None = None

    @classmethod
    def acquire(cls, threads: int) -> None:
        with cls.lock:
            if cls.holders == 0:
                cls.saved = (torch.get_num_threads(), sys.getswitchinterval())
                torch.set_num_threads(threads)
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            cls.holders += 1

    @classmethod
    def release(cls) -> None:
        with cls.lock:
            cls.holders -= 1
            if cls.holders == 0 and cls.saved is not None:
                torch.set_num_threads(cls.saved[0])
                sys.setswitchinterval(cls.saved[1])
                cls.saved = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """The serving dtype (None: the model's own), or a ValueError naming the choices."""
    if value is None or value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or the torch dtype), got "
                     f"{value!r}")


def _positive(name: str, value: Any, most: int) -> None:
    """An integer from 1 to `most`, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{name} must be an integer from 1 to {most}, got {value!r}")


def _devices(devices: Devices | str | None, budget: int | None) -> Devices:
    """The deployment's devices: as given ('4x512MiB' parsed), or one device of unbounded
    memory with `budget` slots (2 when neither is given)."""
    if budget is not None:
        _positive("budget", budget, MAX_BUDGET)
    if devices is None:
        return Devices(1, None, budget or 2)
    if isinstance(devices, str):
        devices = Devices.parse(devices)
    if not isinstance(devices, Devices):
        raise ValueError(f"devices must be a fxscale.Devices (or 'COUNTxMEMORY[xSLOTS]'), got "
                         f"{type(devices).__name__}")
    if budget is not None and budget != devices.total_slots:
        raise ValueError(f"budget={budget} disagrees with devices ({devices.describe()}: "
                         f"{devices.total_slots} slots); give one or the other")
    return devices


class Server:
    """A model served by the engine from per-group replica pools (module docstring)."""

    def __init__(self, model: torch.nn.Module, policy: str = "operator",
                 budget: int | None = None,
                 slo: SLO | None = None, backend: str = "local", max_pending: int = 64,
                 submit_timeout_s: float = 10.0, lowering: str = "eager",
                 warmup: bool = True, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", max_batch: int = 64,
                 autoscale: bool = False, autoscale_interval_s: float = 1.0,
                 kv_cache_tokens: int = 16384, max_num_batched_tokens: int = 512,
                 block_size: int = 16, replicas: int = 1,
                 service: Callable[[str, int, int], float] | None = None,
                 dtype: str | torch.dtype | None = None, micro_batches: int = 1,
                 max_model_len: int | None = None,
                 devices: Devices | str | None = None, address: str | None = None,
                 actors: str = "replica", pass_handles: bool = True,
                 compiled_graph: bool = False, plan: Plan | None = None) -> None:
        if policy not in LIVE_POLICIES:
            raise ValueError(f"policy must be one of {LIVE_POLICIES}, got {policy!r}")
        if plan is not None:
            _check_plan(plan, policy)
            if replicas != 1:
                raise ValueError("replicas= and plan= both set the replica counts: pass one")
        if autoscale and slo is None:
            raise ValueError("autoscale=True needs an SLO to plan for: pass "
                             "slo=fxscale.SLO(ttft=..., tbt=...)")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (threads of this process, "
                             f"or Ray actors), got {backend!r}")
        if (address is not None or actors != "replica" or not pass_handles
                or compiled_graph) and backend != "ray":
            raise ValueError("address=, actors=, pass_handles= and compiled_graph= say how "
                             "Ray actors run: they need backend='ray'")
        if compiled_graph and (policy != "operator" or not pass_handles):
            raise ValueError("compiled_graph=True runs an operator step's group calls as one "
                             "Ray Compiled Graph: it needs policy='operator' and "
                             "pass_handles=True (a model step is one call)")
        devices = _devices(devices, budget)
        budget = devices.total_slots
        for name, value, most in (("budget (devices x slots)", budget, MAX_BUDGET),
                                  ("max_pending", max_pending, MAX_PENDING),
                                  ("max_batch", max_batch, MAX_BATCH),
                                  ("max_num_batched_tokens", max_num_batched_tokens,
                                   MAX_BATCHED_TOKENS),
                                  ("kv_cache_tokens", kv_cache_tokens, 1 << 30),
                                  ("block_size", block_size, 1024),
                                  ("replicas", replicas, MAX_REPLICAS_PER_GROUP)):
            _positive(name, value, most)
        self.dtype = _dtype(dtype)
        if metrics_port is not None and not ipaddress.ip_address(metrics_host).is_loopback:
            warnings.warn(f"fxscale.serve: metrics_host={metrics_host!r} publishes the server's "
                          "metrics beyond this machine (no authentication); use 127.0.0.1 "
                          "unless that is intended", stacklevel=3)
        self.model, self.policy, self.budget_size, self.slo = model.eval(), policy, budget, slo
        self.config = getattr(model, "config", None)
        eos = getattr(self.config, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.max_len = getattr(self.config, "max_position_embeddings", None) or 1 << 30
        if max_model_len is not None:  # a shorter context than the model's, never longer
            _positive("max_model_len", max_model_len, self.max_len)
            self.max_len = max_model_len
        self.devices = devices
        self.placement = Placement(devices)
        for groups, where in self._plan_pins(plan).items():  # before any replica is placed
            self.placement.pin(groups, where)
        self.num_blocks = -(-kv_cache_tokens // block_size)
        self.schedule = SchedulerConfig(max_num_batched_tokens, max_batch, block_size)
        self.submit_timeout_s, self.max_pending = submit_timeout_s, max_pending
        if micro_batches not in (1, 2):
            raise ValueError(f"micro_batches must be 1 or 2, got {micro_batches!r}")
        self.micro_batches = micro_batches
        self.admission = threading.Condition()
        self.in_flight = 0  # requests admitted and not finished
        self.closed = False
        self.holds_settings = False
        self.autoscaler = None
        self.metrics = None
        self.engines: list[Engine] = []
        self.retired: list[Engine] = []  # model replicas scaled away (their counts kept)
        self.retiring: list[threading.Thread] = []  # each finishing a retired one's requests
        self.engines_lock = threading.Lock()
        self.resize_lock = threading.Lock()  # a check and the change it allows, together
        self.replica_keys = itertools.count(1)  # model replicas: each its own replica key
        self.executor = None  # the Ray executor (backend="ray")
        try:
            if backend == "ray":
                from fxscale.runtime.executors.ray_executor import RayExecutor

                self.executor = RayExecutor(devices, address, actors=actors, device=str(
                    next(model.parameters()).device), setup=register_attention,
                    # a model-policy step is one call: its result comes straight back
                    # (handles would add a wait, measured 5% slower)
                    pass_handles=pass_handles and policy == "operator",
                    compiled_graph=compiled_graph)
            # before compiling: Dynamo guards on the thread count, a later change recompiles
            _ProcessSettings.acquire(1 if policy == "operator" else max(1, budget // replicas))
            self.holds_settings = True
            self.runner = self._runner(lowering, service)
            self.pools = getattr(self.runner, "pools", {})
            self.engines.append(self._engine(0))
            if plan is not None:
                self.apply(plan)
            elif policy == "model" and replicas > 1:
                self._model_replicas(replicas)
            elif replicas > 1:
                self.scale("*", replicas)
            if warmup:  # every group's replicas take their state before traffic
                probe = [1, 2, 3]
                self.submit(torch.tensor([probe])).result()
                self.generate(torch.tensor([probe]), max_new_tokens=2,
                              ignore_eos=True).result()
                self.reset_stats()
            if autoscale:
                self.start_autoscaler(autoscale_interval_s)
            if metrics_port is not None:  # opt-in Prometheus endpoint (loopback by default)
                from fxscale.serving.prometheus import start_metrics

                self.metrics = start_metrics(self.stats, type(model).__name__, metrics_port,
                                             metrics_host)
        except BaseException:
            self.close()  # nothing of a failed start stays behind (settings restored)
            raise

    def _runner(self, lowering: str, service: Callable[[str, int, int], float] | None) -> Any:
        """The engine's runner: the model compiled into pooled groups, or (a model whose
        attention cannot be routed) one request at a time. `service` (for tests and
        benchmarks of the engine itself) makes every group call take that many seconds of
        (group, tokens, context tokens): the call runs, then sleeps the rest."""
        served = private_copy(self.model)
        if self.dtype is not None and self.dtype != next(self.model.parameters()).dtype:
            # weights of its own in the serving dtype (the user's model keeps its own)
            served = copy.deepcopy(served).to(self.dtype)
        layers, why = find_attention(served)
        if why is not None and self.executor is not None:
            raise ValueError(f"backend='ray' runs operator groups as actors; "
                             f"{type(self.model).__name__} is served without groups "
                             f"({why}): use backend='local'")
        if why is not None:
            warnings.warn(f"fxscale.serve: {type(self.model).__name__}'s attention cannot use "
                          f"the paged KV cache ({why}); the engine serves it one request at "
                          "a time per step, without operator groups"
                          + (" or placement on the devices' memory"
                             if self.devices.memory is not None else ""), stacklevel=4)
            return SequentialRunner(served)
        granularity = "operator" if self.policy == "operator" else "model"
        runner = PooledRunner(served, layers, self.num_blocks, self.schedule.block_size,
                              {"granularity": granularity, "lowering": lowering},
                              self.placement, service=service,
                              **({"replica": self.executor.replica,
                                  "settle": self.executor.settle} if self.executor else {}))
        runner.warm_up()
        return runner

    def _engine(self, replica: int) -> Engine:
        """An engine over the server's runner whose first attention replica is `replica`."""
        return Engine(self.runner, self.schedule, self.num_blocks, self.max_len, self.eos,
                      name=f"fxscale-engine-{replica}", first_replica=replica,
                      micro_batches=self.micro_batches)

    def start_autoscaler(self, interval_s: float = 1.0) -> None:
        """Plan and apply replicas per group every interval from now on (`autoscale=True`
        starts it with the server; a benchmark may start it after calibrating)."""
        if self.slo is None:
            raise ValueError("autoscaling needs an SLO to plan for: serve with "
                             "slo=fxscale.SLO(ttft=..., tbt=...)")
        with self.admission:  # close() sees either no autoscaler or this one, to stop it
            if self.closed:
                raise ServerClosedError("the server is closed; its autoscaler cannot start")
            if self.autoscaler is not None:
                raise RuntimeError("the autoscaler is already running")
            self.autoscaler = Autoscaler(lambda: dict(self.pools), self.slo, self.budget_size,
                                         interval_s, scale=self._autoscale, kv=self.kv_demand,
                                         max_replicas=MAX_REPLICAS_PER_GROUP)
            self.autoscaler.start()

    def reset_stats(self) -> None:
        """Start the statistics afresh (after the warm-up, or a calibration burst)."""
        for engine in self.engines:
            engine.reset_counters()
        for pool in self.pools.values():
            pool.reset_counters()
        self.placement.reset_peaks()

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, input_ids: torch.Tensor, timeout_s: float | None = None) -> Future:
        """One forward pass over the prompt; the future holds its logits [1, length, vocab]."""
        ids = self._check(input_ids, 1)
        return self._start(timeout_s, lambda engine: engine.add(ids, 1, logits=True)).future

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, stream: bool = False,
                 timeout_s: float | None = None, ignore_eos: bool = False,
                 sampling: Sampling | None = None) -> Future | Iterator[int]:
        """Decoding (greedy, or as `sampling` says: fxscale.Sampling), stopping at the
        end-of-sequence token (unless ignore_eos, as benchmarks replaying a trace's lengths
        want): a future of the new token ids (its `record` holds the request's timings once
        done), or (stream=True) an iterator that yields each token as produced (closing it
        early cancels the request)."""
        record = self.start_generation(input_ids, max_new_tokens, stream, timeout_s,
                                       ignore_eos, sampling)
        return record.engine.stream(record) if stream else record.future

    def start_generation(self, input_ids: Any, max_new_tokens: int, stream: bool = False,
                         timeout_s: float | None = None, ignore_eos: bool = False,
                         sampling: Sampling | None = None) -> Any:
        """`generate`'s request record itself (its future, its stream, its logprobs): what a
        front end streaming tokens with their logprobs reads. `stream` may be an object with
        put() that takes each token and then runtime.engine.engine.STREAM_END."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if sampling is not None and not isinstance(sampling, Sampling):
            raise ValueError(f"sampling must be a fxscale.Sampling, got {type(sampling).__name__}")
        ids = self._check(input_ids, max_new_tokens)
        return self._start(timeout_s, lambda engine: engine.add(
            ids, max_new_tokens, ignore_eos=ignore_eos, stream=stream,
            sampling=sampling or Sampling()))

    def _check(self, input_ids: Any, new_tokens: int) -> list[int]:
        """Validate a request at submit time (nothing else is affected by a bad one)."""
        if self.closed:
            raise ServerClosedError("the server is closed; create a new one with fxscale.serve")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be torch.long token ids, got {input_ids.dtype}")
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must have shape [length] or [1, length] (one request), "
                             f"got {list(input_ids.shape)}")
        vocab = getattr(self.config, "vocab_size", None)
        if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise ValueError(f"token ids must be in [0, {vocab}), got min {int(ids.min())} "
                             f"max {int(ids.max())}")
        if ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + {new_tokens} new tokens exceeds "
                             f"the model's context of {self.max_len}")
        slots = self.num_blocks * self.schedule.block_size
        if ids.shape[1] + new_tokens > slots:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + {new_tokens} new tokens exceeds "
                             f"the KV cache of {slots} tokens (kv_cache_tokens)")
        return ids[0].tolist()

    def _start(self, timeout_s: float | None, add: Any) -> Any:
        """Admit a request (back-pressure), hand it to the least loaded engine, give its
        slot back when it ends."""
        self._admit(timeout_s)
        try:
            with self.engines_lock:
                engine = min(self.engines, key=lambda e: e.load())
            record = add(engine)
        except EngineClosedError:
            self._release()
            raise ServerClosedError("the server closed before this request started; "
                                    "nothing of it ran") from None
        except BaseException:
            self._release()
            raise
        record.engine = engine
        record.future.add_done_callback(lambda _: self._release())
        return record

    def _admit(self, timeout_s: float | None) -> None:
        """Take an in-flight slot, waiting up to the timeout (back-pressure); a close while
        waiting ends the wait at once."""
        wait = self.submit_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait
        with self.admission:
            while self.in_flight >= self.max_pending and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OverloadError(f"fxscale server: {self.max_pending} requests in flight "
                                        f"for {wait:g} s; retry later, or raise max_pending")
                self.admission.wait(left)
            if self.closed:
                raise ServerClosedError("the server closed while this request waited for "
                                        "admission; nothing of it ran")
            self.in_flight += 1

    def _release(self) -> None:
        """Give back an in-flight slot."""
        with self.admission:
            self.in_flight -= 1
            self.admission.notify()

    # ---- control ------------------------------------------------------------------------------
    def scale(self, group: str, replicas: int) -> list[str]:
        """Set the replica count of a group (its name, or a pattern like
        'model.layers.*#1/attention'); returns the groups scaled. Attention groups scale
        together (a request's KV blocks of every layer live on one attention replica). A
        PlacementError (nothing changed) when the new replicas do not fit on the devices."""
        names = self._matching(group)
        self._resize({name: replicas for name in names})
        return names

    def apply(self, plan: Plan) -> dict[str, int]:
        """Deploy a Plan of this server's policy (from the planner, or Plan.from_dict of its
        JSON): an operator plan sets each group kind's replicas from its placement rows; a
        model plan sets the whole-model replicas to its engine count. Groups the plan does not
        name keep theirs. Each operator group is pinned to the devices its row names, a
        model plan's whole model to the devices its engines occupy (when the plan is for at
        most this server's devices): replicas on other devices are replaced there, and the
        replicas added later land there too. Returns the replicas set."""
        _check_plan(plan, self.policy)
        if self.policy == "model":
            targets = {name: sum(e.count for e in plan.engines) for name in self.pools}
        else:
            targets = {name: g.replicas for g in plan.groups if g.role == "operator"
                       for name in self._matching(g.kind)}
        if plan.devices > self.devices.count:
            warnings.warn(f"the plan places its groups on {plan.devices} devices and this "
                          f"server has {self.devices.count}: its replica counts are applied, "
                          "its devices are not (serve with devices=fxscale.Devices(count="
                          f"{plan.devices}, ...) to follow them)", stacklevel=2)
        pins = self._plan_pins(plan)
        before = dict(self.placement.pins)
        try:
            for groups, devices in pins.items():
                self.placement.pin(groups, devices)
            self._resize(targets)  # replicas on devices their pin leaves out move
        except BaseException:
            self.placement.pins = before
            raise
        return targets

    def _plan_pins(self, plan: Plan | None) -> dict[str, tuple[int, ...]]:
        """The devices a plan pins each group kind to: an operator plan's rows, or for a
        model plan the whole model to every device its engines occupy (none when there is
        no plan, or it is for more devices than this server has)."""
        if plan is None or plan.devices > self.devices.count:
            return {}
        if plan.policy == "model":  # called before the pools exist: the model is every group
            devices = sorted({d for g in plan.groups if g.role == "model" for d in g.devices})
            return {"*": tuple(devices)} if devices else {}
        return {g.kind: g.devices for g in plan.groups if g.role == "operator" and g.devices}

    def _matching(self, group: str) -> list[str]:
        """The groups a name or pattern names (an error when none does)."""
        if self.closed:
            raise ServerClosedError("the server is closed; create a new one with fxscale.serve")
        names = [n for n in self.pools if fnmatch.fnmatchcase(n, group)]
        if not names:
            raise ValueError(f"no group matches {group!r}; groups are {sorted(self.pools)[:8]}"
                             f"{' ...' if len(self.pools) > 8 else ''}")
        return names

    def _resize(self, targets: dict[str, int]) -> None:
        """Set replicas per group, within the per-group and total bounds (checked first, so a
        refused request changes nothing)."""
        for replicas in targets.values():
            if isinstance(replicas, bool) or not isinstance(replicas, int) or \
                    not 1 <= replicas <= MAX_REPLICAS_PER_GROUP:
                raise ValueError(f"replicas must be >= 1 and at most {MAX_REPLICAS_PER_GROUP} "
                                 f"per group (fxscale.serving.MAX_REPLICAS_PER_GROUP), got "
                                 f"{replicas!r}")
        attention = [targets[n] for n in targets if self.pools[n].stateful]
        if len(set(attention)) > 1:
            raise ValueError(f"attention groups scale together (each request's KV blocks live "
                             f"on one attention replica); asked for {sorted(set(attention))}")
        final = {n: targets.get(n, attention[0] if attention and p.stateful else p.target)
                 for n, p in self.pools.items()}
        total = sum(final.values())
        if total > MAX_REPLICAS:
            raise ValueError(f"{len(targets)} groups resized would make {total} replicas in "
                             f"all, more than {MAX_REPLICAS} (fxscale.serving.MAX_REPLICAS)")
        # shrinking pools first: the memory they free is what the growing ones are checked
        # against (attention replicas drain, so theirs is not counted); replicas on devices
        # their group's pin leaves out are replaced
        dense = sorted(((self.pools[n], r, self.placement.misplaced(n)) for n, r in
                        targets.items() if not self.pools[n].stateful),
                       key=lambda prm: prm[1] - len(prm[0].replicas))
        moved = sorted({key for n in targets if self.pools[n].stateful
                        for key in self.placement.misplaced(n)})
        with self.resize_lock:
            self.placement.check(
                [d for pool, r, m in dense for d in pool.additions(r, m)] +
                (self._attention_additions(attention[0], len(moved)) if attention else []),
                [key for pool, r, m in dense for key in pool.removals(r, m)])
            if dense:  # between steps: a step's parts are spread over the replicas it found
                engine = self.engines[0]
                engine.control(lambda: [pool.scale(r, m) for pool, r, m in dense]).result()
            if attention:
                self._attention_replicas(attention[0], moved)

    def _attention_additions(self, count: int, moved: int = 0) -> list[Demand]:
        """The replicas `count` attention (or model) replicas would start, `moved` of the
        ones there being replaced: each new one's state in every stateful pool, kept together
        (keys stand in for the ones it will get)."""
        have = len(self.engines) if self.policy == "model" else \
            self.engines[0].attention_replicas()
        stateful = [p for p in self.pools.values() if p.stateful]
        return [pool.demand(-1 - i) for i in range(count - have + moved) for pool in stateful]

    def _attention_replicas(self, count: int, moved: list[int] = ()) -> None:
        """Attention replicas of the operator policy's engine (those keyed in `moved` drain
        and are replaced), or model replicas."""
        if self.policy == "model":
            self._model_replicas(count, moved)
            return
        for pool in self.pools.values():
            if pool.stateful:
                pool.target = count
        engine = self.engines[0]
        engine.control(lambda: engine.set_attention_replicas(count, set(moved))).result()

    def _model_replicas(self, count: int, moved: list[int] = ()) -> None:
        """Have `count` model replicas (engines): new ones start with copies of the weights
        and an empty cache; removed ones, and those keyed in `moved` (replaced where their
        pin allows), take no new requests and finish theirs."""
        with self.engines_lock:
            staying = [e for e in self.engines if not set(e.scheduler.pools) & set(moved)]
            leaving = [e for e in self.engines if set(e.scheduler.pools) & set(moved)]
            while len(staying) < count:  # new ones first, serving once started: a start
                # that fails leaves the ones to be moved serving
                key = next(self.replica_keys)
                self.runner.add_attention(key)  # its weights copied before it serves
                engine = self._engine(key)
                staying.append(engine)
                self.engines.append(engine)
            extra = leaving + staying[count:]
            self.engines[:] = staying[:count]  # one swap: readers never see none
            self.retired += extra  # counted from now on, while they finish their requests
        for pool in self.pools.values():
            pool.target = count
        for engine in extra:
            retiring = threading.Thread(target=self._retire, args=(engine,), daemon=True)
            self.retiring = [t for t in self.retiring if t.is_alive()] + [retiring]
            retiring.start()

    def _retire(self, engine: Engine) -> None:
        """Finish a removed model replica's requests, then free its replica's state."""
        engine.close()
        for key in list(engine.scheduler.pools):
            self.runner.remove_attention(key)

    def _autoscale(self, group: str, replicas: int) -> None:
        """The autoscaler's way to resize a group (attention groups together)."""
        self.scale(group, replicas)

    # ---- reading --------------------------------------------------------------------------------
    @property
    def group_graphs(self) -> list:
        """The GroupGraphs of what this server compiled, newest last."""
        return getattr(self.runner, "group_graphs", [])

    def stats(self) -> dict[str, Any]:
        """Per group: replicas, executions, tokens per execution, latency; per step: tokens
        and requests, KV blocks, preemptions; per request: TTFT, TBT, e2e."""
        engines = list(self.engines)
        everyone = engines + list(self.retired)
        finished = [r for e in everyone for r in list(e.finished)]
        summary: dict[str, Any] = {"completed": sum(e.counters["completed"] for e in everyone)}
        if self.slo is not None:
            generated = [f for f in finished if "ttft_s" in f]
            met = sum(self.slo.met(f["ttft_s"], f.get("tbt_s", 0.0), f["prompt_tokens"])
                      for f in generated)
            summary["slo_attainment"] = met / len(generated) if generated else None
        summary.update(percentiles(finished, ("ttft_s", "tbt_s", "e2e_s")))
        per_engine = [e.stats() for e in engines]
        steps = {key: sum(s[key] for s in per_engine) for key in
                 ("steps", "tokens", "samples", "preemptions", "failed_steps", "running",
                  "waiting", "attention_replicas")}
        # counts since the start: a retired model replica's stay in them
        ever = per_engine + [e.stats() for e in self.retired]
        steps["recomputed_replicas"] = sum(s["recomputed_replicas"] for s in ever)
        for key in ("prompt_tokens", "generation_tokens"):
            summary[key] = sum(s[key] for s in ever)
        summary["finish_reasons"] = {k: sum(s["finish_reasons"][k] for s in ever)
                                     for k in ever[0]["finish_reasons"]}
        summary["histograms"] = {k: merge_reports([s["histograms"][k] for s in ever])
                                 for k in ever[0]["histograms"]}
        steps["kv_blocks"] = {k: sum(s["kv_blocks"][k] for s in per_engine)
                              for k in ("used", "free", "total")}
        for key in ("tokens_per_step", "requests_per_step", "decodes_per_step"):
            steps[key] = sum(s[key] for s in per_engine) / len(per_engine)
        compiled = getattr(self.executor, "compiled", None)
        steps["compiled_graph"] = None if compiled is None else compiled.stats()
        return {"policy": self.policy, "budget": self.budget_size, "in_flight": self.in_flight,
                "devices": self.placement.stats(),
                "engine": steps,
                "groups": {name: pool.stats() for name, pool in sorted(self.pools.items())},
                "requests": summary,
                "autoscaler": self.autoscaler.report() if self.autoscaler else None}

    def kv_demand(self) -> tuple[int, int]:
        """(KV blocks the requests held need at their full length, blocks an attention or
        model replica holds): what the autoscaler sizes attention replicas by."""
        with self.engines_lock:
            engines = list(self.engines)
        return sum(e.scheduler.blocks_wanted() for e in engines), self.num_blocks

    def occupancy(self) -> dict[str, Any]:
        """What the deployment holds now: requests running and waiting, KV blocks used, and
        each device's weight and KV bytes, measured from its replicas' tensors."""
        with self.engines_lock:
            engines = list(self.engines)
        held = self.device_bytes()
        return {"running": sum(len(e.scheduler.running) for e in engines),
                "waiting": sum(len(e.scheduler.waiting) for e in engines),
                "kv_blocks_used": sum(e.scheduler.blocks()["used"] for e in engines),
                "device_weight_bytes": [d["weight_bytes"] for d in held],
                "device_kv_bytes": [d["kv_bytes"] for d in held]}

    def device_bytes(self) -> list[dict[str, int]]:
        """Per device, the weight and KV bytes its replicas hold now, measured from their
        tensors (what the placement promised to keep within each device's memory)."""
        held = [{"weight_bytes": 0, "kv_bytes": 0} for _ in range(self.devices.count)]
        for pool in list(self.pools.values()):
            for device, weights, kv in pool.held():
                held[device]["weight_bytes"] += weights
                held[device]["kv_bytes"] += kv
        return held

    def close(self) -> None:
        """Stop accepting requests (waiting ones get ServerClosedError at once), finish those
        in flight, stop every replica, release the compiled code and the process settings."""
        with self.admission:
            if self.closed:
                return
            self.closed = True
            self.admission.notify_all()
        if self.autoscaler is not None:
            self.autoscaler.stop()
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics.server_close()
        for engine in list(self.engines):
            engine.close()
        for retiring in self.retiring:  # they free replicas the runner is about to stop
            retiring.join()
        runner = getattr(self, "runner", None)
        if isinstance(runner, PooledRunner):
            torch._dynamo.reset_code(runner.entry.__code__)
            runner.stop()
        if self.executor is not None:
            self.executor.close()
        if self.holds_settings:
            self.holds_settings = False
            _ProcessSettings.release()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_plan(plan: Any, policy: str) -> None:
    """A Plan of this policy, or a clear error."""
    if not isinstance(plan, Plan):
        raise TypeError(f"a plan must be a fxscale Plan, got {type(plan).__name__}; read a "
                        "plan file with fxscale.Plan.from_dict(json.load(f))")
    if plan.policy != policy:
        raise ValueError(f"the plan is for policy {plan.policy!r}; this server runs "
                         f"{policy!r}")


def serve(model: torch.nn.Module, policy: str = "operator", slo: SLO | None = None,
          budget: int | None = None, backend: str = "local", **options: Any) -> Server:
    """Serve a model on the engine, its operator groups in replica pools on this machine's
    (virtual) devices: `devices=fxscale.Devices(count, memory, slots)`, or `budget` slots on
    one device of unbounded memory; `plan=` deploys a planner's Plan from the start (its
    replicas, and the devices it places each operator group on)."""
    return Server(model, policy=policy, budget=budget, slo=slo, backend=backend, **options)
