"""Model zoo: compiled outputs equal eager for every granularity (eager lowering) and with Inductor."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import fxscale
from fxscale.models import zoo


@pytest.mark.parametrize("granularity", ["operator", "layer", "model"])
@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_matches_eager(name, granularity):
    entry = zoo.build(name)
    with torch.no_grad():
        expected = entry.run()
        compiler = fxscale.Backend({"granularity": granularity, "lowering": "eager"})
        compiled = torch.compile(entry.model, backend=compiler)
        actual = entry.run(compiled)
        # fresh inputs of another shape: the same compiled model, no stale specialisation
        fresh = zoo.build(name, batch=3, length=12, seed=7)
        fresh.model.load_state_dict(entry.model.state_dict())
        expected2, actual2 = fresh.run(entry.model), fresh.run(compiled)
    assert compiler.group_graphs, "the fxscale backend was not used"
    graph = compiler.group_graphs[-1]
    if granularity == "model":
        assert len(graph.groups) == 1
    assert_close(actual, expected, 1e-5)
    assert_close(actual2, expected2, 1e-5)


@pytest.mark.inductor
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_inductor_lowering_matches_eager(name):
    entry = zoo.build(name)
    with torch.no_grad():
        expected = entry.run()
        compiler = fxscale.Backend()
        actual = entry.run(torch.compile(entry.model, backend=compiler))
    graph = compiler.group_graphs[-1]
    assert all(g.lowering.startswith("inductor") for g in graph.groups), \
        [g.lowering for g in graph.groups]
    # groups sharing compiled code still have a module each (per-group hooks, profiles)
    assert any("shares code" in g.lowering for g in graph.groups)
    assert len({id(g.callable) for g in graph.groups}) == len(graph.groups)
    assert_close(actual, expected, 1e-4)


def test_operator_groups_of_llama_layer():
    """Per layer: a row-wise GEMM group, a stateful attention group, a row-wise GEMM group."""
    entry = zoo.build("llama", layers=3)
    with torch.no_grad():
        compiler = fxscale.Backend({"lowering": "eager"})
        torch.compile(entry.model, backend=compiler)(*entry.args)
    graph = compiler.group_graphs[-1]
    for layer in range(3):
        groups = [g for g in graph.groups if g.layer == f"model.layers.{layer}"]
        assert [g.resource for g in groups] == ["compute", "stateful", "compute"], groups
        qkv, attention, mlp = groups
        assert attention.stateful and not attention.row_wise
        assert "attention" in attention.classes and "kv-cache" in attention.classes
        assert "gemm" not in attention.classes
        # norms are placed with the GEMMs they feed; rotary with the projections
        assert "norm" in qkv.classes and "norm" in mlp.classes
        assert not qkv.stateful and not mlp.stateful
        assert attention.param_bytes == 0 and qkv.param_bytes > 0
        assert "->" in attention.split_reason and "B cross" in attention.split_reason
