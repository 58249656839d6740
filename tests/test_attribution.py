"""`fxscale simulate --attribute`: the operator mechanisms switch on and off for real, and the
gap splits into parts that sum to it."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from helpers import own_cache

from fxscale.cli.main import main
from fxscale.contracts.plan import SLO, EngineCount, OperatorShape, Plan
from fxscale.contracts.trace import Trace
from fxscale.models.presets import preset_graph
from fxscale.runtime.devices import load_device
from fxscale.runtime.planner.engines import Mechanisms, engine_for
from fxscale.runtime.planner.search import Workload, plan
from fxscale.runtime.planner.service import service_model
from fxscale.runtime.simulator.attribution import MECHANISMS, attribute, shapley
from fxscale.runtime.simulator.evaluate import compare
from fxscale.runtime.simulator.replay import ScalingConfig, Simulation
from fxscale.runtime.traces.loaders import load_trace, poisson_resample

SLO_TIGHT = SLO(ttft=0.1, tbt=0.004)  # scaled to a 4-layer model: a few ms per step


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A 4-layer Llama-2-70B on an H100 cut to 8 GB: pools and tensor parallelism form."""
    with own_cache(tmp_path_factory):
        graphs = (preset_graph("llama-2-70b", layers=4),
                  preset_graph("llama-2-70b", layers=4, phase="decode"))
    return service_model(*graphs, replace(load_device("h100"), memory_bytes=8e9))


@pytest.fixture(scope="module")
def step_trace():
    """100 req/s, then a burst at 400."""
    base = load_trace("azure-conv")
    calm, burst = poisson_resample(base, 100.0, 10, 2), poisson_resample(base, 400.0, 10, 3)
    return Trace("step", "synthetic", calm.requests + [
        replace(r, arrival_s=r.arrival_s + 10) for r in burst.requests])


def test_shapley_values_split_a_game_with_interactions_fairly():
    players = ("a", "b", "c")
    worth = {"a": 3.0, "b": -1.0, "c": 0.0}

    def value(coalition):  # additive, plus a b*c interaction shared by b and c
        return sum(worth[p] for p in coalition) + (4.0 if {"b", "c"} <= coalition else 0.0)

    values = {frozenset(c): value(set(c)) for n in range(4)
              for c in itertools.combinations(players, n)}
    phi = shapley(values, players)
    assert phi == pytest.approx({"a": 3.0, "b": 1.0, "c": 2.0})
    assert sum(phi.values()) == pytest.approx(values[frozenset(players)] - values[frozenset()])


def test_switched_off_mechanisms_change_what_the_planner_and_replay_build(service,
                                                                            step_trace):
    azure = load_trace("azure-conv")
    work = Workload.from_requests(azure.requests, azure.rate()).at(1000.0)
    slo = replace(SLO_TIGHT, tbt=0.006)  # where the planner picks disaggregated attention
    one_engine = Mechanisms(copies=False)
    shape = plan(service, work, slo, "operator", mechanisms=one_engine).engines[0].engine
    assert shape.attention > 0 and shape.dense_replicas > 1  # the case the switches matter
    alone = plan(service, work, slo, "operator",
                 mechanisms=Mechanisms(disaggregation=False, copies=False))
    assert alone.engines[0].engine.attention == 0
    # pooled prefill: a prompt's chunk spread over the dense replicas, or one chunk a step
    # (the plan's choice, and off whatever it chose when the mechanism is)
    pooled = replace(shape, pooled_prefill=True)
    assert engine_for(pooled).prompt_lane(256) == 256 * shape.dense_replicas
    assert engine_for(pooled, Mechanisms(pooled_prefill=False)).prompt_lane(256) == 256
    assert engine_for(replace(shape, pooled_prefill=False)).prompt_lane(256) == 256
    unpooled = plan(service, work, slo, "operator",
                    mechanisms=Mechanisms(pooled_prefill=False, copies=False))
    assert not any(e.engine.pooled_prefill for e in unpooled.engines if e.engine.attention)
    # fast start: added attention devices load no weights; without it they load as dense do
    scaling = ScalingConfig(interval_s=10, startup_s=7.0, load_bandwidth=1e9)
    small = Plan(policy="operator", model=service.model, device="h100", rate=1.0,
                 engines=(EngineCount(OperatorShape(1, 2, 2), 1),), devices=5, power_w=0.0,
                 ttft_p50=0.0, ttft_p99=0.0, tbt_p50=0.0, tbt_p99=0.0, chunk=256)
    grown = replace(small, engines=(EngineCount(OperatorShape(3, 2, 2), 1),), devices=7)
    load = service.weight_bytes / 2 / 1e9
    for mechanisms, wait in ((Mechanisms(), 7.0), (Mechanisms(fast_start=False), 7.0 + load)):
        sim = Simulation(service, step_trace, "operator", SLO_TIGHT, work, scaling,
                         mechanisms=mechanisms)
        sim._apply(small, 0.0, warm=True)
        sim._apply(grown, 10.0)
        (when, _, what, _), = sim.events
        assert what == "resize" and when == pytest.approx(10.0 + wait)


