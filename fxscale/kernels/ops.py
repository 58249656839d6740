"""The public kernel functions: argument checks, backend choice, and one torch.library
custom_op per function (with a fake implementation, so torch.compile and export see one op).

Shape and dtype errors are raised before any kernel runs, naming the argument; checks of
tensor contents (block tables, lengths) run inside the op, where the values are real, when
`check` is on (the default everywhere but CUDA, where it would cost a device sync)."""
from __future__ import annotations

from typing import Optional

import torch

from fxscale.kernels import torch_impl
from fxscale.kernels.launch import (
    interpreting,
    launch_paged_attention,
    launch_rms_norm,
    launch_rotary,
    launch_write_kv,
)

BACKENDS = ("auto", "triton", "torch")
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def choose_backend(backend: str, tensor: torch.Tensor, what: str) -> str:
    """'torch' or 'triton' for a request and the tensor the kernel would run on."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        from torch.utils._triton import has_triton

        return "triton" if tensor.is_cuda and has_triton() else "torch"
    if backend == "triton":
        try:
            import triton  # noqa: F401 - only its presence is checked here
        except ImportError:
            raise ValueError(f"{what}: backend='triton' needs the triton package (pip install "
                             "'fxscale[triton]'); backend='torch' runs anywhere") from None
        if not tensor.is_cuda and not interpreting():
            raise ValueError(f"{what}: backend='triton' on {tensor.device.type} tensors runs "
                             "in Triton's interpreter: set TRITON_INTERPRET=1 in the "
                             "environment before triton is first imported, or use "
                             "backend='torch'")
        if not tensor.is_cuda and tensor.dtype == torch.bfloat16:
            raise ValueError(f"{what}: backend='triton' on CPU tensors runs in Triton's "
                             "interpreter, which computes bf16 wrongly; use float16/float32 "
                             "or backend='torch'")
    return backend


def _fail(what: str, argument: str, message: str) -> None:
    raise ValueError(f"{what}: argument '{argument}' {message}")


def _expect(what: str, argument: str, tensor: object, ndim: int | None = None,
            dtypes: tuple = (), device: torch.device | None = None) -> torch.Tensor:
    """A tensor argument of the given rank, dtype and device (an error naming it otherwise)."""
    if not isinstance(tensor, torch.Tensor):
        _fail(what, argument, f"must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        _fail(what, argument, f"must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes and tensor.dtype not in dtypes:
        _fail(what, argument, f"must have dtype {' or '.join(map(str, dtypes))}, got "
                              f"{tensor.dtype}")
    if device is not None and tensor.device != device:
        _fail(what, argument, f"is on {tensor.device}, the other tensors on {device}")
    return tensor


# ---- paged attention -------------------------------------------------------------------------

def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, backend: str = "auto", *,
                    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                    sliding_window: int | None = None, softcap: float | None = None,
                    check: bool | None = None) -> torch.Tensor:
    """Causal attention of every sequence's new query tokens over its paged KV cache
    (layouts in the fxscale.kernels docstring); returns [total_q, num_heads, head_dim]."""
    what = "paged_attention"
    _expect(what, "q", q, 3, FLOATS)
    device = q.device
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _expect(what, name, cache, 4, (q.dtype,), device)
        if cache.shape[-1] != q.shape[-1]:
            _fail(what, name, f"has head_dim {cache.shape[-1]}, q has {q.shape[-1]}")
        if cache.stride(-1) != 1:
            _fail(what, name, "must be contiguous in its last dimension")
    if k_cache.shape != v_cache.shape:
        _fail(what, "v_cache", f"has shape {tuple(v_cache.shape)}, k_cache "
                               f"{tuple(k_cache.shape)}")
    num_kv_heads = k_cache.shape[2]
    if q.shape[1] % num_kv_heads:
        _fail(what, "q", f"has {q.shape[1]} heads, not a multiple of the caches' "
                         f"{num_kv_heads} KV heads")
    _expect(what, "cu_seqlens_q", cu_seqlens_q, 1, (torch.int32,), device)
    _expect(what, "seq_lens", seq_lens, 1, (torch.int32,), device)
    _expect(what, "block_tables", block_tables, 2, (torch.int32,), device)
    if cu_seqlens_q.shape[0] != seq_lens.shape[0] + 1:
        _fail(what, "cu_seqlens_q", f"must have num_seqs + 1 = {seq_lens.shape[0] + 1} "
                                    f"entries, got {cu_seqlens_q.shape[0]}")
    if block_tables.shape[0] != seq_lens.shape[0]:
        _fail(what, "block_tables", f"must have a row per sequence ({seq_lens.shape[0]}), got "
                                    f"{block_tables.shape[0]}")
    if not isinstance(scale, (int, float)) or not scale > 0:
        _fail(what, "scale", f"must be a positive number, got {scale!r}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k),
                        ("sliding_window", sliding_window)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            _fail(what, name, f"must be a positive integer or None, got {value!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0):
        _fail(what, "softcap", f"must be a positive number or None, got {softcap!r}")
    chosen = choose_backend(backend, q, what)
    return torch.ops.fxscale.paged_attention(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, float(scale), chosen,
        max_seqlen_q, max_seqlen_k, sliding_window,
        None if softcap is None else float(softcap), not q.is_cuda if check is None else check)


@torch.library.custom_op("fxscale::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float, backend: str,
                        max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                        sliding_window: Optional[int], softcap: Optional[float],
                        check: bool) -> torch.Tensor:
    if check:
        check_paged_contents(q, k_cache, cu_seqlens_q, seq_lens, block_tables, max_seqlen_q,
                             max_seqlen_k)
    if backend == "torch":
        return torch_impl.paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens,
                                          block_tables, scale, sliding_window, softcap)
    return launch_paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
                                  scale, max_seqlen_q, sliding_window, softcap)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, backend, max_seqlen_q,
      max_seqlen_k, sliding_window, softcap, check):
    return torch.empty_like(q)


def check_paged_contents(q: torch.Tensor, k_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         seq_lens: torch.Tensor, block_tables: torch.Tensor,
                         max_seqlen_q: int | None, max_seqlen_k: int | None) -> None:
    """The values the kernel trusts: offsets, lengths, and every block a sequence uses."""
    what = "paged_attention"
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
        _fail(what, "cu_seqlens_q", f"must rise from 0 to total_q = {q.shape[0]}, got "
                                    f"{cu[:8]}{' ...' if len(cu) > 8 else ''}")
    q_lens = [b - a for a, b in zip(cu, cu[1:])]
    bad = next((s for s, (n, length) in enumerate(zip(q_lens, lens)) if length < n), None)
    if bad is not None:
        _fail(what, "seq_lens", f"[{bad}] = {lens[bad]} is shorter than its {q_lens[bad]} "
                                "query tokens (seq_lens counts the new tokens too)")
    if max_seqlen_q is not None and q_lens and max(q_lens) > max_seqlen_q:
        _fail(what, "max_seqlen_q", f"is {max_seqlen_q}, but a sequence has {max(q_lens)} "
                                    "query tokens")
    if max_seqlen_k is not None and lens and max(lens) > max_seqlen_k:
        _fail(what, "max_seqlen_k", f"is {max_seqlen_k}, but a sequence is {max(lens)} long")
    block_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
    need = [-(-length // block_size) for length in lens]
    if need and max(need) > block_tables.shape[1]:
        _fail(what, "block_tables", f"has {block_tables.shape[1]} columns; a sequence of "
                                    f"{max(lens)} tokens needs {max(need)} blocks of "
                                    f"{block_size}")
    columns = torch.arange(block_tables.shape[1], device=block_tables.device)
    used = columns[None, :] < torch.tensor(need, device=block_tables.device)[:, None]
    outside = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if outside.any():
        s, j = (int(i) for i in outside.nonzero()[0])
        _fail(what, "block_tables", f"[{s}, {j}] = {int(block_tables[s, j])} is outside the "
                                    f"cache's {num_blocks} blocks")


# ---- KV store -----------------------------------------------------------------------------------

def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """Store the step's new keys and values ([total_q, num_kv_heads, head_dim]) at their flat
    slots (block * block_size + offset; negative: skip) of the paged caches, in place."""
    what = "write_kv"
    _expect(what, "k", k, 3, FLOATS)
    _expect(what, "v", v, 3, (k.dtype,), k.device)
    if v.shape != k.shape:
        _fail(what, "v", f"has shape {tuple(v.shape)}, k {tuple(k.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _expect(what, name, cache, 4, (k.dtype,), k.device)
        if tuple(cache.shape[2:]) != tuple(k.shape[1:]):
            _fail(what, name, f"holds heads of shape {tuple(cache.shape[2:])}, k has "
                              f"{tuple(k.shape[1:])}")
        if not cache.is_contiguous():
            _fail(what, name, "must be contiguous (slots are flat offsets into it)")
    if v_cache.shape != k_cache.shape:
        _fail(what, "v_cache", f"has shape {tuple(v_cache.shape)}, k_cache "
                               f"{tuple(k_cache.shape)}")
    _expect(what, "slot_mapping", slot_mapping, 1, (torch.int32, torch.int64), k.device)
    if slot_mapping.shape[0] != k.shape[0]:
        _fail(what, "slot_mapping", f"has {slot_mapping.shape[0]} slots for {k.shape[0]} tokens")
    chosen = choose_backend(backend, k, what)
    torch.ops.fxscale.write_kv(k, v, k_cache, v_cache, slot_mapping, chosen,
                               not k.is_cuda)


@torch.library.custom_op("fxscale::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, backend: str,
                 check: bool) -> None:
    if check and slot_mapping.numel():
        top = int(slot_mapping.max())
        if top >= k_cache.shape[0] * k_cache.shape[1]:
            _fail("write_kv", "slot_mapping", f"has slot {top}, past the cache's "
                                              f"{k_cache.shape[0] * k_cache.shape[1]} slots")
    if backend == "torch":
        torch_impl.write_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        launch_write_kv(k, v, k_cache, v_cache, slot_mapping)


@_write_kv_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, backend, check):
    return None


# ---- RMSNorm ------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out): residual_out = x + residual (x itself without one), out = its
    RMSNorm (in fp32) times weight, as in Llama, Mistral and Qwen."""
    what = "rms_norm"
    _expect(what, "x", x, None, FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        _fail(what, "x", f"must have a non-empty last dimension, got shape {tuple(x.shape)}")
    _expect(what, "weight", weight, 1, (x.dtype,), x.device)
    if weight.shape[0] != x.shape[-1]:
        _fail(what, "weight", f"has {weight.shape[0]} entries for a last dimension of "
                              f"{x.shape[-1]}")
    if residual is not None:
        _expect(what, "residual", residual, None, (x.dtype,), x.device)
        if residual.shape != x.shape:
            _fail(what, "residual", f"has shape {tuple(residual.shape)}, x {tuple(x.shape)}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        _fail(what, "eps", f"must be a non-negative number, got {eps!r}")
    chosen = choose_backend(backend, x, what)
    out, residual_out = torch.ops.fxscale.rms_norm(x, weight, float(eps), residual, chosen)
    return out, (x if residual is None else residual_out)


@torch.library.custom_op("fxscale::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor],
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # without a residual the second output is empty: the public function returns x itself
    # (an op's output may not alias its input)
    if backend == "torch":
        out, h = torch_impl.rms_norm(x, weight, eps, residual)
        return out, (x.new_empty(0) if residual is None else h)
    return launch_rms_norm(x, weight, eps, residual)


@_rms_norm_op.register_fake
def _(x, weight, eps, residual, backend):
    return torch.empty_like(x), (x.new_empty(0) if residual is None else torch.empty_like(x))


# ---- rotary -------------------------------------------------------------------------------------

def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
           cos_sin_cache: torch.Tensor, neox_style: bool = True,
           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D] and k [T, Hkv, D] with their first rot_dim features rotated by each
    token's position; cos_sin_cache [max_position, rot_dim] holds cosines then sines;
    neox_style rotates halves, otherwise interleaved pairs (GPT-J)."""
    what = "rotary"
    _expect(what, "q", q, 3, FLOATS)
    _expect(what, "k", k, 3, (q.dtype,), q.device)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        _fail(what, "k", f"has shape {tuple(k.shape)}; q {tuple(q.shape)} needs "
                         f"[{q.shape[0]}, kv_heads, {q.shape[2]}]")
    _expect(what, "positions", positions, 1, (torch.int32, torch.int64), q.device)
    if positions.shape[0] != q.shape[0]:
        _fail(what, "positions", f"has {positions.shape[0]} entries for {q.shape[0]} tokens")
    _expect(what, "cos_sin_cache", cos_sin_cache, 2, FLOATS, q.device)
    rot = cos_sin_cache.shape[1]
    if rot % 2 or not 2 <= rot <= q.shape[2]:
        _fail(what, "cos_sin_cache", f"has rot_dim {rot}; it must be even and at most "
                                     f"head_dim {q.shape[2]}")
    chosen = choose_backend(backend, q, what)
    return torch.ops.fxscale.rotary(q, k, positions, cos_sin_cache, bool(neox_style), chosen,
                                    not q.is_cuda)


@torch.library.custom_op("fxscale::rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor, neox_style: bool, backend: str,
               check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if check and positions.numel():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= cos_sin_cache.shape[0]:
            _fail("rotary", "positions", f"range over {low}..{high}; cos_sin_cache has "
                                         f"{cos_sin_cache.shape[0]} positions")
    if backend == "torch":
        return torch_impl.rotary(q, k, positions, cos_sin_cache, neox_style)
    return launch_rotary(q, k, positions, cos_sin_cache, neox_style)


@_rotary_op.register_fake
def _(q, k, positions, cos_sin_cache, neox_style, backend, check):
    return torch.empty_like(q), torch.empty_like(k)
