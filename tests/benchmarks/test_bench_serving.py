"""Serving benchmarks: time to ready of one group replica vs a whole-model replica, and
decode throughput with selective batching vs per-request execution.

Goals (issue: elastic runtime): a new replica is ready in proportion to the bytes it copies,
plus at most 50 ms; selective batching decodes >= 1.5x the tokens/s of per-request execution
at 16 concurrent requests on the same 2-worker budget. Also recorded: SLO attainment and
throughput of the operator and model policies on one Azure conversation slice and budget
(what `fxscale demo` prints), and the runtime model's predicted vs measured TTFT/TBT on that
slice (goal: within 15%). Run:
    python -m pytest tests/benchmarks/test_bench_serving.py \
        -m benchmark_suite --benchmark-enable --benchmark-json serving.json
"""
from __future__ import annotations

import pytest
import torch
from bench_models import llama_2x2048

import fxscale
from fxscale.studies.demo import DemoConfig, serve_trace

CONCURRENT, PROMPT, NEW_TOKENS = 16, 16, 16


@pytest.mark.parametrize("policy, group", [("operator", "model.layers.1#2/gemm"),
                                           ("operator", "model.layers.1#1/attention"),
                                           ("model", "*")])
def test_time_to_ready_of_one_replica(benchmark, llama_model, policy, group):
    benchmark.group = "time to ready of one new replica (llama-4x512, fp32)"
    with fxscale.serve(llama_model, policy=policy, budget=2) as server:
        name = server.scale(group, 1)[0]
        pool = server.pools[name]

        def add_one():
            pool.scale(2)
            ready = pool.stats()["replica_ready_s"][-1]
            pool.scale(1)
            return ready

        ready = benchmark.pedantic(add_one, rounds=10, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(group=name,
                                    bytes=pool.stats()["weight_bytes_per_replica"],
                                    ready_s=ready)


@pytest.fixture(scope="module")
def decode_model():
    return llama_2x2048()


@pytest.mark.parametrize("max_batch", [16, 1], ids=["selective-batching", "per-request"])
def test_decode_tokens_per_second(benchmark, decode_model, max_batch):
    benchmark.group = (f"decode of {CONCURRENT} concurrent requests, budget 2 "
                       "(llama-2x2048, fp32)")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (1, PROMPT), generator=g) for _ in range(CONCURRENT)]
    with fxscale.serve(decode_model, policy="operator", budget=2, max_batch=max_batch) as server:
        def decode_all():
            futures = [server.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
            return [f.result() for f in futures]

        benchmark.pedantic(decode_all, rounds=2, iterations=1, warmup_rounds=1)
        groups = server.stats()["groups"].values()
    tokens = CONCURRENT * NEW_TOKENS
    benchmark.extra_info.update(
        tokens=tokens, tokens_per_s=tokens / benchmark.stats.stats.median,
        largest_batch=max(int(size) for g in groups for size in g["batch_sizes"]))


def test_operator_vs_model_policy_on_a_trace_slice(benchmark):
    benchmark.group = "Azure conversation slice, budget 2 (llama-2x2048 from the zoo)"
    results = benchmark.pedantic(serve_trace, args=(DemoConfig(),), rounds=1, iterations=1)
    for policy, run in results["policies"].items():
        benchmark.extra_info[policy] = run["summary"]


@pytest.mark.parametrize("policy", ["operator", "model"])
def test_runtime_model_fidelity(benchmark, policy):
    from fxscale.studies.fidelity import fidelity

    benchmark.group = "runtime model: predicted vs measured on the Azure slice"
    report = benchmark.pedantic(fidelity, args=(DemoConfig(), policy), rounds=1, iterations=1)
    benchmark.extra_info.update(
        {k: report[k] for k in ("predicted", "measured", "relative_error", "measured_range")},
        runs=[{k: run[k] for k in ("relative_error", "alone", "calibration")}
              for run in report["runs"]])
