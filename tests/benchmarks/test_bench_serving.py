"""Serving benchmarks: time to ready of one group replica vs a whole-model replica.

Goal (issue: elastic runtime): a new replica is ready in proportion to the bytes it copies,
plus at most 50 ms. Run: python -m pytest tests/benchmarks/test_bench_serving.py \
    -m benchmark_suite --benchmark-enable --benchmark-json serving.json
"""
from __future__ import annotations

import pytest

import fxscale


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
