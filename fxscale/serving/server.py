"""`fxscale.serve`: host a model's operator groups in replica pools on the local machine.

    with fxscale.serve(model, policy="operator", budget=2) as server:
        logits = server.submit(input_ids).result()
        tokens = server.generate(input_ids, max_new_tokens=32).result()
        for token in server.generate(input_ids, max_new_tokens=32, stream=True): ...
        server.scale("model.layers.*#1/attention", 2)
        server.stats()

The model is compiled with the fxscale backend; every operator group of every captured graph
(prefill, decode, recompiles) is bound to the replica pool of its group name, so the same
group in the prefill and decode graphs shares replicas and weights. A request runs the model's
graph in a request thread; each group call is dispatched to its pool (runtime/pools/replica_pool.py)
and executed there. Each server owns its compiled code: it compiles its own copy of an entry
function as one whole graph per shape, so servers never share Dynamo's recompile limit (with
each other or with the user's own compiles), and close() releases what it compiled.
`policy="model"` compiles the whole model as one group: the model-level baseline on the same
code path. `Server.apply(plan)` deploys a Plan (from the planner, or its JSON). Intra-op
threads are set to 1 while the server runs: `budget` is the number of group calls that execute
at once. Row-wise groups batch the calls of different requests (runtime/pools/batching.py, up
to `max_batch`); `autoscale=True` plans and applies replicas per group every interval
(runtime/pools/autoscaler.py).
"""
from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import itertools
import queue
import sys
import threading
import time
import types
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import torch
import torch.fx as fx

from fxscale.compiler.backend import fxscale_backend
from fxscale.contracts.group_graph import GroupGraph
from fxscale.contracts.metrics import percentiles, token_timings
from fxscale.contracts.plan import LIVE_POLICIES, SLO, Plan
from fxscale.runtime.pools.autoscaler import Autoscaler
from fxscale.runtime.pools.batching import signature
from fxscale.runtime.pools.budget import Budget
from fxscale.runtime.pools.replica_pool import MAX_REPLICAS as REPLICAS_PER_POOL
from fxscale.runtime.pools.replica_pool import Call, ReplicaPool

SWITCH_INTERVAL_S = 0.0005  # the interpreter's default is 5 ms (see _ProcessSettings)
# Every replica is a thread with its own weight copies: bounds that keep a typo from
# starting thousands of them (the autoscaler never asks a group for more than the budget).
MAX_REPLICAS_PER_GROUP = REPLICAS_PER_POOL
MAX_REPLICAS = 2048
MAX_BUDGET = 256
MAX_PENDING = 4096
MAX_BATCH = 1024


class OverloadError(RuntimeError):
    """The server already holds its maximum of in-flight requests."""


class ServerClosedError(RuntimeError):
    """The server is closed, or closed while the request waited for admission."""


class _NeedsGraph(Exception):
    """A call the server's compiled graphs do not cover yet (their guards failed)."""


def _model_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The entry a server compiles (a private copy per server, see _own_entry). Inside a
    compiled graph the check is folded away; run as plain Python, the call missed every
    compiled graph and must be compiled first."""
    if not torch.compiler.is_dynamo_compiling():
        raise _NeedsGraph
    return model(*args, **kwargs)


def _own_entry() -> types.FunctionType:
    """A copy of _model_call with its own code object: Dynamo keys compiled code and the
    recompile limit by code object, so each server's graphs are its own."""
    return types.FunctionType(_model_call.__code__.replace(), _model_call.__globals__,
                              _model_call.__name__)


class _ProcessSettings:
    """Process-wide settings running servers need: one intra-op thread (`budget` is what runs
    at once) and a short interpreter switch interval (request and replica threads hand work
    over through the interpreter lock; the 5 ms default would keep a replica waiting out
    whole slices). The first server to start sets them, the last to close restores them."""

    lock = threading.Lock()
    holders = 0
    saved: tuple[int, float] | None = None

    @classmethod
    def acquire(cls) -> None:
        with cls.lock:
            if cls.holders == 0:
                cls.saved = (torch.get_num_threads(), sys.getswitchinterval())
                torch.set_num_threads(1)
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


