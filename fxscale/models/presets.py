"""Model presets from public configs, analysed on the meta device and cached as JSON.

`preset_graph("llama-2-70b")` builds the model from its published config on the meta device
(no weights), runs `fxscale.explain` on it (the same path users get) and caches the
GroupGraph JSON, so the planner and simulator can read it without torch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fxscale.contracts.errors import InputError
from fxscale.contracts.group_graph import SCHEMA_VERSION, GroupGraph
from fxscale.contracts.jsonio import cache_root, write_atomic

# Published configs (Hugging Face config.json of each model), fields that shape the graph.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=4096)),
    "llama-2-13b": ("LlamaForCausalLM", dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
        max_position_embeddings=4096)),
    "llama-2-70b": ("LlamaForCausalLM", dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=4096)),
    "llama-3-8b": ("LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0)),
    "llama-3-70b": ("LlamaForCausalLM", dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0)),
    # long context: Llama 3.1's 128k positions, its rotary frequencies rescaled past 8k
    "llama-3.1-70b": ("LlamaForCausalLM", dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mixtral-8x7b": ("MixtralForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768)),
    "qwen2-7b": ("Qwen2ForCausalLM", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768)),
    # fine-grained mixture of experts: 128 small experts, 8 per token
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, norm_topk_prob=True,
        max_position_embeddings=40960, rope_theta=1000000.0)),
    "qwen2-57b-a14b": ("Qwen2MoeForCausalLM", dict(
        hidden_size=3584, intermediate_size=18944, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, num_experts=64, num_experts_per_tok=8,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=151936, max_position_embeddings=32768)),
}


def cache_dir() -> Path:
    """Where analysed presets are cached (the presets folder of the fxscale cache)."""
    return cache_root() / "presets"


def _check(name: str, layers: int | None = None) -> None:
    """Raise an InputError when `name` is not a preset or `layers` is not 1 to its layers."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    total = PRESETS[name][1]["num_hidden_layers"]
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)
                               or not 1 <= layers <= total):
        raise InputError(f"{name} has {total} layers; layers must be 1 to {total}, "
                         f"got {layers!r}")


def preset_model(name: str, layers: int | None = None):
    """The preset's model on the meta device in bf16 (optionally with fewer layers)."""
    import torch
    import transformers

    _check(name, layers)
    class_name, fields = PRESETS[name]
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(**{**fields, **(
        {"num_hidden_layers": layers} if layers else {})})
    with torch.device("meta"):
        return model_class(config).to(torch.bfloat16).eval()


def preset_graph(name: str, layers: int | None = None, refresh: bool = False,
                 phase: str = "prefill") -> GroupGraph:
    """The operator groups of a preset in a phase (cached JSON; analysed on first use).

    prefill: a prompt, costs in (batch, length). decode: one new token per request against a
    KV cache, costs in (batch, context). The cache key holds the phase, the GroupGraph schema,
    the fxscale version and a hash of the config, so a changed preset or analysis is never read
    from a stale file."""
    _check(name, layers)
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    from fxscale import __version__

    digest = hashlib.sha256(json.dumps([PRESETS[name], SCHEMA_VERSION, __version__],
                                       sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}{f'-{layers}l' if layers else ''}-{phase}-{digest}.json"
    if path.exists() and not refresh:
        try:
            return GroupGraph.from_json(path)
        except (OSError, ValueError):
            pass  # unreadable cache entry: analyse again and overwrite it
    import torch

    from fxscale.compiler.capture import explain
    from fxscale.profiling.workloads import inputs_for

    model = preset_model(name, layers)
    # example shape (batch 2, 128 tokens): symbolic, so costs evaluate at any shape
    graph = explain(model, **inputs_for(model).for_phase(phase, 2, 128, torch.Generator()))
    graph.model = name
    write_atomic(path, graph.to_json())
    return graph


def preset_service(name: str, device: str = "h100", layers: int | None = None,
                   expert_skew: float = 0.0):
    """The service model (kinds with fast cost functions) of a preset on a device model, a
    mixture of experts routed uniformly or with `expert_skew` (runtime/planner/service.py)."""
    from fxscale.profiling.cpu_calibration import device_model
    from fxscale.runtime.planner.service import service_model

    return service_model(preset_graph(name, layers), preset_graph(name, layers, phase="decode"),
                         device_model(device),
                         context_limit=PRESETS[name][1].get("max_position_embeddings"),
                         expert_skew=expert_skew)
