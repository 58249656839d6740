"""fxscale.kernels against float64 references written here from the definitions: both
backends (Triton in its interpreter on CPU), fp32 and fp16, ragged and chunked sequences,
GQA, shuffled block tables, sliding windows and soft-capping; outputs are poisoned (NaN)
before every run, and cache slots a sequence does not own hold NaN too."""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxscale.kernels import launch, ops, paged_attention, rms_norm, rotary, torch_impl, write_kv

BACKENDS = ("torch", "triton")
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2}
BLOCK = 16


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output the kernels allocate starts as NaN."""
    def nan_like(t, *args, **kwargs):
        return torch.full_like(t, float("nan"), *args, **kwargs)

    monkeypatch.setattr(launch, "empty_like", nan_like)
    monkeypatch.setattr(torch_impl, "empty_like", nan_like)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want| (NaN anywhere in got: infinite)."""
    if torch.isnan(got).any():
        return math.inf
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))


def reference_attention(q, keys, values, q_lens, seq_lens, scale, window=None, softcap=None):
    """float64, token by token, over each sequence's contiguous keys/values [len, kv, d]."""
    out, row = [], 0
    group = q.shape[1] // keys[0].shape[1]
    for k, v, n, length in zip(keys, values, q_lens, seq_lens):
        k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
        for i in range(n):
            pos = length - n + i
            lo = 0 if window is None else max(0, pos - window + 1)
            scores = torch.einsum("hd,thd->ht", q[row].double(), k[lo:pos + 1]) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            out.append(torch.einsum("ht,thd->hd", torch.softmax(scores, -1), v[lo:pos + 1]))
            row += 1
    return torch.stack(out)


