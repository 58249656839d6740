"""Attention as an operator the engine owns: one custom op that stores a step's new keys and
values in the paged KV cache and attends over each sequence's blocks (fxscale.kernels), and
the attention function that routes a Hugging Face model's attention to it.

A model runs with no Hugging Face cache and a flat batch of tokens ([1, T] ids with per-token
positions); its attention layers call `paged_attention_forward` (registered with
transformers' AttentionInterface as "fxscale_paged") with the step's metadata passed down as
keyword arguments (`fxscale_*`), and find their layer's cache on the module
(`fxscale_k_cache`, `fxscale_v_cache`, attached by the engine), so under torch.compile the
caches are lifted like buffers and the metadata are graph inputs. Models whose attention
cannot be routed so (no attention interface, or keyword arguments not passed down) are found
by `find_attention` and run by the engine one request at a time instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from fxscale.kernels import paged_attention, write_kv

ATTENTION = "fxscale_paged"
META = ("slot_mapping", "cu_seqlens_q", "seq_lens", "block_tables")  # step inputs, in order


@torch.library.custom_op("fxscale::attention_step", mutates_args=("k_cache", "v_cache"))
def attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                   block_tables: torch.Tensor, scale: float, sliding_window: Optional[int],
                   softcap: Optional[float], backend: str) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D]: write k/v at their slots, then attend (see kernels)."""
    write_kv(k, v, k_cache, v_cache, slot_mapping, backend)
    return paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                           backend, sliding_window=sliding_window, softcap=softcap,
                           check=False)


@attention_step.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, cu_seqlens_q, seq_lens, block_tables, scale,
      sliding_window, softcap, backend):
    return torch.empty_like(q)


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                            dropout: float = 0.0, sliding_window: int | None = None,
                            softcap: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Transformers' attention function signature: query [1, H, T, D], key/value
    [1, Hkv, T, D] (the step's new tokens) -> ([1, T, H, D], no weights)."""
    meta = [kwargs.get(f"fxscale_{name}") for name in META]
    if meta[0] is None:
        raise RuntimeError("fxscale_paged attention ran without the engine's step metadata "
                           "(this model does not pass keyword arguments to its attention)")
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    out = torch.ops.fxscale.attention_step(
        q, k, v, module.fxscale_k_cache, module.fxscale_v_cache, *meta,
        float(scaling if scaling is not None else q.shape[-1] ** -0.5),
        int(sliding_window) if sliding_window else None,
        float(softcap) if softcap else None, getattr(module, "fxscale_backend", "auto"))
    return out.unsqueeze(0), None


@dataclass(frozen=True)
class AttentionLayer:
    """An attention module the engine routes, with the shape of its KV cache."""

    module: torch.nn.Module
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


def find_attention(model: torch.nn.Module) -> tuple[list[AttentionLayer], str | None]:
    """The model's attention modules, found by running two tokens through it with a probing
    attention function; and why its attention cannot be routed (None when it can)."""
    from transformers import AttentionInterface

    seen: dict[int, AttentionLayer] = {}
    forwarded: list[bool] = []

    def probe(module, query, key, value, *args, **kwargs):
        seen.setdefault(id(module), AttentionLayer(module, key.shape[1], key.shape[-1],
                                                   key.dtype))
        forwarded.append("fxscale_probe" in kwargs)
        return torch.zeros_like(query).transpose(1, 2), None

    AttentionInterface.register("fxscale_probe", probe)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        return [], "it is not a transformers model with an attention interface"
    before = getattr(model.config, "_attn_implementation", None)
    try:
        setter("fxscale_probe")
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=_device(model)),
                  use_cache=False, fxscale_probe=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not routable this way
        return [], f"its forward failed with the routed attention ({type(err).__name__}: {err})"
    finally:
        if before is not None:
            setter(before)
        found = list(seen.values())
        seen.clear()  # the probe stays registered: it must not keep the model alive
    if not found:
        return [], "its attention does not go through transformers' AttentionInterface"
    if not all(forwarded):
        return [], "it does not pass keyword arguments down to its attention"
    return found, None


def _device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are."""
    return next(model.parameters()).device


def register() -> None:
    """Make "fxscale_paged" an attention implementation transformers accepts."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, paged_attention_forward)
