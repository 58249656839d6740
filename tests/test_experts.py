"""Mixtures of experts in the service model: a step reads the weights of the experts its tokens
reach (uniform or skewed routing), for every policy alike; the step bound stays below every
policy; the fine-grained preset carries its 128 experts."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
from helpers import own_cache

from fxscale.contracts.group_graph import Experts
from fxscale.contracts.plan import SLO
from fxscale.models.presets import preset_graph
from fxscale.runtime.devices import load_device
from fxscale.runtime.planner.service import Batch, service_model
from fxscale.runtime.simulator.evaluate import compare
from fxscale.runtime.simulator.replay import ScalingConfig
from fxscale.runtime.traces.loaders import load_trace


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Prefill and decode captures of a 2-layer Mixtral-8x7B and the prefill capture of a
    1-layer Qwen3-30B-A3B (meta device, real shapes)."""
    with own_cache(tmp_path_factory):
        yield (preset_graph("mixtral-8x7b", layers=2),
               preset_graph("mixtral-8x7b", layers=2, phase="decode"),
               preset_graph("qwen3-30b-a3b", layers=1))


def expert_kind(service):
    return next(k for k in service.kinds if k.experts)


def test_a_step_reads_the_experts_its_tokens_reach(graphs):
    """Mixtral's expert kind knows its 8 experts, 2 per token, and their weights; one decode
    token reaches exactly 2 of them, so its step reads a quarter of the expert weights (the
    time of one token falls to near a quarter of reading them all); a large batch reaches all
    8 and costs as before."""
    prefill, decode, _ = graphs
    service = service_model(prefill, decode, load_device("h100"))
    kind = expert_kind(service)
    per_expert = 3 * 4096 * 14336 * 2  # gate, up and down projections in bf16
    assert kind.experts == Experts(8, 2, 8 * per_expert) and kind.count == 2
    assert service.experts_reached(kind.experts, 1) == pytest.approx(2.0)
    assert service.unread_expert_bytes(kind, 1) == pytest.approx(6 * per_expert)
    assert service.experts_reached(kind.experts, 512) == pytest.approx(8.0)
    reads_all = replace(kind, experts=None)  # every expert's weights, every step
    one = Batch(decode_n=1, decode_s1=100.0)
    reached, everything = service.kind_time(kind, one), service.kind_time(reads_all, one)
    assert reached < 0.3 * everything  # weight reads dominate one token's step
    assert reached > 0.25 * everything * 0.9
    many = Batch(decode_n=512, decode_s1=512 * 100.0)
    assert service.kind_time(kind, many) == pytest.approx(service.kind_time(reads_all, many),
                                                          rel=1e-6)
    # tensor parallel: each shard reads its slice of the experts reached
    assert service.kind_time(kind, one, shards=2) < reached
    dense = sum(k.count * k.param_bytes for k in service.kinds if not k.experts)
    assert service.weight_bytes_read(1) == pytest.approx(dense + 2 * 2 * per_expert)
    assert service.weight_bytes_read(float("inf")) == service.weight_bytes


def test_skewed_routing_reaches_fewer_experts_and_uniform_matches_sampling(graphs):
    """Sampling tokens that each pick 2 distinct experts of 8 uniformly: the mean number
    reached is the formula's; a skewed routing (Zipf) reaches exactly 2 with one token, fewer
    than uniform beyond, all of them in the limit (even at the steepest skew allowed); a skew
    below 0 or above 10 is a clear error."""
    prefill, decode, _ = graphs
    uniform = service_model(prefill, decode, load_device("h100"))
    skewed = service_model(prefill, decode, load_device("h100"), expert_skew=1.5)
    experts = expert_kind(uniform).experts
    rng = random.Random(7)
    for tokens in (1, 3, 8, 20):
        sampled = sum(len({e for _ in range(tokens) for e in rng.sample(range(8), 2)})
                      for _ in range(4000)) / 4000
        assert uniform.experts_reached(experts, tokens) == pytest.approx(sampled, rel=0.02)
        if tokens > 1:
            assert skewed.experts_reached(experts, tokens) < \
                uniform.experts_reached(experts, tokens)
    assert skewed.experts_reached(experts, 1) == pytest.approx(2.0)  # each token: 2 experts
    assert skewed.experts_reached(experts, 10 ** 6) == pytest.approx(8.0)
    hottest = service_model(prefill, decode, load_device("h100"), expert_skew=4.0)
    assert hottest.routing(experts)[0] == 1.0 and sum(hottest.routing(experts)) == \
        pytest.approx(2.0)  # the hottest takes every token, the second share the rest
    one = Batch(decode_n=4, decode_s1=400.0)
    kind = expert_kind(skewed)
    assert skewed.kind_time(kind, one) < uniform.kind_time(expert_kind(uniform), one)
    for bad in (-1.0, 11.0, float("nan"), True):
        with pytest.raises(ValueError, match="expert_skew must be a number from 0"):
            service_model(prefill, decode, load_device("h100"), expert_skew=bad)
    steepest = service_model(prefill, decode, load_device("h100"), expert_skew=10.0)
    assert steepest.weight_bytes_read(float("inf")) == steepest.weight_bytes


def test_the_step_bound_stays_below_every_policy_on_a_mixture_of_experts(graphs):
    """The step bound charges a decode step the experts its largest batch reaches (the fewest
    weight bytes per token), so it stays below every policy, which read fewer at small
    batches than the whole model."""
    prefill, decode, _ = graphs
    service = service_model(prefill, decode, replace(load_device("h100"), memory_bytes=8e9))
    trace = load_trace("azure-conv").window(0, 120).scaled(4.0)
    outcome = compare(service, trace, ("static", "model", "phase", "operator"),
                      SLO(ttft=0.2, tbt=0.01), ScalingConfig(interval_s=10), tune=False)
    bound = outcome["bound"]
    assert bound["step_bound_gpu_hours"] > bound["lower_bound_gpu_hours"]
    for row in outcome["rows"]:
        assert bound["step_bound_gpu_hours"] <= row["gpu_hours"], row["policy"]
        assert bound["step_bound_energy_kwh"] <= row["energy_kwh"], row["policy"]


def test_the_fine_grained_preset_has_128_experts_8_per_token(graphs):
    _, _, fine = graphs
    experts = [g.experts for g in fine.groups if g.experts]
    per_expert = 3 * 2048 * 768 * 2
    assert experts == [Experts(128, 8, 128 * per_expert)]
