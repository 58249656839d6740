"""The benchmark families of `fxscale bench`: one plain function each, returning JSON-ready rows.

Every family takes its own frozen config (what to measure, how often) and a `tick(message)`
callback called once before each unit of work, so a caller can draw one progress bar over
all of them; `units()` on a config says how many ticks it will make.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from fxscale.contracts.plan import LIVE_POLICIES, POLICIES

Tick = Callable[[str], None]
BACKENDS: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "inductor": dict(backend="inductor"),
    "fxscale": dict(backend="fxscale",
                    options={"granularity": "operator", "lowering": "inductor"}),
}
MATCH_TOLERANCE = 1e-4  # relative to the largest |eager output|, as `fxscale demo` checks


def _no_tick(message: str) -> None:
    """The default tick: report nothing."""


@dataclass(frozen=True)
class CompileConfig:
    """Compile path: zoo Llama sizes (layers, hidden) x batches x backends, one sequence length."""

    sizes: tuple[tuple[int, int], ...] = ((4, 512),)
    batches: tuple[int, ...] = (1, 8)
    length: int = 128
    warmup: int = 3
    repeats: int = 20
    fresh_process: bool = True  # False: every run in this process (a smoke test's speed)

    def units(self) -> int:
        """Ticks the family makes: one per (size, batch, backend)."""
        return len(self.sizes) * len(self.batches) * len(BACKENDS)


def compile_latency(config: CompileConfig, tick: Tick = _no_tick) -> list[dict]:
    """Per Llama size, batch and backend: first call (compile) time, steady-state latency and
    the largest difference from eager. Each run gets a fresh process and an empty Inductor
    cache, so no backend's compile time is flattered by kernels another one built (unless
    config.fresh_process is False)."""
    spawn = multiprocessing.get_context("spawn")
    rows = []
    for (layers, hidden), batch, backend in itertools.product(config.sizes, config.batches,
                                                              BACKENDS):
        tick(f"compile path: llama {layers}x{hidden}, batch {batch}, {backend}")
        args = (backend, layers, hidden, batch, config.length, config.warmup, config.repeats)
        if not config.fresh_process:
            rows.append(_measure_backend(*args, None))
            continue
        with tempfile.TemporaryDirectory(prefix="fxscale-bench-inductor-") as cache, \
                ProcessPoolExecutor(1, mp_context=spawn) as pool:
            rows.append(pool.submit(_measure_backend, *args, cache).result())
    return rows


def _measure_backend(backend: str, layers: int, hidden: int, batch: int, length: int,
                     warmup: int, repeats: int, inductor_cache: str | None) -> dict:
    """One compile-path row, measured in the calling process (fresh, with an Inductor cache
    of its own, unless `inductor_cache` is None)."""
    import os

    import torch

    from fxscale.models import zoo

    if inductor_cache is not None:  # read when Inductor first compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    else:
        torch._dynamo.reset()  # compiled again in this process, not taken from a cache
    entry = zoo.build("llama", batch=batch, length=length, layers=layers, hidden=hidden)
    options = BACKENDS[backend]
    run = entry.model if options is None else torch.compile(entry.model, **options)
    with torch.no_grad():
        expected = entry.model(*entry.args, use_cache=False).logits
        start = time.perf_counter()
        actual = run(*entry.args, use_cache=False).logits
        first_call_s = time.perf_counter() - start
        for _ in range(warmup):
            run(*entry.args, use_cache=False)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(*entry.args, use_cache=False)
            times.append(time.perf_counter() - start)
    diff = (actual - expected).abs().max().item()
    return {"model": "llama", "layers": layers, "hidden": hidden, "batch": batch,
            "length": length, "backend": backend, "first_call_s": first_call_s,
            "latency_ms_median": statistics.median(times) * 1e3,
            "latency_ms_min": min(times) * 1e3, "latency_ms_max": max(times) * 1e3,
            "repeats": repeats, "max_abs_diff": diff,
            "matches_eager": diff <= MATCH_TOLERANCE * (expected.abs().max().item() or 1.0),
            "threads": torch.get_num_threads()}


@dataclass(frozen=True)
class ProfileConfig:
    """Per-group profiles: one zoo Llama measured over a (phase, batch, length) grid."""

    layers: int = 2
    hidden: int = 512
    batches: tuple[int, ...] = (1, 4, 16)
    lengths: tuple[int, ...] = (32, 128, 256)
    lowering: str = "inductor"
    repeats: int = 7

    def units(self) -> int:
        """Ticks the family makes: one (fxscale.profile draws no bar of its own here)."""
        return 1


def group_profiles(config: ProfileConfig, tick: Tick = _no_tick) -> list[dict]:
    """Median and spread of every operator group's latency at every grid point."""
    import torch

    from fxscale.models import zoo
    from fxscale.profiling.measure import Grid, profile

    tick(f"profiles: llama {config.layers}x{config.hidden}, "
         f"{len(config.batches) * len(config.lengths) * 2} grid points")
    entry = zoo.build("llama", layers=config.layers, hidden=config.hidden)
    torch._dynamo.reset()  # this profile's graphs only, not earlier compiles in the process
    measured = profile(entry.model, Grid(batches=config.batches, lengths=config.lengths),
                       lowering=config.lowering, repeats=config.repeats, progress=False)
    torch._dynamo.reset()
    return [{"group": g.group, "name": g.name, "stateful": g.stateful, "phase": p.phase,
             "batch": p.batch, "length": p.length, "median_ms": p.median_s * 1e3,
             "p10_ms": p.p10_s * 1e3, "p90_ms": p.p90_s * 1e3, "repeats": p.repeats}
            for g in measured.groups for p in g.points]


