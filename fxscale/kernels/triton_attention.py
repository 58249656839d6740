"""Paged attention in Triton: one pass of online softmax over a sequence's KV blocks.

A program takes one sequence, one KV head and a tile of BLOCK_M rows, where a row is a
(query token, query head) pair of that KV head's group: the decode of a GQA model fills its
tile with the group's heads and reads each KV block once for all of them. Scores and
accumulators are fp32; no [q, kv] score matrix is stored. Long decodes with few programs
split the KV blocks over SPLITS programs, each writing its partial (max, sum, accumulator),
merged afterwards (`merge_splits`)."""
from __future__ import annotations

import triton
import triton.language as tl


def paged_attention_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, cu_q_ptr, seq_lens_ptr, tables_ptr,
        part_acc_ptr, part_max_ptr, part_sum_ptr,
        scale, softcap, window,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_table,
        total_q, num_heads,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS: tl.constexpr,
        SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS

    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = token < q_len
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_row = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q_pos = seq_len - q_len + token

    # the KV positions this tile can see: up to its last token, from the window of its first
    first = tile * BLOCK_M // GROUP
    last = tl.minimum(q_len - 1, (tile * BLOCK_M + BLOCK_M - 1) // GROUP)
    hi = seq_len - q_len + last + 1
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, seq_len - q_len + first - window + 1)
    page_lo = lo // BLOCK_SIZE
    page_hi = tl.where(first < q_len, (hi + BLOCK_SIZE - 1) // BLOCK_SIZE, page_lo)
    per_split = (page_hi - page_lo + SPLITS - 1) // SPLITS
    page_start = page_lo + split * per_split
    page_end = tl.minimum(page_hi, page_start + per_split)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    slots = tl.arange(0, BLOCK_SIZE)
    for page in range(page_start, page_end):
        block = tl.load(tables_ptr + seq * stride_table + page).to(tl.int64)
        kv_pos = page * BLOCK_SIZE + slots
        real = (kv_pos < seq_len)[:, None] & dim_ok[None, :]  # a block's tail may hold anything
        k = tl.load(k_ptr + block * stride_kb + slots[:, None] * stride_ks
                    + kv_head * stride_kh + dims[None, :], mask=real, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if SOFTCAP:  # tanh by exponentials (saturates cleanly at +-1)
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        seen = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < seq_len) \
            & row_ok[:, None]
        if WINDOW:
            seen = seen & (kv_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(seen, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw nothing yet
        weights = tl.exp(scores - shift[:, None])
        decay = tl.exp(row_max - shift)
        row_sum = row_sum * decay + tl.sum(weights, 1)
        v = tl.load(v_ptr + block * stride_vb + slots[:, None] * stride_vs
                    + kv_head * stride_vh + dims[None, :], mask=real, other=0.0)
        acc = acc * decay[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    store = row_ok[:, None] & dim_ok[None, :]
    if SPLITS == 1:
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store)
    else:  # partials at [split, token, head]
        part = (split * total_q + q_row) * num_heads + head
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=store)
        tl.store(part_max_ptr + part, row_max, mask=row_ok)
        tl.store(part_sum_ptr + part, row_sum, mask=row_ok)


def merge_splits(part_acc, part_max, part_sum, out) -> None:
    """Combine the SPLITS partial softmaxes ([splits, total_q, heads(, head_dim)]) into out."""
    import torch

    top = part_max.max(dim=0).values
    weight = torch.exp(part_max - torch.where(top == float("-inf"), 0.0, top))
    weight = torch.nan_to_num(weight)  # a split that saw no key for a row: exp(-inf) = 0
    total = (weight * part_sum).sum(dim=0)
    merged = (weight[..., None] * part_acc).sum(dim=0) / total.clamp_min(1e-30)[..., None]
    out.copy_(merged.to(out.dtype))


def launch_grid(num_seqs: int, num_kv_heads: int, max_seqlen_q: int, group: int,
                block_m: int, splits: int) -> tuple[int, int, int]:
    """Programs: (sequences, KV heads, row tiles x splits)."""
    return num_seqs, num_kv_heads, triton.cdiv(max_seqlen_q * group, block_m) * splits
