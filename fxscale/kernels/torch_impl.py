"""The kernels' maths in plain torch: the CPU path the engine runs here, and the backend the
Triton kernels are checked against (tests check both against float64 references).

Layouts are those of fxscale.kernels (see its docstring); arguments arrive checked."""
from __future__ import annotations

import torch
import torch.nn.functional as F

empty_like = torch.empty_like  # outputs are allocated here (tests poison them)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, sliding_window: int | None,
                    softcap: float | None) -> torch.Tensor:
    """Causal attention of each sequence's query tokens over its paged keys and values.
    Decodes (one query token) are gathered and attended in one batched call; prompt chunks
    one sequence at a time (padding them together would multiply their work)."""
    out = empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    decodes = [s for s in range(len(lens)) if starts[s + 1] - starts[s] == 1]
    if decodes:
        rows = torch.tensor([starts[s] for s in decodes], device=q.device)
        index = torch.tensor(decodes, device=q.device)
        k, v, allowed = gather_kv(k_cache, v_cache, block_tables[index], seq_lens[index])
        if sliding_window is not None:
            positions = torch.arange(allowed.shape[1], device=q.device)
            allowed &= positions[None, :] >= seq_lens[index, None] - sliding_window
        out[rows] = attend(q[rows].unsqueeze(2), k, v, allowed[:, None, None, :], scale,
                           softcap).squeeze(2)
    for s in range(len(lens)):
        start, end = starts[s], starts[s + 1]
        if end - start in (0, 1):
            continue
        k, v, _ = gather_kv(k_cache, v_cache, block_tables[s:s + 1], seq_lens[s:s + 1])
        q_pos = torch.arange(lens[s] - (end - start), lens[s], device=q.device)
        kv_pos = torch.arange(lens[s], device=q.device)
        allowed = kv_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            allowed &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        out[start:end] = attend(q[start:end].transpose(0, 1).unsqueeze(0), k, v,
                                allowed[None, None], scale, softcap)[0].transpose(0, 1)
    return out


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
              lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each table's keys and values, contiguous and padded to the longest length with zeros
    ([n, num_kv_heads, longest, head_dim] each), and which positions are real ([n, longest]).
    Table entries past a sequence's blocks are never read (they may hold anything)."""
    block_size = k_cache.shape[1]
    longest = int(lengths.max())
    columns = -(-longest // block_size)
    lengths = lengths.to(torch.long)
    used = torch.arange(columns, device=tables.device)[None, :] * block_size < lengths[:, None]
    blocks = torch.where(used, tables[:, :columns], 0).to(torch.long)
    real = torch.arange(longest, device=tables.device)[None, :] < lengths[:, None]

    def gather(cache: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        flat = cache[blocks].reshape(n, columns * block_size, *cache.shape[2:])[:, :longest]
        return torch.where(real[:, :, None, None], flat, 0).transpose(1, 2)

    return gather(k_cache), gather(v_cache), real


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
           scale: float, softcap: float | None) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped], where allowed) v, with grouped-query heads:
    q [n, heads, m, d], k/v [n, kv_heads, len, d], allowed broadcastable to [n, heads, m, len]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(weights, v.float()).to(q.dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store each token's key and value at its flat slot (block * block_size + offset), in
    place; a negative slot is a padding token and is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.long)
    for new, cache in ((k, k_cache), (v, v_cache)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new[keep].to(cache.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * normalised h, h) with h = x + residual (or x), normalised in fp32 and cast
    back before the weight, as Llama's RMSNorm does."""
    h = x if residual is None else x + residual
    variance = h.float().pow(2).mean(-1, keepdim=True)
    return weight * (h.float() * torch.rsqrt(variance + eps)).to(x.dtype), h


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
           cos_sin_cache: torch.Tensor, neox_style: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rot_dim features of every head of q [T, H, D] and k [T, Hkv, D] by
    each token's position (cos_sin_cache [max_pos, rot_dim]: cosines, then sines)."""
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions.to(torch.long)].float()
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        rot = x[..., :2 * half].float()
        if neox_style:
            x1, x2 = rot[..., :half], rot[..., half:]
            out[..., :half] = (x1 * cos - x2 * sin).to(x.dtype)
            out[..., half:2 * half] = (x2 * cos + x1 * sin).to(x.dtype)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out[..., 0:2 * half:2] = (x1 * cos - x2 * sin).to(x.dtype)
            out[..., 1:2 * half:2] = (x2 * cos + x1 * sin).to(x.dtype)
        return out

    return rotate(q), rotate(k)