@dataclass(frozen=True)
class SimulatorConfig:
    """Policy comparison: model presets x traces x SLO scales on one device model."""

    models: tuple[str, ...] = ("llama-2-7b", "llama-2-70b", "mixtral-8x7b")
    layers: int | None = None          # None: every layer of the preset
    device: str = "h100"
    traces: tuple[str, ...] = ("azure-conv", "azure-code")
    start_s: float = 0.0
    duration_s: float | None = 1200.0  # None: the whole trace
    slo_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    attainment: float = 0.99
    policies: tuple[str, ...] = tuple(POLICIES)
    interval_s: float = 30.0

    def units(self) -> int:
        """Ticks the family makes: one per (model, trace, SLO scale)."""
        return len(self.models) * len(self.traces) * len(self.slo_scales)


def simulator_policies(config: SimulatorConfig, tick: Tick = _no_tick) -> list[dict]:
    """Each policy at its best autoscaler setting (as `fxscale simulate --policy all`), with
    its distance from the fluid bound, for every model, trace and SLO scale (the model's
    default TTFT and TBT targets times the scale)."""
    from fxscale.contracts.plan import SLO
    from fxscale.models.presets import preset_service
    from fxscale.runtime.planner.search import default_slo
    from fxscale.runtime.simulator.evaluate import compare
    from fxscale.runtime.simulator.replay import ScalingConfig
    from fxscale.runtime.traces.loaders import load_trace

    rows = []
    scaling = ScalingConfig(interval_s=config.interval_s)
    for model in config.models:
        service = None
        for trace_name, scale in itertools.product(config.traces, config.slo_scales):
            tick(f"simulator: {model}, {trace_name}, SLO x{scale:g}")
            # analysed lazily, so the first tick is shown while a new preset is analysed
            service = service or preset_service(model, config.device, config.layers)
            ttft, tbt = default_slo(service.weight_bytes / 2)
            slo = SLO(ttft * scale, tbt * scale, config.attainment)
            trace = load_trace(trace_name, config.start_s, config.duration_s)
            outcome = compare(service, trace, config.policies, slo, scaling)
            rows += [{"model": model, "layers": config.layers, "device": config.device,
                      "trace": trace_name, "requests": len(trace.requests),
                      "rejected_over_context": outcome["context"]["rejected"],
                      "duration_s": trace.duration_s(), "slo_scale": scale,
                      "slo_ttft_s": slo.ttft, "slo_tbt_s": slo.tbt,
                      **{key: _finite(row.get(key)) for key in SIMULATOR_KEYS},
                      # a policy no deployment lets meet the SLO: no numbers, and why
                      "infeasible": row.get("infeasible"),
                      "x_bound": None if "infeasible" in row else
                      row["gpu_hours"] / row["step_bound_gpu_hours"]}
                     for row in outcome["rows"]]
    return rows


