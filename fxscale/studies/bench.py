"""The benchmark matrix behind `fxscale bench`: run every family, write JSON, Markdown, plots.

    results = run_bench("bench-results", quick=True)   # results.json, results.md, *.png/svg

Families (fxscale/studies/bench_families.py): the compile path against eager and Inductor,
per-group profiles, the simulator's policy comparison, the local runtime's, the engine's
tokens/s against Hugging Face's, `fxscale serve` over HTTP against the engine in process, and
the Ray executor against the local one.
`quick` is sized to finish in a few minutes on a 2-core CPU; the full matrix takes much
longer (docs/benchmarks.md).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from fxscale.contracts.jsonio import output_folder, replace_folder
from fxscale.studies.bench_families import (
    CompileConfig,
    EngineConfig,
    HttpConfig,
    ProfileConfig,
    RayConfig,
    RuntimeConfig,
    SimulatorConfig,
    compile_latency,
    engine_throughput,
    group_profiles,
    http_serving,
    ray_executor,
    runtime_local,
    simulator_policies,
)
from fxscale.studies.bench_report import page, write_plots

# Bump when a key of results.json changes meaning or goes away (tests/test_bench.py checks it).
SCHEMA_VERSION = 1
FAMILIES = {"compile": compile_latency, "profiles": group_profiles,
            "simulator": simulator_policies, "runtime": runtime_local,
            "engine": engine_throughput, "http": http_serving, "ray": ray_executor}
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BenchConfig:
    """The matrix: one config per family (field names are the FAMILIES keys)."""

    compile: CompileConfig = CompileConfig()
    profiles: ProfileConfig = ProfileConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    engine: EngineConfig = EngineConfig()
    http: HttpConfig = HttpConfig()
    ray: RayConfig = RayConfig()


FULL = BenchConfig()
QUICK = BenchConfig(
    compile=CompileConfig(sizes=((2, 64),), batches=(2,), length=16, warmup=2, repeats=10),
    profiles=ProfileConfig(layers=2, hidden=64, batches=(1, 2), lengths=(8, 16), repeats=3),
    # every layer: with a few the model fits on one device, where all policies look alike
    simulator=SimulatorConfig(models=("llama-2-70b",), traces=("azure-conv", "azure-code"),
                              duration_s=300.0, slo_scales=(0.5, 1.0)),
    runtime=RuntimeConfig(seconds=5.0, hidden=256),
    engine=EngineConfig(hidden=(256,), requests=(16,), longest=64, new_tokens=8, rounds=2),
    http=HttpConfig(hidden=256, rates=(8.0,), seconds=5.0, rounds=2),
    ray=RayConfig(hidden=256, requests=16, longest=64, new_tokens=8, rounds=2,
                  hop_calls=100, ready_repeats=2, cold_starts=1, process_layers=(32,)))


def run_bench(out_dir: str | Path, quick: bool = False, progress: Progress | None = None,
              config: BenchConfig | None = None,
              families: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the matrix (QUICK or FULL unless `config` is given; only `families` if given) and
    write results.json, results.md and the plots into `out_dir`; `progress(message, done,
    total)` is called before each unit of work and once at the end. Returns what
    results.json holds."""
    config = config or (QUICK if quick else FULL)
    names = list(FAMILIES) if families is None else [n for n in FAMILIES if n in families]
    unknown = set(families or ()) - set(FAMILIES)
    if unknown or not names:
        raise ValueError(f"unknown benchmark families {sorted(unknown)}; choose from "
                         f"{', '.join(FAMILIES)}")
    target = output_folder(out_dir, bench_file, "benchmark results")  # before the work
    total = sum(getattr(config, name).units() for name in names)
    done = 0

    def tick(message: str) -> None:
        nonlocal done
        if progress:
            progress(message, done, total)
        done += 1

    load = os.getloadavg()  # other work on the machine makes latencies noisy: record it
    start = time.perf_counter()
    ran = {}
    for name in names:
        began = time.perf_counter()
        rows = FAMILIES[name](getattr(config, name), tick)
        ran[name] = {"wall_s": time.perf_counter() - began, "rows": rows}
    results = {"schema_version": SCHEMA_VERSION,
               "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "quick": quick, "wall_s": time.perf_counter() - start,
               "machine": {**machine(), "load_average_at_start": list(load)},
               "config": {name: asdict(getattr(config, name)) for name in names},
               "families": ran}
    if progress:
        progress("writing results", total, total)
    with replace_folder(target, bench_file, "benchmark results") as out:
        results["plots"] = write_plots(results, out)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(page(results))
    return results


def bench_file(name: str) -> bool:
    """Whether a file is one `fxscale bench` writes: results.json, results.md, the plots."""
    return name in ("results.json", "results.md") or name.endswith((".png", ".svg"))


def machine() -> dict[str, Any]:
    """What the numbers were measured on (every family runs on the CPU), OS and versions."""
    import torch

    from fxscale.profiling.measure import device_description, library_versions

    return {"device": device_description(torch.device("cpu")), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "versions": library_versions()}