class Server:
    """A model served from per-group replica pools (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, policy: str = "operator", budget: int = 2,
                 slo: SLO | None = None, backend: str = "local", max_pending: int = 64,
                 submit_timeout_s: float = 10.0, lowering: str = "eager",
                 warmup: bool = True, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", max_batch: int = 16,
                 autoscale: bool = False, autoscale_interval_s: float = 1.0) -> None:
        if policy not in LIVE_POLICIES:
            raise ValueError(f"policy must be one of {LIVE_POLICIES}, got {policy!r}")
        if autoscale and slo is None:
            raise ValueError("autoscale=True needs an SLO to plan for: pass "
                             "slo=fxscale.SLO(ttft=..., tbt=...)")
        if backend != "local":
            raise ValueError(f"backend {backend!r} is not available; this build serves on "
                             "the embedded local runtime: backend='local'")
        for name, value, most in (("budget", budget, MAX_BUDGET),
                                  ("max_pending", max_pending, MAX_PENDING),
                                  ("max_batch", max_batch, MAX_BATCH)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"{name} must be an integer from 1 to {most}, got {value!r}")
        if metrics_port is not None and not ipaddress.ip_address(metrics_host).is_loopback:
            warnings.warn(f"fxscale.serve: metrics_host={metrics_host!r} publishes the server's "
                          "metrics beyond this machine (no authentication); use 127.0.0.1 "
                          "unless that is intended", stacklevel=3)
        self.model, self.policy, self.budget_size, self.slo = model.eval(), policy, budget, slo
        self.config = getattr(model, "config", None)
        eos = getattr(self.config, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.options = {"granularity": "operator" if policy == "operator" else "model",
                        "lowering": lowering}
        self.budget = Budget(budget)
        self.max_batch = max_batch
        self.pools: dict[str, ReplicaPool] = {}
        self.pools_lock = threading.Lock()
        self.group_graphs: list[GroupGraph] = []  # what this server compiled, newest last
        self.pool_calls: list[_PoolCall] = []
        self.submit_timeout_s = submit_timeout_s
        self.admission = threading.Condition()
        self.in_flight = 0  # requests admitted and not finished
        self.max_pending = max_pending
        self.requests = ThreadPoolExecutor(max_workers=max_pending,
                                           thread_name_prefix="fxscale-request")
        self.local = threading.local()
        self.ids = itertools.count()
        self.finished: deque[dict[str, float]] = deque(maxlen=100_000)
        self.completed = 0  # requests finished, ever (`finished` keeps the latest only)
        self.closed = False
        self.holds_settings = False
        self.autoscaler = None
        self.metrics = None
        self.entry = _own_entry()
        self._compile(fullgraph=True)
        self.gate = _CompileGate()
        try:
            if warmup:  # capture the forward, prefill and decode graphs before traffic
                probe = torch.zeros(1, 3, dtype=torch.long)
                self.submit(probe).result()
                self.generate(probe, max_new_tokens=2).result()
                self._forget_warmup()
            if autoscale:
                self.autoscaler = Autoscaler(lambda: dict(self.pools), slo, budget,
                                             autoscale_interval_s).start()
            if metrics_port is not None:  # opt-in Prometheus endpoint (loopback by default)
                from fxscale.serving.prometheus import start_metrics

                self.metrics = start_metrics(self.stats, metrics_port, metrics_host)
        except BaseException:
            self.close()  # nothing of a failed start stays behind
            raise
        _ProcessSettings.acquire()
        self.holds_settings = True

    def _compile(self, fullgraph: bool) -> None:
        """The server's compiled entry, and its run-only twin that never compiles (a call
        its graphs do not cover raises _NeedsGraph and is compiled alone, see _call)."""
        self.fullgraph = fullgraph
        self.compiled = torch.compile(self.entry, backend=self._backend, dynamic=True,
                                      fullgraph=fullgraph)
        self.cached = torch._dynamo.run(self.compiled)

    def _forget_warmup(self) -> None:
        """Start the statistics after the warm-up requests."""
        with self.pools_lock:
            self.finished.clear()
            self.completed = 0
            for pool in self.pools.values():
                pool.reset_counters()

    # ---- compilation: bind every group call to its pool -----------------------------------
    def _backend(self, gm: fx.GraphModule, example_inputs: list) -> Any:
        """Compile with fxscale, then route each group's calls through its replica pool."""
        lowered = fxscale_backend(gm, example_inputs, self.options)
        graph = getattr(lowered, "group_graph", None)
        if graph is None:  # grouping failed (warned): the graph runs eagerly, unpooled
            return lowered
        self.group_graphs.append(graph)
        groups = {g.submodule: g for g in graph.groups}
        for node in lowered.graph.nodes:
            if node.op != "call_module" or node.target not in groups:
                continue
            group = groups[node.target]
            weights = tuple(i for i, a in enumerate(node.args)
                            if isinstance(a, fx.Node) and a.op == "placeholder"
                            and ("_parameters_" in a.name or "_buffers_" in a.name))
            batches = group.batchable  # in this graph
            with self.pools_lock:
                pool = self.pools.setdefault(group.name, ReplicaPool(
                    group.name, group.stateful, self.budget))
                if batches:  # a group may be row-wise in one graph only (the embedding)
                    pool.max_batch = self.max_batch
            call = _PoolCall(self, pool, getattr(lowered, node.target), weights, batches)
            self.pool_calls.append(call)
            lowered._modules[node.target] = call
        return lowered

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, input_ids: torch.Tensor, timeout_s: float | None = None) -> Future:
        """One forward pass (no KV cache); the future holds the logits."""
        ids = self._check(input_ids, 0)
        submitted = time.perf_counter()
        self._admit(timeout_s)
        return self._start(self._forward, ids, submitted)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, stream: bool = False,
                 timeout_s: float | None = None, ignore_eos: bool = False
                 ) -> Future | Iterator[int]:
        """Greedy decoding with a KV cache, stopping at the end-of-sequence token (unless
        ignore_eos, as benchmarks replaying a trace's lengths want): a future of the new
        token ids, or (stream=True) an iterator that yields each token as produced."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        ids = self._check(input_ids, max_new_tokens)
        record = {"submitted_at": time.perf_counter()}
        self._admit(timeout_s)
        tokens: queue.Queue | None = queue.Queue() if stream else None
        future = self._start(self._generate, ids, max_new_tokens, tokens, record,
                             set() if ignore_eos else self.eos)
        future.record = record  # the request's timings once it finishes (see _generate)
        return _stream(tokens, future) if stream else future

    def _check(self, input_ids: Any, new_tokens: int) -> torch.Tensor:
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
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + new_tokens > limit:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + {new_tokens} new tokens exceeds "
                             f"the model's context of {limit}")
        return ids.detach().clone()

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
                                        f"for {wait:g} s; retry later, or raise max_pending or "
                                        "the budget")
                self.admission.wait(left)
            if self.closed:
                raise ServerClosedError("the server closed while this request waited for "
                                        "admission; nothing of it ran")
            self.in_flight += 1

    def _start(self, function: Any, *args: Any) -> Future:
        """Run an admitted request in a request thread (its slot is given back if the
        server closed in between)."""
        try:
            return self.requests.submit(function, *args)
        except RuntimeError:  # the executor shut down: close() won the race
            self._release()
            raise ServerClosedError("the server closed before this request started; "
                                    "nothing of it ran") from None

    def _release(self) -> None:
        """Give back an in-flight slot."""
        with self.admission:
            self.in_flight -= 1
            self.admission.notify()

    def _forward(self, ids: torch.Tensor, submitted: float) -> torch.Tensor:
        """Run one forward pass in a request thread."""
        self.local.request = next(self.ids)
        try:
            with torch.no_grad():
                logits = self._call(ids, use_cache=False).logits
            self._finish({"e2e_s": time.perf_counter() - submitted})
            return logits
        finally:
            self._done(self.local.request)

    def _generate(self, ids: torch.Tensor, new_tokens: int, tokens: queue.Queue | None,
                  record: dict[str, float], stop: set[int]) -> list[int]:
        """Greedy decoding in a request thread, pushing tokens to `tokens` when streaming;
        fills `record` with its timings, measured from submission (waits included)."""
        from transformers import DynamicCache

        start = record["submitted_at"]
        cpu_start = time.thread_time()  # this thread's own CPU: its Python, not the kernels
        self.local.request = next(self.ids)
        out: list[int] = []
        times: list[float] = []
        try:
            cache = DynamicCache(config=self.config)
            step = ids
            with torch.no_grad():
                for _ in range(new_tokens):
                    logits = self._call(step, past_key_values=cache, use_cache=True).logits
                    step = logits[:, -1].argmax(-1, keepdim=True)
                    out.append(int(step))
                    times.append(time.perf_counter())
                    if tokens is not None:
                        tokens.put(out[-1])
                    if out[-1] in stop:  # stop as Hugging Face generate does
                        break
            record.update(token_timings(start, times), first_token_at=times[0],
                          finished_at=times[-1], tokens=len(out), e2e_s=times[-1] - start,
                          thread_cpu_s=time.thread_time() - cpu_start)
            self._finish(record)
            return out
        finally:
            self._done(self.local.request)

    def _done(self, request: int) -> None:
        """A request ended: its attention replicas forget it, its slot is free."""
        with self.pools_lock:
            pools = [p for p in self.pools.values() if p.stateful]
        for pool in pools:
            pool.forget(request)
        self._release()

    def _finish(self, record: dict[str, float]) -> None:
        """Keep a finished request's timings and count it."""
        with self.pools_lock:
            self.finished.append(record)
            self.completed += 1

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model through the server's graphs; a call they do not cover compiles while
        no other call of this server runs (Dynamo does not compile safely beside running
        graphs; group calls of other requests keep running in their pools)."""
        with self.gate.shared():
            try:
                return self.cached(self.model, args, kwargs)
            except _NeedsGraph:
                pass
        with self.gate.exclusive():
            return self._compile_call(args, kwargs)

    def _compile_call(self, args: tuple, kwargs: dict) -> Any:
        """Compile (and run) a call, as one graph when the model allows it; a model that
        breaks into several graphs is served as they come, with a warning."""
        if not self.fullgraph:
            return self.compiled(self.model, args, kwargs)
        try:
            return self.compiled(self.model, args, kwargs)
        except torch._dynamo.exc.Unsupported as err:
            warnings.warn(f"fxscale.serve: {type(self.model).__name__} does not capture as one "
                          f"graph ({str(err).splitlines()[0][:200]}); it is served graph by "
                          "graph, and the graphs after a break share Dynamo's recompile limit "
                          "with other models of its class", stacklevel=4)
            self._compile(fullgraph=False)
            return self.compiled(self.model, args, kwargs)

    # ---- control ------------------------------------------------------------------------------
    def scale(self, group: str, replicas: int) -> list[str]:
        """Set the replica count of a group (its name, or a pattern like
        'model.layers.*#1/attention'); returns the groups scaled."""
        names = self._matching(group)
        self._resize({name: replicas for name in names})
        return names

    def apply(self, plan: Plan) -> dict[str, int]:
        """Deploy a Plan of this server's policy (from the planner, or Plan.from_dict of its
        JSON): an operator plan sets each group kind's replicas (and the batch of the groups
        that batch) from its placement rows; a model plan sets the whole-model replicas to its
        engine count. Groups the plan does not name keep theirs. Returns the replicas set."""
        if not isinstance(plan, Plan):
            raise TypeError(f"apply takes a fxscale Plan, got {type(plan).__name__}; read a "
                            "plan file with fxscale.Plan.from_dict(json.load(f))")
        if plan.policy != self.policy:
            raise ValueError(f"the plan is for policy {plan.policy!r}; this server runs "
                             f"{self.policy!r}")
        if self.policy == "model":
            count = sum(e.count for e in plan.engines)
            targets = {name: (count, 1) for name in self.pools}
        else:
            rows = {g.kind: g for g in plan.groups if g.role == "operator"}
            targets = {name: (row.replicas, row.max_batch) for kind, row in rows.items()
                       for name in self._matching(kind)}
        self._resize({name: n for name, (n, _) in targets.items()})
        for name, (_, batch) in targets.items():
            pool = self.pools[name]
            if pool.max_batch > 1:  # a group that batches: the batch the plan sized it for
                pool.max_batch = max(2, min(batch, MAX_BATCH))
        return {name: n for name, (n, _) in targets.items()}

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
        total = sum(targets.get(n, p.target) for n, p in self.pools.items())
        if total > MAX_REPLICAS:
            raise ValueError(f"{len(targets)} groups resized would make {total} replicas in "
                             f"all, more than {MAX_REPLICAS} (fxscale.serving.MAX_REPLICAS)")
        for name, replicas in targets.items():
            self.pools[name].scale(replicas)

    def stats(self) -> dict[str, Any]:
        """Per group: replicas, queue, utilisation, latency; per request: TTFT, TBT, e2e."""
        finished = list(self.finished)
        summary: dict[str, Any] = {"completed": self.completed}
        if self.slo is not None:
            generated = [f for f in finished if "ttft_s" in f]
            met = sum(1 for f in generated if f["ttft_s"] <= self.slo.ttft
                      and f.get("tbt_s", 0.0) <= self.slo.tbt)
            summary["slo_attainment"] = met / len(generated) if generated else None
        summary.update(percentiles(finished, ("ttft_s", "tbt_s", "e2e_s")))
        return {"policy": self.policy, "budget": self.budget_size,
                "in_flight": self.in_flight,
                "groups": {name: pool.stats() for name, pool in sorted(self.pools.items())},
                "requests": summary,
                "autoscaler": self.autoscaler.report() if self.autoscaler else None}

    def close(self) -> None:
        """Stop accepting requests (waiting ones get ServerClosedError at once), finish those
        in flight, drain every pool, release the compiled code and the process settings."""
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
        self.requests.shutdown(wait=True)
        for pool in list(self.pools.values()):
            pool.close()
        for call in self.pool_calls:  # Dynamo's caches may keep the graphs; not the pools
            call.release()
        torch._dynamo.reset_code(self.entry.__code__)
        if self.holds_settings:
            self.holds_settings = False
            _ProcessSettings.release()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _CompileGate:
    """Many compiled calls at once (shared), or one that compiles (exclusive); a waiting
    compile goes before new shared calls, so it cannot starve."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = 0
        self.compiling = False
        self.waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: not self.compiling and not self.waiting)
            self.running += 1
        try:
            yield
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self.cond:
            self.waiting += 1
            self.cond.wait_for(lambda: not self.compiling and not self.running)
            self.waiting -= 1
            self.compiling = True
        try:
            yield
        finally:
            with self.cond:
                self.compiling = False
                self.cond.notify_all()