SIMULATOR_KEYS = ("policy", "gpu_hours", "lower_bound_gpu_hours", "step_bound_gpu_hours",
                  "energy_kwh",
                  "slo_attainment", "meets_target", "ttft_p50", "ttft_p99", "tbt_p50",
                  "tbt_p99", "throughput_tok_s", "headroom", "floor", "wall_s")


@dataclass(frozen=True)
class RuntimeConfig:
    """Local runtime: the engine slice (DemoConfig.engine_slice), served once per autoscaling
    policy."""

    seconds: float = 30.0
    hidden: int = 2048
    policies: tuple[str, ...] = LIVE_POLICIES

    def units(self) -> int:
        """Ticks the family makes: one per policy."""
        return len(self.policies)


def runtime_local(config: RuntimeConfig, tick: Tick = _no_tick) -> list[dict]:
    """SLO attainment, throughput and latency percentiles of each policy serving the slice."""
    from fxscale.studies.demo import DemoConfig, serve_trace

    demo = DemoConfig.engine_slice(seconds=config.seconds, hidden=config.hidden)
    rows = []
    for policy in config.policies:  # one at a time, so each gets its own tick
        tick(f"runtime: {demo.seconds:g} s of {demo.trace}, llama {demo.layers}x{demo.hidden}, "
             f"{policy}-level autoscaling")
        results = serve_trace(demo, policies=(policy,))
        live = results["policies"][policy]["live"]
        rows.append({"policy": policy, "trace": demo.trace, "layers": demo.layers,
                     "hidden": demo.hidden, "budget": demo.budget, "slo_ttft_s": demo.ttft,
                     "slo_tbt_s": demo.tbt, **live["summary"], "ready_s": live["ready_s"],
                     "scale_decisions": len(live["autoscaler"]["decisions"])})
    return rows


