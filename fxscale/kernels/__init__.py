"""fxscale.kernels: the kernels operator-level serving needs, each with a Triton kernel and a
plain torch implementation of the same maths, as one torch.library custom op each.

    paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                    backend="auto", *, max_seqlen_q=None, max_seqlen_k=None,
                    sliding_window=None, softcap=None, check=None) -> out
    write_kv(k, v, k_cache, v_cache, slot_mapping)                    # in place
    rms_norm(x, weight, eps, residual=None) -> (out, residual_out)
    rotary(q, k, positions, cos_sin_cache, neox_style=True) -> (q, k)

Layout: q [total_q, num_heads, head_dim], the new tokens of every sequence of a step,
concatenated (cu_seqlens_q [num_seqs + 1] int32 offsets); k_cache/v_cache [num_blocks,
block_size, num_kv_heads, head_dim]; seq_lens [num_seqs] int32, each sequence's KV length
including its new tokens; block_tables [num_seqs, max_blocks] int32. Query token i of sequence
s sits at position seq_lens[s] - q_len_s + i and attends causally to every position up to its
own (within the last `sliding_window` positions when given). Decode, a whole prompt and a
prompt chunk after cached tokens are the same call. num_heads is a multiple of num_kv_heads.

backend: "torch" (anywhere; the engine's CPU path), "triton" (compiled on CUDA tensors, in
Triton's interpreter on CPU tensors: fp32/fp16 only), "auto" (Triton on CUDA, torch
elsewhere). docs/kernels.md has the algorithm, the interpreter's caveats and GPU timings.

Imports torch (and triton when a Triton kernel first runs); nothing else of fxscale."""
from fxscale.kernels.ops import BACKENDS, paged_attention, rms_norm, rotary, write_kv

__all__ = ["BACKENDS", "paged_attention", "rms_norm", "rotary", "write_kv"]
