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
graph in a request thread; each group call is dispatched to its pool (runtime/replica_pool.py)
and executed there. `policy="model"` compiles the whole model as one group: the model-level
baseline on the same code path. Intra-op threads are set to 1 while the server runs: `budget`
is the number of group calls that execute at once. Row-wise groups batch the calls of
different requests (runtime/batching.py, up to `max_batch`); `autoscale=True` plans and
applies replicas per group every interval (runtime/autoscaler.py).
"""
from __future__ import annotations

import contextlib
import fnmatch
import itertools
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import torch
import torch.fx as fx

from .backend import fxscale_backend
from .passes.split import submodule_name
from .runtime.autoscaler import Autoscaler
from .runtime.batching import signature
from .runtime.budget import Budget
from .runtime.planner import SLO
from .runtime.quantile import percentiles, token_timings
from .runtime.replica_pool import Call, ReplicaPool

POLICIES = ("operator", "model")
SWITCH_INTERVAL_S = 0.0005  # the interpreter's default is 5 ms (see Server.__init__)


class OverloadError(RuntimeError):
    """The server already holds its maximum of in-flight requests."""


class Server:
    """A model served from per-group replica pools (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, policy: str = "operator", budget: int = 2,
                 slo: SLO | None = None, backend: str = "local", max_pending: int = 64,
                 submit_timeout_s: float = 10.0, lowering: str = "eager",
                 warmup: bool = True, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", max_batch: int = 16,
                 autoscale: bool = False, autoscale_interval_s: float = 1.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if autoscale and slo is None:
            raise ValueError("autoscale=True needs an SLO to plan for: pass "
                             "slo=fxscale.SLO(ttft=..., tbt=...)")
        if backend != "local":
            raise ValueError(f"backend {backend!r} is not available; this build serves on "
                             "the embedded local runtime: backend='local'")
        if budget < 1 or max_pending < 1 or max_batch < 1:
            raise ValueError(f"budget, max_pending and max_batch must be >= 1, got {budget}, "
                             f"{max_pending}, {max_batch}")
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
        self.submit_timeout_s = submit_timeout_s
        self.slots = threading.BoundedSemaphore(max_pending)
        self.in_flight = 0  # requests admitted and not finished
        self.max_pending = max_pending
        self.requests = ThreadPoolExecutor(max_workers=max_pending,
                                           thread_name_prefix="fxscale-request")
        self.local = threading.local()
        self.ids = itertools.count()
        self.finished: deque[dict[str, float]] = deque(maxlen=100_000)
        self.completed = 0  # requests finished, ever (`finished` keeps the latest only)
        self.closed = False
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # request and replica threads hand work over through the interpreter lock: a short
        # switch interval keeps a replica from waiting out whole 5 ms slices to start a call
        self.switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.compiled = torch.compile(self.model, backend=self._backend, dynamic=True)
        self.gate = _CompileGate()
        if warmup:  # capture the forward, prefill and decode graphs before traffic arrives
            probe = torch.zeros(1, 3, dtype=torch.long)
            self.submit(probe).result()
            self.generate(probe, max_new_tokens=2).result()
        # Dynamo does not compile safely from several threads: from here on a call that
        # needs a new graph fails fast and is compiled alone (see _call)
        torch.compiler.set_stance("fail_on_recompile")
        self.autoscaler = None
        if autoscale:
            self.autoscaler = Autoscaler(lambda: dict(self.pools), slo, budget,
                                         autoscale_interval_s).start()
        self.metrics = None
        if metrics_port is not None:  # opt-in Prometheus endpoint (loopback by default)
            from .metrics_endpoint import start_metrics

            self.metrics = start_metrics(self.stats, metrics_port, metrics_host)

    # ---- compilation: bind every group call to its pool -----------------------------------
    def _backend(self, gm: fx.GraphModule, example_inputs: list) -> Any:
        """Compile with fxscale, then route each group's calls through its replica pool."""
        lowered = fxscale_backend(gm, example_inputs, self.options)
        graph = getattr(lowered, "group_graph", None)
        if graph is None:  # grouping failed (warned): the graph runs eagerly, unpooled
            return lowered
        groups = {submodule_name(int(g.id[1:])): g for g in graph.groups}
        for node in lowered.graph.nodes:
            if node.op != "call_module" or node.target not in groups:
                continue
            group = groups[node.target]
            weights = tuple(i for i, a in enumerate(node.args)
                            if isinstance(a, fx.Node) and a.op == "placeholder"
                            and ("_parameters_" in a.name or "_buffers_" in a.name))
            batches = group.row_wise and not group.stateful  # in this graph
            with self.pools_lock:
                pool = self.pools.setdefault(group.name, ReplicaPool(
                    group.name, group.stateful, self.budget))
                if batches:  # a group may be row-wise in one graph only (the embedding)
                    pool.max_batch = self.max_batch
            lowered._modules[node.target] = _PoolCall(self, pool, getattr(lowered, node.target),
                                                      weights, batches)
        return lowered

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, input_ids: torch.Tensor, timeout_s: float | None = None) -> Future:
        """One forward pass (no KV cache); the future holds the logits."""
        ids = self._check(input_ids, 0)
        submitted = time.perf_counter()
        self._admit(timeout_s)
        return self.requests.submit(self._forward, ids, submitted)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, stream: bool = False,
                 timeout_s: float | None = None, ignore_eos: bool = False
                 ) -> Future | Iterator[int]:
        """Greedy decoding with a KV cache, stopping at the end-of-sequence token (unless
        ignore_eos, as benchmarks replaying a trace's lengths want): a future of the new
        token ids, or (stream=True) an iterator that yields each token as produced."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self._check(input_ids, max_new_tokens)
        record = {"submitted_at": time.perf_counter()}
        self._admit(timeout_s)
        tokens: queue.Queue | None = queue.Queue() if stream else None
        future = self.requests.submit(self._generate, ids, max_new_tokens, tokens, record,
                                      set() if ignore_eos else self.eos)
        future.record = record  # the request's timings once it finishes (see _generate)
        return _stream(tokens, future) if stream else future

    def _check(self, input_ids: Any, new_tokens: int) -> torch.Tensor:
        """Validate a request at submit time (nothing else is affected by a bad one)."""
        if self.closed:
            raise RuntimeError("the server is closed; create a new one with fxscale.serve")
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
        """Take an in-flight slot, waiting up to the timeout (back-pressure)."""
        wait = self.submit_timeout_s if timeout_s is None else timeout_s
        if not self.slots.acquire(timeout=wait):
            raise OverloadError(f"fxscale server: {self.max_pending} requests in flight for "
                                f"{wait:g} s; retry later, or raise max_pending or the budget")
        with self.pools_lock:
            self.in_flight += 1

    def _release(self) -> None:
        """Give back an in-flight slot."""
        with self.pools_lock:
            self.in_flight -= 1
        self.slots.release()

    def _forward(self, ids: torch.Tensor, submitted: float) -> torch.Tensor:
        """Run one forward pass in a request thread."""
        self.local.request = next(self.ids)
        try:
            with torch.no_grad():
                logits = self._call(ids, use_cache=False).logits
            self._finish({"e2e_s": time.perf_counter() - submitted})
            return logits
        finally:
            self._release()

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
            self._release()

    def _finish(self, record: dict[str, float]) -> None:
        """Keep a finished request's timings and count it."""
        with self.pools_lock:
            self.finished.append(record)
            self.completed += 1

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compiled model; a call that needs a new graph compiles while no other
        compiled call runs (group calls of other requests keep running in their pools)."""
        with self.gate.shared():
            try:
                return self.compiled(*args, **kwargs)
            except RuntimeError as err:
                if "fail_on_recompile" not in str(err):
                    raise
        with self.gate.exclusive(), torch.compiler.set_stance("default"):
            return self.compiled(*args, **kwargs)

    # ---- control ------------------------------------------------------------------------------
    def scale(self, group: str, replicas: int) -> list[str]:
        """Set the replica count of a group (its name, or a pattern like
        'model.layers.*#1/attention'); returns the groups scaled."""
        names = [n for n in self.pools if fnmatch.fnmatchcase(n, group)]
        if not names:
            raise ValueError(f"no group matches {group!r}; groups are {sorted(self.pools)[:8]}"
                             f"{' ...' if len(self.pools) > 8 else ''}")
        for name in names:
            self.pools[name].scale(replicas)
        return names

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
        """Stop accepting requests, finish those in flight, drain every pool."""
        if self.closed:
            return
        self.closed = True
        if self.autoscaler is not None:
            self.autoscaler.stop()
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics.server_close()
        self.requests.shutdown(wait=True)
        for pool in list(self.pools.values()):
            pool.close()
        torch.set_num_threads(self.threads)
        sys.setswitchinterval(self.switch_interval)
        torch.compiler.set_stance("default")

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
        request = getattr(self.server.local, "request", None)
        key = signature(self.inner, args, self.weights) if self.batches else None
        return self.pool.submit(Call(self.inner, args, self.weights, request, key)).result()


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
