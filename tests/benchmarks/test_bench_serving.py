"""Serving benchmarks on the engine: time to ready of one group replica vs a whole-model
replica; generated tokens per second of the engine against Hugging Face's continuous
batching (`generate_batch`) and a static left-padded batch on the same model and prompts;
the demo's trace slice under both policies; the engine simulator against live runs.

Run (docs/runtime.md has the results):
    python -m pytest tests/benchmarks/test_bench_serving.py \
        -m benchmark_suite --benchmark-enable --benchmark-json serving.json
"""
from __future__ import annotations

import pytest

import fxscale
from fxscale.studies.demo import DemoConfig, serve_trace
from fxscale.studies.engine_bench import EngineBench, compare_generators


@pytest.mark.parametrize("policy, group", [("operator", "model.layers.1#2/gemm"),
                                           ("model", "*")])
def test_time_to_ready_of_one_replica(benchmark, llama_model, policy, group):
    benchmark.group = "time to ready of one new replica (llama-4x512, fp32)"
    with fxscale.serve(llama_model, policy=policy, budget=2) as server:
        name = server.scale(group, 1)[0]
        pool = server.pools[name]

        def add_one():
            server.scale(name, 2)
            ready = pool.stats()["time_to_ready_s"]
            server.scale(name, 1)
            return ready

        ready = benchmark.pedantic(add_one, rounds=5, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(group=name,
                                    bytes=pool.stats()["weight_bytes_per_replica"],
                                    ready_s=ready)


@pytest.mark.parametrize("requests", [16, 64])
@pytest.mark.parametrize("hidden", [1024, 2048])
def test_engine_tokens_per_second_against_hugging_face(benchmark, requests, hidden):
    """Interleaved rounds of the engine (both policies) and Hugging Face's generate_batch
    and static batch on one model and one set of prompts; medians and spreads."""
    benchmark.group = f"generated tokens/s, {requests} requests, llama 2x{hidden}"
    bench = EngineBench(hidden=hidden, requests=requests)
    result = benchmark.pedantic(compare_generators, args=(bench,), kwargs={"rounds": 5},
                                rounds=1, iterations=1)
    benchmark.extra_info.update(result)


def test_operator_vs_model_policy_on_a_trace_slice(benchmark):
    benchmark.group = "the demo's slice and devices, both policies, live and predicted"
    results = benchmark.pedantic(serve_trace, args=(DemoConfig(),), rounds=1, iterations=1)
    for policy, run in results["policies"].items():
        benchmark.extra_info[policy] = run["figures"]


@pytest.mark.parametrize("policy, micro_batches", [("operator", 1), ("model", 1),
                                                   ("operator", 2)])
def test_engine_simulator_fidelity(benchmark, policy, micro_batches):
    """A 2-minute slice with injected service times: predicted vs live (goal: within 10%);
    also the operator policy with two micro-batches side by side (and its gain, live)."""
    from fxscale.studies.fidelity import fidelity

    benchmark.group = "engine simulator: predicted vs live on a 2-minute Azure slice"
    config = DemoConfig.engine_slice(seconds=120.0, speedup=4.0, hidden=128)
    report = benchmark.pedantic(fidelity, args=(config, policy),
                                kwargs={"micro_batches": micro_batches}, rounds=1,
                                iterations=1)
    benchmark.extra_info.update(
        {k: report[k] for k in ("predicted", "measured", "relative_error", "measured_range",
                                "predicted_in_run", "relative_error_in_run")})