def paged_case(seed, q_lens, cached, kv_heads, group, head_dim, dtype):
    """Random K/V for each sequence, paged into a cache through a shuffled block table
    (unused blocks and the tails of partly used ones hold NaN)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached, q_lens)]
    need = [-(-length // BLOCK) for length in seq_lens]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.full((num_blocks, BLOCK, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    width = max(need) + 2
    tables = torch.full((len(q_lens), width), 10 ** 6, dtype=torch.int32)  # unused: junk
    keys, values = [], []
    for s, length in enumerate(seq_lens):
        blocks = [order.pop() for _ in range(need[s])]
        tables[s, :need[s]] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        keys.append(k)
        values.append(v)
        for p in range(length):
            k_cache[blocks[p // BLOCK], p % BLOCK] = k[p]
            v_cache[blocks[p // BLOCK], p % BLOCK] = v[p]
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    return q, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, keys, \
        values, seq_lens


CASES = [  # (q_lens, cached, kv_heads, group, head_dim): decodes, prompts, chunks, GQA 1/4/8
    ((1, 1, 1), (0, 17, 40), 2, 1, 64),
    ((5, 1, 23), (0, 30, 9), 1, 4, 64),
    ((1, 7), (33, 16), 1, 8, 128),
    ((19,), (0,), 2, 4, 128),
    ((3, 1, 1, 16), (13, 0, 47, 5), 2, 1, 32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_matches_float64(backend, dtype, case):
    q_lens, cached, kv_heads, group, head_dim = CASES[case]
    q, k_cache, v_cache, cu, lens, tables, keys, values, seq_lens = paged_case(
        case, q_lens, cached, kv_heads, group, head_dim, dtype)
    scale = head_dim ** -0.5
    got = paged_attention(q, k_cache, v_cache, cu, lens, tables, scale, backend, check=True)
    want = reference_attention(q, keys, values, q_lens, seq_lens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    assert relative_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,softcap", [(5, None), (None, 3.0), (17, 20.0)])
def test_sliding_window_and_softcap_match_float64(backend, window, softcap):
    q_lens, cached = (1, 9, 1), (30, 12, 3)
    q, k_cache, v_cache, cu, lens, tables, keys, values, seq_lens = paged_case(
        7, q_lens, cached, 2, 2, 64, torch.float32)
    got = paged_attention(q, k_cache, v_cache, cu, lens, tables, 0.3, backend,
                          sliding_window=window, softcap=softcap)
    want = reference_attention(q, keys, values, q_lens, seq_lens, 0.3, window, softcap)
    assert relative_error(got, want) <= 1e-3


def test_split_kv_partials_merge_to_the_same_attention():
    """The long-decode path (KV blocks split over programs, partials merged) in the
    interpreter, forced since it splits only on a GPU."""
    q_lens, cached = (1, 1, 4), (70, 5, 40)
    q, k_cache, v_cache, cu, lens, tables, keys, values, seq_lens = paged_case(
        11, q_lens, cached, 2, 4, 64, torch.float32)
    want = reference_attention(q, keys, values, q_lens, seq_lens, 0.125)
    for splits in (2, 3):
        got = launch.launch_paged_attention(q, k_cache, v_cache, cu, lens, tables, 0.125,
                                            None, None, None, splits=splits)
        assert relative_error(got, want) <= 1e-3, splits


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_any_paging_of_the_same_kv_gives_contiguous_attention(data):
    """Attention over a random paging equals attention over the contiguous K/V (one block
    table holding the sequence in order)."""
    seed = data.draw(st.integers(0, 10 ** 6))
    q_lens = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    cached = data.draw(st.lists(st.integers(0, 40), min_size=len(q_lens),
                                max_size=len(q_lens)))
    q, k_cache, v_cache, cu, lens, tables, keys, values, seq_lens = paged_case(
        seed, q_lens, cached, 1, 2, 32, torch.float32)
    paged = paged_attention(q, k_cache, v_cache, cu, lens, tables, 0.2, "torch")
    for s, (k, v) in enumerate(zip(keys, values)):
        blocks = -(-seq_lens[s] // BLOCK)
        k_flat = torch.zeros(blocks * BLOCK, *k.shape[1:])
        v_flat = torch.zeros_like(k_flat)
        k_flat[:len(k)], v_flat[:len(v)] = k, v
        start, end = int(cu[s]), int(cu[s + 1])
        alone = paged_attention(q[start:end], k_flat.view(blocks, BLOCK, *k.shape[1:]),
                                v_flat.view(blocks, BLOCK, *k.shape[1:]),
                                torch.tensor([0, end - start], dtype=torch.int32),
                                lens[s:s + 1], torch.arange(blocks, dtype=torch.int32)[None],
                                0.2, "torch")
        torch.testing.assert_close(paged[start:end], alone, rtol=1e-5, atol=1e-6)


def test_compiled_calls_give_the_eager_results():
    q_lens, cached = (1, 6), (20, 3)
    q, k_cache, v_cache, cu, lens, tables, *_ = paged_case(3, q_lens, cached, 2, 2, 32,
                                                           torch.float32)
    weight = torch.randn(64)
    positions = torch.tensor([20, 3, 4, 5, 6, 7, 8])
    cache = torch.randn(64, 32)

    def step(q, x, backend):
        out = paged_attention(q, k_cache, v_cache, cu, lens, tables, 0.25, backend)
        normed, _ = rms_norm(x, weight, 1e-6, x, backend=backend)
        rq, rk = rotary(q, q[:, :2], positions, cache, backend=backend)
        return out, normed, rq, rk

    x = torch.randn(7, 64)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    for backend in BACKENDS:
        for got, want in zip(compiled(q, x, backend), step(q, x, backend)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_stores_at_slots_and_nowhere_else(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.full((6, BLOCK, 2, 64), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    slots = torch.tensor([37, 2, -1, 95, 16], dtype=torch.int32)  # -1: padding, skipped
    k = torch.randn(5, 2, 64, generator=gen).to(dtype)
    v = torch.randn(5, 2, 64, generator=gen).to(dtype)
    write_kv(k, v, k_cache, v_cache, slots, backend)
    flat_k, flat_v = k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[i]) and torch.equal(flat_v[slot], v[i])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[slots >= 0].long()] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_float64(backend, dtype, with_residual):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 96, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    residual = torch.randn(5, 3, 96, generator=gen).to(dtype) if with_residual else None
    out, residual_out = rms_norm(x, weight, 1e-5, residual, backend=backend)
    h = x.double() + (residual.double() if with_residual else 0)
    want = weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert relative_error(out, want) <= TOLERANCE[dtype]
    assert relative_error(residual_out, h) <= TOLERANCE[dtype]
    assert (residual_out is x) == (not with_residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("neox_style,rot_dim", [(True, 64), (False, 64), (True, 32)])
def test_rotary_matches_float64(backend, dtype, neox_style, rot_dim):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(6, 4, 64, generator=gen).to(dtype)
    k = torch.randn(6, 2, 64, generator=gen).to(dtype)
    positions = torch.tensor([0, 5, 99, 3, 3, 42])
    inv = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angles = torch.arange(128, dtype=torch.float64)[:, None] * inv[None, :]
    cache = torch.cat([angles.cos(), angles.sin()], -1)
    got_q, got_k = rotary(q, k, positions, cache.to(dtype), neox_style, backend=backend)

    def expected(x):
        x = x.double().clone()
        cos, sin = angles.cos()[positions][:, None], angles.sin()[positions][:, None]
        if neox_style:
            i, j = torch.arange(rot_dim // 2), torch.arange(rot_dim // 2, rot_dim)
        else:
            i, j = torch.arange(0, rot_dim, 2), torch.arange(1, rot_dim, 2)
        a, b = x[..., i].clone(), x[..., j].clone()
        x[..., i], x[..., j] = a * cos - b * sin, b * cos + a * sin
        return x

    assert relative_error(got_q, expected(q)) <= TOLERANCE[dtype]
    assert relative_error(got_k, expected(k)) <= TOLERANCE[dtype]


def test_bad_arguments_name_the_argument_before_any_kernel_runs(monkeypatch):
    q, k_cache, v_cache, cu, lens, tables, *_ = paged_case(1, (2, 1), (3, 4), 2, 2, 32,
                                                           torch.float32)

    def never(*args, **kwargs):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(torch_impl, "paged_attention", never)
    monkeypatch.setattr(ops, "launch_paged_attention", never)
    bad = [
        (dict(q=q[:, :3]), "argument 'q' has 3 heads, not a multiple"),
        (dict(k_cache=k_cache.half()), "argument 'k_cache' must have dtype torch.float32"),
        (dict(v_cache=v_cache[:, :, :1]), "argument 'v_cache' has shape"),
        (dict(cu_seqlens_q=cu.long()), "argument 'cu_seqlens_q' must have dtype torch.int32"),
        (dict(seq_lens=lens[:1]), "argument 'cu_seqlens_q' must have num_seqs"),
        (dict(block_tables=tables[0]), "argument 'block_tables' must have 2 dimensions"),
        (dict(scale=-1.0), "argument 'scale' must be a positive number"),
        (dict(max_seqlen_q=0), "argument 'max_seqlen_q' must be a positive integer"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(block_tables=torch.where(tables == tables[1, 0], 99, tables).int()),
         r"argument 'block_tables' \[1, 0\] = 99 is outside the cache's"),
        (dict(seq_lens=torch.tensor([1, 4], dtype=torch.int32)),
         r"argument 'seq_lens' \[0\] = 1 is shorter than its 2 query tokens"),
        (dict(max_seqlen_q=1), "argument 'max_seqlen_q' is 1, but a sequence has 2"),
    ]
    for backend in BACKENDS:
        for change, message in bad:
            args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu, seq_lens=lens,
                        block_tables=tables, scale=0.5, backend=backend, check=True)
            with pytest.raises(ValueError, match=message):
                paged_attention(**{**args, **change})
    with pytest.raises(ValueError, match="argument 'slot_mapping' has slot 999"):
        write_kv(q[:, :2], q[:, :2], k_cache, v_cache, torch.tensor([0, 999, 3]), "torch")
    with pytest.raises(ValueError, match="argument 'weight' has 7 entries"):
        rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="argument 'positions' range over 0..300"):
        rotary(q, q[:, :2], torch.tensor([0, 1, 300]), torch.randn(64, 32), backend="torch")
    with pytest.raises(ValueError, match="computes bf16 wrongly"):
        rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(8).bfloat16(), 1e-6,
                 backend="triton")


def test_the_ops_pass_torch_library_checks():
    q, k_cache, v_cache, cu, lens, tables, *_ = paged_case(9, (1, 3), (5, 2), 1, 2, 32,
                                                           torch.float32)
    torch.library.opcheck(torch.ops.fxscale.paged_attention.default,
                          (q, k_cache, v_cache, cu, lens, tables, 0.5, "torch", None, None,
                           None, None, True))
    torch.library.opcheck(torch.ops.fxscale.write_kv.default,
                          (q[:, :1], q[:, :1], k_cache, v_cache,
                           torch.tensor([0, 5, 9, 17], dtype=torch.int32), "torch", True))
    x = torch.randn(3, 16)
    torch.library.opcheck(torch.ops.fxscale.rms_norm.default, (x, torch.randn(16), 1e-6, x,
                                                               "torch"))
    torch.library.opcheck(torch.ops.fxscale.rotary.default,
                          (q, q[:, :1], torch.tensor([0, 1, 2, 3]), torch.randn(8, 16), True,
                           "torch", True))


def test_the_gpu_script_runs_end_to_end_in_the_interpreter(tmp_path):
    """examples/kernels_gpu.py --smoke: tiny sizes through the interpreter, so the script a
    GPU session runs once cannot rot unseen."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "kernels_gpu.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"paged_attention", "rms_norm (+residual)", "rotary",
                                           "write_kv"}
    assert all(r["max_rel_error"] <= 1e-3 for r in rows)
    assert "| paged_attention | float32 |" in (tmp_path / "kernels.md").read_text()