def test_an_operator_engine_re_splits_its_attention_on_new_sets_and_re_pools_at_once(
        service, step_trace):
    """Attention sets of another width hold the KV split otherwise: they start on devices of
    their own (no weights to load) while the old sets serve; a plan that only pools prompts
    otherwise starts nothing and switches at the decision."""
    work = Workload.from_requests(step_trace.requests, step_trace.rate())
    scaling = ScalingConfig(interval_s=10, startup_s=7.0, load_bandwidth=1e9)
    unsplit = Plan(policy="operator", model=service.model, device="h100", rate=1.0,
                   engines=(EngineCount(OperatorShape(4, 2, 2), 1),), devices=8,
                   power_w=0.0, ttft_p50=0.0, ttft_p99=0.0, tbt_p50=0.0, tbt_p99=0.0,
                   chunk=256)
    for shape, wait, extra in ((OperatorShape(4, 2, 2, attention_shards=4), 7.0, 4),
                               (OperatorShape(4, 2, 2, pooled_prefill=False), 0.0, 0)):
        sim = Simulation(service, step_trace, "operator", SLO_TIGHT, work, scaling)
        sim._apply(unsplit, 0.0, warm=True)
        sim._apply(replace(unsplit, engines=(EngineCount(shape, 1),)), 10.0)
        (when, _, what, (engine, spec, _, _)), = sim.events
        assert what == "resize" and when == pytest.approx(10.0 + wait)
        assert engine.extra_devices == extra and spec.kv_holders == 4 // shape.attention_shards


def test_the_gap_splits_into_parts_that_sum_to_it(service, step_trace):
    scaling = ScalingConfig(interval_s=10, startup_s=7.0, load_bandwidth=1e9)
    data = attribute(service, step_trace, SLO_TIGHT, scaling, {"operator": 5.0}, tune=False)
    rows = {r["policy"]: r for r in compare(service, step_trace, ("model", "operator"),
                                            SLO_TIGHT, scaling, tune=False,
                                            intervals={"operator": 5.0})["rows"]}
    # the ends are the policies themselves: model-level, and operator with every mechanism
    for metric in ("gpu_hours", "energy_kwh"):
        assert data["model"][metric] == pytest.approx(rows["model"][metric])
        assert data["operator"][metric] == pytest.approx(rows["operator"][metric])
        parts = sum(p[f"{metric}_points"] for p in data["parts"])
        assert parts == pytest.approx(data["total_points"][metric], abs=1.0)
        assert abs(data["residual_points"][metric]) < 1.0
    assert len(data["coalitions"]) == 2 ** len(MECHANISMS)
    assert {c["interval_s"] for c in data["coalitions"] if "fast_start" in c["mechanisms"]} \
        == {5.0}
    assert {c["interval_s"] for c in data["coalitions"]
            if "fast_start" not in c["mechanisms"]} == {10.0}
    moved = [p for p in data["parts"] if p["mechanism"] and abs(p["gpu_hours_points"]) > 0.1]
    assert moved, "some mechanism must change the cost on a burst"
    named = {p["source"] for p in data["parts"]}
    assert {"operator engine", "packing", "forecasting", "granularity"} <= named


def test_the_attribute_command_writes_a_waterfall_json_and_markdown(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "why"
    assert main(["simulate", "--attribute", "--model", "llama-2-7b", "--layers", "2",
                 "--duration", "30", "--headroom", "1", "--policy-interval", "operator=5",
                 "--attribute-dir", str(out), "--json", str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    assert "operator engine" in printed and "attention disaggregation" in printed
    data = json.loads((tmp_path / "a.json").read_text())
    assert data == json.loads((out / "attribution.json").read_text())
    assert data["config"]["policy_intervals"] == {"operator": 5.0}
    assert sum(p["gpu_hours"] for p in data["parts"]) == pytest.approx(
        data["total"]["gpu_hours"])
    assert (out / "attribution.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (out / "attribution.svg").read_bytes()[:400]
    page = (out / "attribution.md").read_text()
    assert "attribution.svg" in page and "--attribute" in page and "| model |" in page
    with pytest.raises(SystemExit) as refused:  # one of them, not both
        main(["simulate", "--attribute", "--sweep", "quick"])
    assert refused.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
