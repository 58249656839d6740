"""The Ray executor against the local one (runtime/executors/ray_executor.py), measured:

- `executors`: generated tokens/s and TTFT/TBT p50/p99 of fxscale.serve with
  backend="local" and backend="ray" on the same model, prompts and devices, closed loop
  (every request submitted at once), interleaved rounds;
- `hops`: the time one group call takes through a Ray actor against the same call on a
  local replica (an identity function on activations of 1-512 tokens), and the difference:
  what each hop between the server and a group's actor costs;
- `ready`: time to ready of a new replica of one dense group against a new whole-model
  replica (each an actor mapping its weights from the object store), with their bytes, and
  the start of a cold actor (a process importing torch) that a spare actor saves;
- `processes`: two model replicas as two Ray actor processes against two replica threads
  of this process, on narrow models of many layers whose Python overhead caps the threads.

`fxscale bench --family ray` runs them (fxscale/studies/bench_families.py). Ray starts a
private instance on 127.0.0.1 for each server (stopped by its close())."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from fxscale.contracts.metrics import percentiles
from fxscale.studies.engine_bench import EngineBench

BACKENDS = ("local", "ray")


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass(frozen=True)
class RayBench:
    """The model and prompts (the engine benchmark's), the devices and the rounds of the
    closed-loop comparison."""

    engine: EngineBench = EngineBench(hidden=512, requests=32, longest=128, new_tokens=16)
    devices: int = 2
    rounds: int = 3


def _closed_loop(server, prompts: list[torch.Tensor], new_tokens: int) -> dict[str, float]:
    """Every prompt at once; tokens/s and the requests' TTFT/TBT percentiles."""
    start = time.perf_counter()
    futures = [server.generate(p, max_new_tokens=new_tokens, ignore_eos=True)
               for p in prompts]
    for future in futures:
        future.result()
    wall = time.perf_counter() - start
    figures = percentiles([f.record for f in futures], ("ttft_s", "tbt_s"), (50, 99))
    return {"tokens_per_s": len(prompts) * new_tokens / wall, **figures}


def _interleaved(servers: dict[str, Any], prompts: list[torch.Tensor], new_tokens: int,
                 rounds: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Rounds of each server in turn (after an untimed one each); per server, each figure's
    median, min and max, and per round the ratio of the second's tokens/s to the first's."""
    names = list(servers)
    for name in names:
        _closed_loop(servers[name], prompts, new_tokens)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names:
            progress(f"round {i + 1}/{rounds}: {name}")
            runs[name].append(_closed_loop(servers[name], prompts, new_tokens))
    out: dict[str, Any] = {name: {key: _spread([r[key] for r in rows]) for key in rows[0]}
                           for name, rows in runs.items()}
    first, second = names
    out[f"{second}/{first}_tokens_per_s"] = _spread(
        [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs[first], runs[second])])
    return out


def _both_backends(bench: RayBench, engine: EngineBench, progress: Callable[[str], None],
                   **options: Any) -> dict[str, Any]:
    """The same model, prompts and server options with each backend, compared in
    interleaved closed-loop rounds (_interleaved)."""
    import fxscale

    model = engine.model()
    prompts = [torch.tensor([p]) for p in engine.prompts()]
    options.update(devices=fxscale.Devices(count=bench.devices), max_pending=engine.requests,
                   max_batch=engine.requests,
                   kv_cache_tokens=engine.requests * (engine.longest + engine.new_tokens))
    servers = {}
    try:
        for backend in BACKENDS:
            servers[backend] = fxscale.serve(model, backend=backend, **options)
        return _interleaved(servers, prompts, engine.new_tokens, bench.rounds, progress)
    finally:
        for server in servers.values():
            server.close()


def executors(bench: RayBench, policy: str = "operator",
              progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Closed-loop tokens/s and latency of both executors (module docstring)."""
    return {"policy": policy,
            **_both_backends(bench, bench.engine, progress, policy=policy)}


def _identity(*args: Any) -> Any:
    """A group function that does nothing: a call's time is then all hand-over."""
    return args[0]


def hops(tokens: tuple[int, ...] = (1, 64, 512), hidden: int = 1024, calls: int = 300
         ) -> list[dict[str, Any]]:
    """Per activation size: a call on a local replica and through a Ray actor (median, p10,
    p90 in microseconds) and the median difference (module docstring)."""
    from fxscale.contracts.devices import Devices
    from fxscale.runtime.executors.local import LocalReplica, StateSlots
    from fxscale.runtime.executors.ray_executor import RayExecutor

    executor = RayExecutor(Devices(count=1), spares=0)
    slots = threading.Semaphore(1)
    replicas = {"local": LocalReplica(0, slots, "hop"),
                "ray": executor.replica(0, slots, "hop", 0)}
    none = StateSlots((), frozenset())
    rows = []
    try:
        for count in tokens:
            x = torch.randn(count, hidden)
            seconds: dict[str, list[float]] = {name: [] for name in replicas}
            for _ in range(calls):  # interleaved: a drift hits both
                for name, replica in replicas.items():
                    seconds[name].append(replica.run_here(_identity, [x], none)[1])
            row: dict[str, Any] = {"tokens": count, "hidden": hidden,
                                   "bytes": x.numel() * x.element_size(), "calls": calls}
            for name, values in seconds.items():
                q = statistics.quantiles([v * 1e6 for v in values], n=10)
                row[f"{name}_us"] = {"median": statistics.median(values) * 1e6,
                                     "p10": q[0], "p90": q[-1]}
            row["hop_us"] = row["ray_us"]["median"] - row["local_us"]["median"]
            rows.append(row)
    finally:
        for replica in replicas.values():
            replica.stop()
        executor.close()
    return rows


def ready(bench: RayBench, group: str = "model.layers.0#2/gemm", repeats: int = 3,
          cold_starts: int = 3, settle_s: float = 4.0) -> dict[str, Any]:
    """Time to ready of a new dense-group replica and of a new whole-model replica, both
    Ray actors taken warm (spare), `repeats` scale-ups each (`settle_s` apart, so the spare
    taken is started again; the first finds those the server started), with their weight
    bytes; and a cold actor's start."""
    import fxscale
    from fxscale.contracts.devices import Devices
    from fxscale.runtime.engine.attention import register
    from fxscale.runtime.executors.ray_executor import RayExecutor

    model = bench.engine.model()
    out: dict[str, Any] = {}
    for policy, name, pattern in (("operator", group, group), ("model", "model", "*")):
        with fxscale.serve(model, policy=policy, backend="ray",
                           devices=Devices(count=bench.devices)) as server:
            seconds = []
            for i in range(repeats):
                time.sleep(settle_s if i else 0.0)
                server.scale(pattern, 2)
                stats = server.stats()["groups"][name]
                seconds.append(stats["time_to_ready_s"])
                server.scale(pattern, 1)
        ready_s = _spread(seconds)
        out[policy] = {"group": name, "weight_bytes": stats["weight_bytes_per_replica"],
                       "ready_s": ready_s,
                       "mb_per_s": stats["weight_bytes_per_replica"] / 1e6 / ready_s["median"]}
    executor = RayExecutor(Devices(count=1), spares=0, setup=register)
    try:
        starts = []
        for _ in range(cold_starts):
            start = time.perf_counter()
            actor, _ = executor.actor_for(0)
            starts.append(time.perf_counter() - start)
            executor.stop_actor(actor)
        out["cold_actor_start_s"] = _spread(starts)
    finally:
        executor.close()
    return out


def processes(bench: RayBench, layers: int = 8,
              progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Two model replicas: threads of this process against two Ray actor processes, on a
    narrow model of many layers (closed loop, interleaved rounds)."""
    engine = replace(bench.engine, hidden=64, layers=layers)
    return {"hidden": 64, "layers": layers, "replicas": 2,
            **_both_backends(bench, engine, progress, policy="model", replicas=2)}
