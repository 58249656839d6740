"""The Ray executor against the local one (runtime/executors/ray_executor.py), measured:

- `executors`: generated tokens/s and TTFT/TBT p50/p99 of fxscale.serve with
  backend="local", backend="ray" (activations passed actor to actor) and backend="ray" with
  pass_handles=False (every call's result back through the server) on the same model,
  prompts and devices, closed loop (every request submitted at once), interleaved rounds;
- `co_located`: the groups placed on a device in one actor (`actors="device"`), attention on
  one device and the dense groups on the other (a plan), consecutive calls in an actor
  handing their results over in it (`local_handoff`, one task per run) against through Ray
  (one task per call), and local;
- `fused_runs`: every group in one actor (one device), a narrow model of many layers: a step's
  calls as one Ray task (`fuse_runs`) against one task per call;
- `compiled_graphs`: attention on one device's actor and the dense groups on the other's, a
  narrow model of many layers: steps as plain actor calls passing refs against through a
  Ray Compiled Graph (`compiled_graph`), live from a round's first step (an untimed burst
  before the round compiles it: a graph is torn down after a second idle), and the seconds
  a compile takes (on a thread beside the steps, which take the plain path meanwhile);
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

# the servers: name -> its serve() options
BACKENDS = {"local": {"backend": "local"}, "ray": {"backend": "ray"},
            "ray per device": {"backend": "ray", "actors": "device"}}
# what is compared: name -> (the server, its executor's settings for the rounds); "ray via
# server" is the Ray server again (same actors and placement: two Ray servers' bundles do
# not both fit 2 CPUs) bringing every call's result back to the server
EXECUTORS = {"local": ("local", {}), "ray": ("ray", {"pass_handles": True}),
             "ray via server": ("ray", {"pass_handles": False})}
PROCESSES = {"local": ("local", {}), "ray": ("ray", {})}
CO_LOCATED = {"local": ("local", {}),
              "ray, in the actor": ("ray per device", {"local_handoff": True}),
              "ray, through Ray": ("ray per device", {"local_handoff": False})}
FUSED = {"ray, one task per run": ("ray per device", {"fuse_runs": True}),
         "ray, one task per call": ("ray per device", {"fuse_runs": False})}
COMPILED = {"ray, plain calls": ("ray per device", {"compiled_graph": False}),
            "ray, compiled graph": ("ray per device", {"compiled_graph": True})}

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


def _interleaved(servers: dict[str, tuple[Any, dict[str, Any]]], prompts: list[torch.Tensor],
                 new_tokens: int, rounds: int, progress: Callable[[str], None],
                 prime: Callable[[Any], None] = lambda server: None) -> dict[str, Any]:
    """Rounds of each server (name -> (server, its executor's settings for the round)) in
    turn, after an untimed one each; per server, each figure's median, min and max, and per
    round the ratio of each other's tokens/s to the first's. `prime(server)` runs untimed
    just before each round, its settings made."""
    names = list(servers)

    def loop(name: str) -> dict[str, float]:
        server, settings = servers[name]
        for attribute, value in settings.items():  # set while no request runs
            setattr(server.executor, attribute, value)
        prime(server)
        return _closed_loop(server, prompts, new_tokens)

    for name in names:
        loop(name)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names:
            progress(f"round {i + 1}/{rounds}: {name}")
            runs[name].append(loop(name))
    out: dict[str, Any] = {name: {key: _spread([r[key] for r in rows]) for key in rows[0]}
                           for name, rows in runs.items()}
    first = names[0]
    for other in names[1:]:
        out[f"{other}/{first}_tokens_per_s"] = _spread(
            [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs[first], runs[other])])
    return out


def _compared(bench: RayBench, engine: EngineBench, compared: dict[str, tuple[str, dict]],
              progress: Callable[[str], None], prime: Callable[[Any], None] = lambda s: None,
              **options: Any) -> dict[str, Any]:
    """The same model, prompts and server options on each server `compared` names (with
    its executor settings), in interleaved closed-loop rounds (_interleaved)."""
    import fxscale

    model = engine.model()
    prompts = [torch.tensor([p]) for p in engine.prompts()]
    options.update(devices=fxscale.Devices(count=bench.devices), max_pending=engine.requests,
                   max_batch=engine.requests,
                   kv_cache_tokens=engine.requests * (engine.longest + engine.new_tokens))
    servers: dict[str, Any] = {}
    try:
        for name, _ in compared.values():
            if name not in servers:
                servers[name] = fxscale.serve(model, **BACKENDS[name], **options)
        runs = {label: (servers[name], settings) for label, (name, settings) in compared.items()}
        return _interleaved(runs, prompts, engine.new_tokens, bench.rounds, progress, prime)
    finally:
        for server in servers.values():
            server.close()


def executors(bench: RayBench, policy: str = "operator",
              progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Closed-loop tokens/s and latency of both executors (module docstring)."""
    return {"policy": policy,
            **_compared(bench, bench.engine, EXECUTORS, progress, policy=policy)}


def co_located(bench: RayBench, progress: Callable[[str], None] = lambda m: None
               ) -> dict[str, Any]:
    """Closed-loop tokens/s and latency of one actor per device hosting its groups, the
    attention groups on device 0 and the dense ones on the others, handing results over in
    the actor or through Ray (module docstring)."""
    return {"policy": "operator",
            **_compared(bench, bench.engine, CO_LOCATED, progress, policy="operator",
                        plan=attention_apart(bench.devices))}


def fused_runs(bench: RayBench, layers: int = 8,
               progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Closed-loop tokens/s and latency of one actor hosting every group of a narrow model
    of many layers, a step's calls sent as one task or one task each (module docstring)."""
    engine = replace(bench.engine, hidden=64, layers=layers)
    one = replace(bench, devices=1)
    return {"policy": "operator", "hidden": 64, "layers": layers,
            **_compared(one, engine, FUSED, progress, policy="operator")}


def compiled_graphs(bench: RayBench, layers: int = 8,
                    progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Closed-loop tokens/s and latency of one actor per device, attention apart, on a
    narrow model of many layers, plain calls against a compiled graph live from the round's
    first step (module docstring); and what compiling took."""
    engine = replace(bench.engine, hidden=64, layers=layers)
    compiles: list[dict[str, Any]] = []
    warm = [torch.tensor([p]) for p in engine.prompts()[:4]]

    def live_graph(server: Any) -> None:
        """With compiled_graph on: a burst (untimed) until a graph is live."""
        if not server.executor.compiled_graph:
            return
        deadline = time.monotonic() + 120
        while not server.stats()["engine"]["compiled_graph"]["live"]:
            if time.monotonic() > deadline:
                raise RuntimeError("no compiled graph went live within 120 s of steps")
            _closed_loop(server, warm, engine.new_tokens)
        compiles.append(server.stats()["engine"]["compiled_graph"])

    out = _compared(bench, engine, COMPILED, progress, prime=live_graph, policy="operator",
                    plan=attention_apart(bench.devices))
    return {"policy": "operator", "hidden": 64, "layers": layers,
            "compile_s": _spread([c["compile_s"] / c["compiled"] for c in compiles]), **out}


def attention_apart(devices: int) -> Any:
    """An operator plan of one replica per group: the attention groups on device 0, every
    other group on devices 1 and up."""
    from fxscale.contracts.plan import GroupPlacement, Plan

    rows = (GroupPlacement("*", "*", "operator", 1, devices=tuple(range(1, devices))),
            GroupPlacement("*attention", "*attention", "operator", 1, devices=(0,)))
    return Plan("operator", "any", "cpu", 0.0, (), devices, 0.0, 0.0, 0.0, 0.0, 0.0, 0, rows)


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
          cold_starts: int = 3) -> dict[str, Any]:
    """A cold actor's start (a process importing torch), then time to ready of a new
    dense-group replica and of a new whole-model replica, both Ray actors taken warm
    (spare), `repeats` scale-ups each, with their weight bytes. Before each scale-up the
    bench waits until the spare actors run (the one the previous scale-up took is started
    again behind it)."""
    import fxscale
    from fxscale.contracts.devices import Devices
    from fxscale.runtime.engine.attention import register
    from fxscale.runtime.executors.ray_executor import RayExecutor

    out: dict[str, Any] = {}
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
    model = bench.engine.model()
    for policy, name, pattern in (("operator", group, group), ("model", "model", "*")):
        with fxscale.serve(model, policy=policy, backend="ray",
                           devices=Devices(count=bench.devices)) as server:
            seconds = []
            for _ in range(repeats):
                server.executor.wait_for_spares()
                server.scale(pattern, 2)
                stats = server.stats()["groups"][name]
                seconds.append(stats["time_to_ready_s"])
                server.scale(pattern, 1)
        ready_s = _spread(seconds)
        out[policy] = {"group": name, "weight_bytes": stats["weight_bytes_per_replica"],
                       "ready_s": ready_s,
                       "mb_per_s": stats["weight_bytes_per_replica"] / 1e6 / ready_s["median"]}
    return out


def processes(bench: RayBench, layers: int = 8,
              progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Two model replicas: threads of this process against two Ray actor processes, on a
    narrow model of many layers (closed loop, interleaved rounds; a model-policy step is one
    call, which takes the direct path: no handles)."""
    engine = replace(bench.engine, hidden=64, layers=layers)
    return {"hidden": 64, "layers": layers, "replicas": 2,
            **_compared(bench, engine, PROCESSES, progress, policy="model", replicas=2)}
