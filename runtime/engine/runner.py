"""Run a Step through a model: logits of the sampled rows.

`PagedRunner`: the model's attention routed to the paged cache (runtime/engine/attention.py);
the whole step is one forward pass over the flat batch. `SequentialRunner`: for models whose
attention cannot be routed, each chunk of the step runs alone over that request's own
Hugging Face cache (the same scheduler and steps, without batched attention)."""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch

from fxscale.contracts.step import Step
from fxscale.runtime.engine.attention import ATTENTION, AttentionLayer, register
from fxscale.runtime.engine.inputs import StepTensors, step_tensors


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model's modules and config copied, its parameters and buffers shared: the engine
    changes its copy's attention and attaches caches without touching the user's model."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


class PagedRunner:
    """Steps as one forward pass with paged attention (caches: [num_blocks, block_size,
    kv_heads, head_dim] per layer, attached to the attention modules as buffers)."""

    def __init__(self, model: torch.nn.Module, layers: list[AttentionLayer], num_blocks: int,
                 block_size: int, backend: str = "auto") -> None:
        register()
        self.model, self.block_size = model, block_size
        self.device = next(model.parameters()).device
        self.cache_bytes = 0
        for layer in layers:
            for name in ("fxscale_k_cache", "fxscale_v_cache"):
                cache = torch.zeros(num_blocks, block_size, layer.kv_heads, layer.head_dim,
                                    dtype=layer.dtype, device=self.device)
                layer.module.register_buffer(name, cache, persistent=False)
                self.cache_bytes += cache.numel() * cache.element_size()
            layer.module.fxscale_backend = backend
        model.set_attn_implementation(ATTENTION)
        self.keeps_rows = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.forward: Callable[..., Any] = model

    def run(self, step: Step, tokens: dict[int, list[int]]) -> torch.Tensor:
        """Logits [samples, vocab] of the step's sampled rows, in chunk order."""
        t = step_tensors(step, tokens, self.block_size, self.device)
        return self.run_tensors(t)

    def run_tensors(self, t: StepTensors) -> torch.Tensor:
        """The forward pass of prepared step tensors."""
        keep = {"logits_to_keep": t.sample_rows} if self.keeps_rows else {}
        with torch.inference_mode():
            logits = self.forward(input_ids=t.input_ids, position_ids=t.positions,
                                  use_cache=False, **keep, **t.meta()).logits[0]
        return logits if self.keeps_rows else logits[t.sample_rows]


class SequentialRunner:
    """Each chunk of a step alone, over its request's own Hugging Face cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.model, self.new_cache = model, DynamicCache
        self.device = next(model.parameters()).device
        self.caches: dict[int, Any] = {}
        self.cache_bytes = 0

    def run(self, step: Step, tokens: dict[int, list[int]]) -> torch.Tensor:
        """Logits [samples, vocab] of the step's sampled rows, in chunk order."""
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
                if chunk.samples:
                    rows.append(out.logits[0, -1])
        return torch.stack(rows) if rows else torch.empty(0)

    def forget(self, request: int) -> None:
        """Drop a request's cache (finished, cancelled or preempted)."""
        self.caches.pop(request, None)