class _PoolCall(torch.nn.Module):
    """Stands in for a group's submodule: hands each call to the group's pool and waits."""

    def __init__(self, server: Server, pool: ReplicaPool, inner: Any,
                 weights: tuple[int, ...], batches: bool) -> None:
        super().__init__()
        self.server, self.pool, self.inner, self.weights = server, pool, inner, weights
        self.batches = batches  # row-wise in this graph: its calls may batch

    def forward(self, *args: Any) -> Any:
        if self.pool is None:
            raise ServerClosedError("this graph belongs to a closed fxscale server")
        request = getattr(self.server.local, "request", None)
        key = signature(self.inner, args, self.weights) if self.batches else None
        return self.pool.submit(Call(self.inner, args, self.weights, request, key)).result()

    def release(self) -> None:
        """Drop the server, its pool (and so the replicas' weight copies) and the group."""
        self.server = self.pool = self.inner = None


def _stream(tokens: queue.Queue, future: Future) -> Iterator[int]:
    """Yield tokens as they arrive; re-raise the request's error, if any."""
    while True:
        try:
            yield tokens.get(timeout=0.05)
            continue
        except queue.Empty:
            pass
        if future.done():
            while not tokens.empty():
                yield tokens.get()
            future.result()  # raises the request's exception, if it failed
            return


def serve(model: torch.nn.Module, policy: str = "operator", slo: SLO | None = None,
          budget: int = 2, backend: str = "local", **options: Any) -> Server:
    """Serve a model from per-operator-group replica pools on this machine (a Server)."""
    return Server(model, policy=policy, budget=budget, slo=slo, backend=backend, **options)
