"""What a runner of steps needs from the model: a private copy of its modules, its attention
routed to the paged cache (runtime/engine/attention.py), one step's forward pass; and, for
models whose attention cannot be routed, `SequentialRunner`: each chunk of a step runs alone
over that request's own Hugging Face cache (the same scheduler and steps, without batched
attention). The engine's usual runner is runtime/engine/pooled.py."""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

from fxscale.contracts.step import Step
from fxscale.runtime.engine.attention import ATTENTION, AttentionLayer, register


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model's modules and config copied, its parameters and buffers shared: the engine
    changes its copy's attention and attaches caches without touching the user's model."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def route_attention(model: torch.nn.Module, layers: list[AttentionLayer], num_blocks: int,
                    block_size: int, backend: str = "auto") -> int:
    """Attach a paged KV cache ([num_blocks, block_size, kv_heads, head_dim] for K and V) to
    each attention module as buffers and route the model's attention to it; the bytes used."""
    register()
    device = next(model.parameters()).device
    total = 0
    for layer in layers:
        for name in ("fxscale_k_cache", "fxscale_v_cache"):
            cache = torch.zeros(num_blocks, block_size, layer.kv_heads, layer.head_dim,
                                dtype=layer.dtype, device=device)
            layer.module.register_buffer(name, cache, persistent=False)
            total += cache.numel() * cache.element_size()
        layer.module.fxscale_backend = backend
    model.set_attn_implementation(ATTENTION)
    return total


def forward_step(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                 sample_rows: torch.Tensor, meta: dict[str, torch.Tensor],
                 keep_rows: bool) -> torch.Tensor:
    """One step's forward pass: logits [samples, vocab] of its sampled rows."""
    keep = {"logits_to_keep": sample_rows} if keep_rows else {}
    logits = model(input_ids=input_ids, position_ids=positions, use_cache=False, **keep,
                   **meta).logits[0]
    return logits if keep_rows else logits[sample_rows]


def keeps_rows(model: torch.nn.Module) -> bool:
    """Whether the model's forward computes logits of chosen rows only (logits_to_keep)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class SequentialRunner:
    """Each chunk of a step alone, over its request's own Hugging Face cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.model, self.new_cache = model, DynamicCache
        self.device = next(model.parameters()).device
        self.caches: dict[int, Any] = {}
        self.cache_bytes = 0

    def run(self, step: Step, tokens: dict[int, list[int]],
            all_rows: frozenset[int] = frozenset()) -> torch.Tensor:
        """Logits [rows, vocab] of the step's sampled rows, in chunk order."""
        rows = []
        with torch.inference_mode():
            for chunk in step.chunks:
                if chunk.start == 0 or chunk.request not in self.caches:
                    self.caches[chunk.request] = self.new_cache(config=self.model.config)
                ids = torch.tensor([tokens[chunk.request][chunk.start:chunk.end]],
                                   device=self.device)
                positions = torch.arange(chunk.start, chunk.end, device=self.device)[None]
                out = self.model(input_ids=ids, position_ids=positions, use_cache=True,
                                 cache=self.caches[chunk.request])
                if chunk.request in all_rows:
                    rows.extend(out.logits[0])
                elif chunk.samples:
                    rows.append(out.logits[0, -1])
        return torch.stack(rows) if rows else torch.empty(0)

    def forget(self, request: int) -> None:
        """Drop a request's cache (finished, cancelled or preempted)."""
        self.caches.pop(request, None)
