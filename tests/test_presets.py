"""Model presets: published configs analysed on the meta device, cached as JSON."""
from __future__ import annotations

import sys

import pytest

from fxscale.models.presets import PRESETS, preset_graph, preset_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_analyses_on_meta(name, tmp_path, monkeypatch):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path))
    graph = preset_graph(name, layers=2)
    model = preset_model(name, layers=2)
    assert next(model.parameters()).is_meta
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    inv_freq = model.model.rotary_emb.inv_freq  # the one buffer the forward reads
    # every parameter and used buffer counted exactly once (no preset ties weights)
    assert sum(g.param_bytes for g in graph.groups) == params + inv_freq.numel() * 2
    per_layer = [g for g in graph.groups if g.layer and g.layer.endswith(".0")]
    assert sum(g.stateful for g in per_layer) == 1
    if "mixtral" in name or "a14b" in name:
        assert {"moe-routing", "moe-expert"} <= {g.classes[0] for g in per_layer}
    assert list((tmp_path / "presets").glob(f"{name}-2l-prefill-*.json"))


def test_preset_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path))
    first = preset_graph("llama-2-7b", layers=1)

    def fail(*args, **kwargs):
        raise AssertionError("a cached preset must not be analysed again")

    monkeypatch.setattr(sys.modules["fxscale.compiler.capture"], "explain", fail)
    assert preset_graph("llama-2-7b", layers=1) == first
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'"):
        preset_model("gpt-5")


def test_decode_preset_costs_are_functions_of_batch_and_context(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path))
    graph = preset_graph("llama-2-7b", layers=2, phase="decode")
    heads, dim = 32, 128
    attention = [g for g in graph.groups if g.stateful]
    assert len(attention) == 2
    for batch, context in ((1, 17), (8, 4096)):
        for g in attention:
            # one new token attends to context + 1 keys, QK^T and PV
            assert graph.cost(g, "flops", batch=batch, context=context) == \
                4 * batch * heads * (context + 1) * dim
        # reading the KV cache dominates decode attention: memory-bound
        moved = graph.bytes_moved(attention[0], batch=batch, context=context)
        assert moved >= 2 * batch * heads * context * dim * 2
    assert attention[0].kv_bytes_per_token == "16384"  # K and V, 32 heads x 128, bf16
    with pytest.raises(ValueError, match="phase must be"):
        preset_graph("llama-2-7b", phase="train")
