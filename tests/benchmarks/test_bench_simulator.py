"""Planner and simulator benchmarks on the full Llama-2-70B preset (80 layers, 242 groups).

Goals (docs/simulator.md): one planner call <= 50 ms; a 1-hour trace replays in <= 30 s per
policy. The preset is analysed on the meta device on first use (about a minute), then cached.

Run: python -m pytest tests/benchmarks/test_bench_simulator.py -m benchmark_suite \
        --benchmark-enable --benchmark-json simulator.json
"""
from __future__ import annotations

import pytest

from fxscale.contracts.plan import SLO
from fxscale.models.presets import preset_service
from fxscale.runtime.planner.search import Workload, plan
from fxscale.runtime.simulator.evaluate import peak_rate
from fxscale.runtime.simulator.replay import ScalingConfig, simulate
from fxscale.runtime.traces.loaders import load_trace

SLO_70B = SLO(ttft=2.0, tbt=0.1)


@pytest.fixture(scope="module")
def service():
    return preset_service("llama-2-70b", "h100")


@pytest.fixture(scope="module")
def conversation():
    return load_trace("azure-conv")


@pytest.mark.parametrize("policy", ["model", "phase", "operator"])
@pytest.mark.parametrize("rate", [1.0, 5.5, 20.0])
def test_planner_call(benchmark, service, conversation, policy, rate):
    benchmark.group = f"planner call, llama-2-70b (80 layers), {rate} req/s"
    workload = Workload.from_requests(conversation.requests, rate)
    result = benchmark(plan, service, workload, SLO_70B, policy)
    assert result.devices >= 2 and len(result.groups) == 242 * len(result.engines)


@pytest.mark.parametrize("policy", ["static", "model", "phase", "operator"])
@pytest.mark.parametrize("trace_name", ["azure-conv", "azure-code"])
def test_one_hour_replay(benchmark, service, policy, trace_name):
    benchmark.group = f"1-hour replay, llama-2-70b on h100, {trace_name}"
    trace, _ = load_trace(trace_name).within_context(service.context_limit)
    fixed = None
    if policy == "static":  # the static deployment: planned for the peak 30-s rate
        fixed = plan(service, Workload.from_requests(trace.requests, peak_rate(trace, 30.0)),
                     SLO_70B, "static")
    result = benchmark.pedantic(simulate, (service, trace, policy, SLO_70B, ScalingConfig(),
                                           fixed), rounds=3, iterations=1)
    assert len(result.ttft) == len(trace.requests)
