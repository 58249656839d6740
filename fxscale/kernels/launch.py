"""Launch the Triton kernels: compiled on CUDA tensors, in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 set before triton is first imported; the interpreter runs the same
kernel code with numpy, for tests, with fixed launch configurations since it cannot
autotune). Triton is imported on first launch only."""
from __future__ import annotations

import functools
from typing import Callable

import torch

MIN_DOT = 16  # tl.dot needs every dimension >= 16
empty_like = torch.empty_like  # outputs are allocated here (tests poison them)


@functools.cache
def kernel(name: str) -> Callable:
    """A kernel of triton_attention / triton_rows, jitted (interpreted under TRITON_INTERPRET)."""
    import triton

    from fxscale.kernels import triton_attention, triton_rows

    return triton.jit(getattr(triton_attention, name, None) or getattr(triton_rows, name))


def interpreting() -> bool:
    """Whether triton was imported under TRITON_INTERPRET=1: only then do its own library
    functions (tl.zeros, tl.sum, ...) run in the interpreter, so that kernels can run on CPU
    tensors (setting the variable later does not change them)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _kernel(name: str, tensor: torch.Tensor) -> Callable:
    return kernel(name)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def split_count(num_seqs: int, num_kv_heads: int, tiles: int, max_seqlen_k: int,
                device: torch.device) -> int:
    """KV splits for a launch: only where the programs would not fill the GPU and each
    split still has a long stretch of keys (long decodes)."""
    if device.type != "cuda" or max_seqlen_k < 2048:
        return 1
    programs = num_seqs * num_kv_heads * tiles
    units = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= units:
        return 1
    return max(1, min(16, max_seqlen_k // 1024, -(-2 * units // programs)))


def launch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float,
                           max_seqlen_q: int | None, sliding_window: int | None,
                           softcap: float | None, splits: int | None = None,
                           max_seqlen_k: int | None = None) -> torch.Tensor:
    """The paged attention kernel over a step (splits: None chooses; tests force some)."""
    from fxscale.kernels.triton_attention import launch_grid, merge_splits

    total_q, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if block_size < MIN_DOT or block_size & (block_size - 1):
        raise ValueError(f"paged_attention: backend='triton' needs a power-of-two block size "
                         f">= {MIN_DOT}; the caches have blocks of {block_size}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = empty_like(q)
    if total_q == 0 or num_seqs == 0:
        return out
    if max_seqlen_q is None:  # a device sync: callers on the hot path pass it
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    group = num_heads // num_kv_heads
    block_m = _pow2(max_seqlen_q * group, MIN_DOT) if not q.is_cuda else \
        (MIN_DOT if max_seqlen_q * group <= MIN_DOT else 64)
    block_m = min(block_m, 64)
    tiles = -(-max_seqlen_q * group // block_m)
    if splits is None:
        longest = max_seqlen_k or (int(seq_lens.max()) if q.is_cuda else 0)
        splits = split_count(num_seqs, num_kv_heads, tiles, longest, q.device)
    if splits > 1:
        part_acc = torch.empty(splits, total_q, num_heads, head_dim, device=q.device,
                               dtype=torch.float32)
        part_max = torch.full((splits, total_q, num_heads), float("-inf"), device=q.device)
        part_sum = torch.zeros(splits, total_q, num_heads, device=q.device)
    else:
        part_acc = part_max = part_sum = out  # unused
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _kernel("paged_attention_kernel", q)[launch_grid(num_seqs, num_kv_heads, max_seqlen_q,
                                                     group, block_m, splits)](
        out, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
        part_acc, part_max, part_sum,
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        total_q, num_heads,
        GROUP=group, BLOCK_M=block_m, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_pow2(head_dim, MIN_DOT), SPLITS=splits,
        SOFTCAP=softcap is not None, WINDOW=sliding_window is not None, PRECISION=precision)
    if splits > 1:
        merge_splits(part_acc, part_max, part_sum, out)
    return out


def launch_write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store each token's keys and values at its slot (one program per token)."""
    tokens, heads, head_dim = k.shape
    if tokens == 0:
        return
    _kernel("write_kv_kernel", k)[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        heads, k_cache.shape[1],
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2(head_dim), HEADS_PAD=_pow2(heads))


def launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm over the last dimension (one program per row)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    res = None if residual is None else residual.reshape(-1, n).contiguous()
    out = empty_like(rows)
    res_out = x.new_empty(0) if residual is None else empty_like(rows)
    if rows.shape[0]:
        _kernel("rms_norm_kernel", x)[(rows.shape[0],)](
            out, res_out if residual is not None else out, rows,
            res if res is not None else rows, weight, float(eps), n,
            rows.stride(0), res.stride(0) if res is not None else 0, out.stride(0),
            res_out.stride(0) if residual is not None else 0,
            BLOCK=_pow2(n), HAS_RESIDUAL=residual is not None)
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else res_out)


def launch_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor,
                  neox_style: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k by position (one program per token); features past
    rot_dim are copied."""
    half = cos_sin_cache.shape[1] // 2
    q_out, k_out = q.clone(), k.clone()  # the features past rot_dim pass through
    if q.shape[0]:
        cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
        _kernel("rotary_kernel", q)[(q.shape[0],)](
            q_out, k_out, q, k, positions, cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cache.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            q.shape[1], k.shape[1],
            HALF=half, HALF_PAD=_pow2(half), HEADS_PAD=_pow2(max(q.shape[1], k.shape[1])),
            NEOX=bool(neox_style))
    return q_out, k_out