def _finite(value: Any) -> Any:
    """The value, or None for a NaN or infinite float (JSON has neither)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class EngineConfig:
    """The engine against Hugging Face: generated tokens/s of fxscale.serve (both policies),
    `generate_batch` and a static batch on one Llama and one set of prompts (interleaved
    rounds: fxscale/studies/engine_bench.py)."""

    hidden: tuple[int, ...] = (1024,)
    requests: tuple[int, ...] = (16, 64)
    longest: int = 256
    new_tokens: int = 32
    rounds: int = 5
    dtype: str = "float32"

    def units(self) -> int:
        """Ticks the family makes: one per (hidden, requests)."""
        return len(self.hidden) * len(self.requests)


def engine_throughput(config: EngineConfig, tick: Tick = _no_tick) -> list[dict]:
    """Per (hidden, requests, generator): tokens/s median, min and max over the rounds, and
    the generator's median ratio to Hugging Face's generate_batch."""
    from fxscale.studies.engine_bench import EngineBench, compare_generators

    rows = []
    for hidden, requests in itertools.product(config.hidden, config.requests):
        tick(f"engine: {requests} requests on llama 2x{hidden}, {config.dtype}, "
             f"{config.rounds} interleaved rounds")
        bench = EngineBench(hidden=hidden, requests=requests, longest=config.longest,
                            new_tokens=config.new_tokens, dtype=config.dtype)
        result = compare_generators(bench, rounds=config.rounds)
        base = result["tokens_per_s"]["hf_batch"]["median"]
        for generator, rate in result["tokens_per_s"].items():
            rows.append({"hidden": hidden, "requests": requests, "dtype": config.dtype,
                         "generator": generator, "tokens_per_s": rate["median"],
                         "min_tokens_per_s": rate["min"], "max_tokens_per_s": rate["max"],
                         "x_hf_batch": rate["median"] / base})
    return rows


@dataclass(frozen=True)
class HttpConfig:
    """`fxscale serve` driven over the OpenAI API against the same engine in process, at
    several request rates of Azure conversation lengths, both policies
    (fxscale/studies/http_bench.py)."""

    hidden: int = 1024
    rates: tuple[float, ...] = (4.0, 12.0, 20.0)
    seconds: float = 15.0
    rounds: int = 3
    policies: tuple[str, ...] = LIVE_POLICIES

    def units(self) -> int:
        """Ticks the family makes: one per (policy, rate)."""
        return len(self.policies) * len(self.rates)


def http_serving(config: HttpConfig, tick: Tick = _no_tick) -> list[dict]:
    """Per (policy, rate): TTFT/TBT p50/p99, tokens/s and SLO attainment over HTTP and in
    process, and the HTTP overhead (median, min, max over rounds)."""
    from fxscale.studies.http_bench import HttpBench, compare_paths

    bench = HttpBench(hidden=config.hidden, seconds=config.seconds)
    rows = compare_paths(bench, config.rates, rounds=config.rounds, policies=config.policies,
                         progress=lambda message: tick(f"http: {message}"))
    return [{"hidden": bench.hidden, "layers": bench.layers, "trace": bench.trace, **row}
            for row in rows]


@dataclass(frozen=True)
class RayConfig:
    """The Ray executor against the local one: closed-loop tokens/s and latency on the same
    model and devices (also with one actor per device handing results over in it), the time
    of one group call through an actor, time to ready of a group's replica and of a model's,
    two actor processes against two threads on narrow many-layer models, a step's calls
    in one actor as one task against one task each, and plain calls against a Ray Compiled
    Graph (fxscale/studies/ray_bench.py)."""

    hidden: int = 512
    layers: int = 2
    requests: int = 32
    longest: int = 128
    new_tokens: int = 16
    rounds: int = 3
    hop_tokens: tuple[int, ...] = (1, 64, 512)
    hop_calls: int = 300
    ready_repeats: int = 5
    cold_starts: int = 3
    process_layers: tuple[int, ...] = (8, 32)
    fused_layers: tuple[int, ...] = (8,)
    compiled_layers: tuple[int, ...] = (8,)

    def units(self) -> int:
        """Ticks the family makes: executors, co-located, hops, time to ready, one per
        process model, fused-runs model and compiled-graph model."""
        return 4 + len(self.process_layers) + len(self.fused_layers) + \
            len(self.compiled_layers)


def _ray_row(measure: str, case: str, backend: str, unit: str, value: float,
             low: float | None = None, high: float | None = None) -> dict[str, Any]:
    """One figure of the Ray family (long format: one table for every measure)."""
    return {"measure": measure, "case": case, "backend": backend, "unit": unit,
            "value": value, "min": value if low is None else low,
            "max": value if high is None else high}


def _closed_loop_rows(case: str, result: dict[str, Any]) -> list[dict]:
    """Tokens/s and latency percentiles per backend, and each backend's tokens/s over the
    first's (local's, where local ran)."""
    rows = []
    for name, figures in result.items():
        if not isinstance(figures, dict) or "/" in name:
            continue
        for key, figure in figures.items():
            unit = "tokens/s" if key == "tokens_per_s" else "s"
            rows.append(_ray_row(key, case, name, unit, figure["median"], figure["min"],
                                 figure["max"]))
    for name, ratio in result.items():
        if "/" in name and name.endswith("_tokens_per_s"):
            rows.append(_ray_row("tokens_per_s_ratio", case, name.removesuffix("_tokens_per_s"),
                                 "x", ratio["median"], ratio["min"], ratio["max"]))
    return rows


def ray_executor(config: RayConfig, tick: Tick = _no_tick) -> list[dict]:
    """Rows of (measure, case, backend, unit, value, min, max): median and spread over
    interleaved rounds (hops: p10 and p90 of the calls)."""
    from fxscale.runtime.executors.ray_executor import one_ray_instance

    with one_ray_instance():  # one Ray start for every server of the family
        return _ray_rows(config, tick)


def _ray_rows(config: RayConfig, tick: Tick) -> list[dict]:
    """The Ray family's measurements, every server on the Ray instance now running."""
    from fxscale.studies import ray_bench
    from fxscale.studies.engine_bench import EngineBench

    bench = ray_bench.RayBench(EngineBench(hidden=config.hidden, layers=config.layers,
                                           requests=config.requests, longest=config.longest,
                                           new_tokens=config.new_tokens),
                               rounds=config.rounds)
    tick(f"ray: local vs Ray executor, llama {config.layers}x{config.hidden}, "
         f"{config.requests} requests, {config.rounds} rounds")
    rows = _closed_loop_rows(f"operator, llama {config.layers}x{config.hidden}, 2 devices",
                             ray_bench.executors(bench))
    tick("ray: one actor per device, results handed over in the actor or through Ray")
    rows += _closed_loop_rows(f"operator, llama {config.layers}x{config.hidden}, one actor per "
                              "device, attention apart", ray_bench.co_located(bench))
    tick(f"ray: one group call, {config.hop_calls} calls per size")
    for hop in ray_bench.hops(config.hop_tokens, calls=config.hop_calls):
        case = f"[{hop['tokens']}, {hop['hidden']}] fp32 ({hop['bytes']} B)"
        for backend in ("local", "ray"):
            call = hop[f"{backend}_us"]
            rows.append(_ray_row("call_s", case, backend, "s", call["median"] * 1e-6,
                                 call["p10"] * 1e-6, call["p90"] * 1e-6))
    tick("ray: time to ready")
    ready = ray_bench.ready(bench, repeats=config.ready_repeats,
                            cold_starts=config.cold_starts)
    for policy in ("operator", "model"):
        entry, seconds = ready[policy], ready[policy]["ready_s"]
        rows.append(_ray_row("ready_s", f"{entry['group']} ({entry['weight_bytes']} B)", "ray",
                             "s", seconds["median"], seconds["min"], seconds["max"]))
    cold = ready["cold_actor_start_s"]
    rows.append(_ray_row("ready_s", "a cold actor (no weights)", "ray", "s", cold["median"],
                         cold["min"], cold["max"]))
    for layers in config.process_layers:
        tick(f"ray: two model replicas, llama {layers}x64, threads vs processes")
        rows += _closed_loop_rows(f"model x2, llama {layers}x64",
                                  ray_bench.processes(bench, layers))
    for layers in config.fused_layers:
        tick(f"ray: every group in one actor, llama {layers}x64, one task per run or per call")
        rows += _closed_loop_rows(f"operator, llama {layers}x64, one actor",
                                  ray_bench.fused_runs(bench, layers))
    for layers in config.compiled_layers:
        tick(f"ray: attention apart, llama {layers}x64, plain calls or a compiled graph")
        case = f"operator, llama {layers}x64, one actor per device, attention apart"
        result = ray_bench.compiled_graphs(bench, layers)
        compile_s = result.pop("compile_s")
        rows += _closed_loop_rows(case, result)
        rows.append(_ray_row("compile_s", case, "ray, compiled graph", "s",
                             compile_s["median"], compile_s["min"], compile_s["max"]))
    return rows
