"""Row-wise Triton kernels: fused residual add + RMSNorm, rotary embedding by position, and
the store of a step's new keys and values into the paged cache. One program per row (token)."""
from __future__ import annotations

import triton.language as tl


def rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, eps, n_cols,
                    stride_x, stride_r, stride_o, stride_ro,
                    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:  # rounded to the input dtype, as an eager residual add is
        h = h + tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        tl.store(residual_out_ptr + row * stride_ro + cols, h, mask=ok)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, w * (hf * inv).to(h.dtype), mask=ok)


def rotary_kernel(q_out_ptr, k_out_ptr, q_ptr, k_ptr, positions_ptr, cache_ptr,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                  stride_qot, stride_qoh, stride_kot, stride_koh,
                  num_q_heads, num_k_heads,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr,
                  NEOX: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=j_ok, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=j_ok, other=0.0).to(tl.float32)
    if NEOX:  # halves: (x[j], x[j + half])
        first, second = j, j + HALF
    else:     # pairs: (x[2j], x[2j + 1])
        first, second = 2 * j, 2 * j + 1
    heads = tl.arange(0, HEADS_PAD)
    for which in tl.static_range(2):
        if which == 0:
            src, dst, st, sh, dt, dh, n = (q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot,
                                           stride_qoh, num_q_heads)
        else:
            src, dst, st, sh, dt, dh, n = (k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot,
                                           stride_koh, num_k_heads)
        ok = (heads[:, None] < n) & j_ok[None, :]
        base = src + token * st + heads[:, None] * sh
        x1 = tl.load(base + first[None, :], mask=ok, other=0.0)
        x2 = tl.load(base + second[None, :], mask=ok, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        out = dst + token * dt + heads[:, None] * dh
        tl.store(out + first[None, :], (a * cos[None, :] - b * sin[None, :]).to(x1.dtype), mask=ok)
        tl.store(out + second[None, :], (b * cos[None, :] + a * sin[None, :]).to(x1.dtype),
                 mask=ok)


def write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch,
                    num_kv_heads, block_size,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    ok = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM) & (slot >= 0)
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=ok)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=ok)
    tl.store(k_cache_ptr + block * stride_kb + offset * stride_ks + heads[:, None] * stride_kch
             + dims[None, :], k, mask=ok)
    tl.store(v_cache_ptr + block * stride_vb + offset * stride_vs + heads[:, None] * stride_vch
             + dims[None, :], v, mask=ok)
