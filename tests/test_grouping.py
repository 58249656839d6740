"""The grouping pass: granularities, intervals, split reasons, symbolic costs."""
from __future__ import annotations

import pytest
import torch

import fxscale
from fxscale.models import zoo
from fxscale.passes.node_facts import COMPUTE_OPS


def explain_zoo(name, granularity="operator", **build):
    entry = zoo.build(name, **build)
    return fxscale.explain(entry.model, *entry.args, granularity=granularity, **entry.kwargs)


def test_granularities_nest():
    layers = 3
    node = explain_zoo("llama", "node", layers=layers)
    operator = explain_zoo("llama", "operator", layers=layers)
    layer = explain_zoo("llama", "layer", layers=layers)
    model = explain_zoo("llama", "model", layers=layers)
    assert len(model.groups) == 1
    assert len(layer.groups) == layers + 2  # prologue, each layer, epilogue
    assert len(operator.groups) == 3 * layers + 2
    assert len(node.groups) > 10 * len(operator.groups)
    # every granularity covers the same nodes
    members = [sorted(n for g in gg.groups for n in g.nodes) for gg in (node, operator, layer, model)]
    assert all(m == members[0] for m in members)
    # coarser groups are unions of finer ones
    owner = {n: g.id for g in layer.groups for n in g.nodes}
    for g in operator.groups:
        assert len({owner[n] for n in g.nodes}) == 1


def test_groups_are_intervals_and_record_reasons():
    graph = explain_zoo("gpt2", layers=2)
    position = {}
    for g in graph.groups:
        for n in g.nodes:
            position[n] = len(position)
    for g in graph.groups:
        idx = [position[n] for n in g.nodes]
        assert idx == list(range(idx[0], idx[0] + len(idx)))
        assert g.split_reason
    class_cuts = [g for g in graph.groups if "->" in g.split_reason]
    assert class_cuts and all("B cross" in g.split_reason for g in class_cuts)


@pytest.mark.parametrize("batch,length", [(3, 24), (1, 5)])
def test_symbolic_costs_equal_costs_captured_at_that_shape(batch, length):
    """Costs evaluated at (batch, length) equal those of a static capture at that shape."""
    dynamic = explain_zoo("llama", batch=2, length=16)
    entry = zoo.build("llama", batch=batch, length=length)
    static = fxscale.explain(entry.model, *entry.args, dynamic=False)
    assert [g.name for g in static.groups] == [g.name for g in dynamic.groups]
    for d, s in zip(dynamic.groups, static.groups):
        for what in ("flops", "bytes_read", "bytes_written", "kv_bytes_per_token"):
            assert dynamic.cost(d, what, batch=batch, length=length) == pytest.approx(
                static.cost(s, what)), (d.name, what)
        assert d.param_bytes == s.param_bytes


def test_sensitivity_of_attention_vs_gemm():
    graph = explain_zoo("llama")
    attention = next(g for g in graph.groups if g.stateful)
    gemm = next(g for g in graph.groups if g.resource == "compute")
    assert attention.sensitivity["flops_length"] == pytest.approx(2.0)
    assert gemm.sensitivity["flops_length"] == pytest.approx(1.0)
    assert gemm.sensitivity["flops_batch"] == pytest.approx(1.0)
    assert attention.row_wise is False and gemm.row_wise is True


def test_meta_device_model_is_analysed_without_weights():
    entry = zoo.build("llama", layers=4, hidden=256, device="meta")
    assert next(entry.model.parameters()).is_meta
    graph = fxscale.explain(entry.model, *entry.args, use_cache=False)
    params = sum(p.numel() * p.element_size() for p in entry.model.parameters())
    # tied weights are counted where used; every parameter is used by some group
    assert sum(g.param_bytes for g in graph.groups) >= params
    assert len(graph.groups) == 3 * 4 + 2


def test_grouping_places_nodes_of_compute_ops_only():
    graph = explain_zoo("bert", layers=1)
    names = {n for g in graph.groups for n in g.nodes}
    entry = zoo.build("bert", layers=1)
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(entry.model, backend=backend)(*entry.args)
    compute = {n.name for n in captured[0].graph.nodes if n.op in COMPUTE_OPS}
    assert len(names) == len(compute)


def test_explain_accepts_a_compiled_model():
    entry = zoo.build("gpt2", layers=1)
    compiled = torch.compile(entry.model, backend="fxscale", options={"lowering": "eager"})
    graph = fxscale.explain(compiled, *entry.args)
    direct = fxscale.explain(entry.model, *entry.args)
    assert [g.name for g in graph.groups] == [g.name for g in direct.groups]


def test_mixture_of_experts_splits_routing_from_experts():
    graph = explain_zoo("mixtral", layers=1)
    routing = next(g for g in graph.groups if g.classes[0] == "moe-routing")
    experts = next(g for g in graph.groups if g.classes[0] == "moe-expert")
    assert routing.resource == "memory" and experts.resource == "compute"
    assert experts.param_bytes > 10 * routing.param_bytes
    # gate/up and down expert GEMMs: every routed token (k=2 per token) meets its experts
    tokens, hidden, ffn, k = 3 * 40, 64, 128, 2
    expected = 2 * tokens * k * hidden * 2 * ffn + 2 * tokens * k * ffn * hidden
    assert graph.cost(experts, "flops", batch=3, length=40) >= expected
