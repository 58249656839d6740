"""Check and time fxscale's Triton kernels on a GPU in one call.

    python examples/kernels_gpu.py OUT_DIR [--device-model h100] [--dtype float16 bfloat16]
    TRITON_INTERPRET=1 python examples/kernels_gpu.py OUT_DIR --smoke   # tiny, on the CPU

For each kernel and size: the largest relative error against a float64 reference (the torch
implementation run in float64), the median time (triton.testing.do_bench), achieved TFLOP/s
and GB/s beside the device's ceilings from runtime/devices/devices.json, and the time of the
baseline: torch's scaled_dot_product_attention over the same keys and values stored
contiguously (flash attention where torch has it), eager RMSNorm, eager rotary, an index_copy
store. Writes OUT_DIR/kernels.json and OUT_DIR/kernels.md (copy the table into
docs/kernels.md with the GPU's name). --smoke runs tiny sizes through Triton's interpreter on
the CPU to check the script itself (times there mean nothing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fxscale.contracts.jsonio import write_atomic
from fxscale.kernels import paged_attention, rms_norm, rotary, torch_impl, write_kv
from fxscale.runtime.devices import load_device

BLOCK = 16
HEAD_DIM, KV_HEADS, GROUP = 128, 8, 4  # a Llama-3-70B-like attention layer (per GPU at TP1)


def bench(fn, device: torch.device) -> float:
    """Median seconds of fn (do_bench on CUDA; a few timed calls elsewhere)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest relative error against the float64 reference."""
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))


def attention_case(seqs: int, context: int, q_len: int, dtype, device, gen):
    """`seqs` sequences of `context` tokens, the last `q_len` new, in a shuffled paged cache."""
    blocks = -(-context // BLOCK)
    order = torch.randperm(seqs * blocks, generator=gen).to(device)
    tables = order.view(seqs, blocks).to(torch.int32)
    shape = (seqs * blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    q = torch.randn(seqs * q_len, KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(device, dtype)
    cu = torch.arange(0, seqs * q_len + 1, q_len, dtype=torch.int32, device=device)
    lens = torch.full((seqs,), context, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, cu, lens, tables


def attention_row(seqs, context, q_len, dtype, device, ceilings, gen) -> dict:
    """Check and time one paged-attention size against SDPA on contiguous K/V."""
    q, k_cache, v_cache, cu, lens, tables = attention_case(seqs, context, q_len, dtype,
                                                           device, gen)
    scale = HEAD_DIM ** -0.5

    def ours():
        return paged_attention(q, k_cache, v_cache, cu, lens, tables, scale, "triton",
                               max_seqlen_q=q_len, max_seqlen_k=context, check=False)

    checked = slice(0, min(seqs, 4))  # the float64 reference on a few sequences
    n_q = checked.stop * q_len
    want = torch_impl.paged_attention(q[:n_q].double(), k_cache.double(), v_cache.double(),
                                      cu[:checked.stop + 1], lens[checked], tables[checked],
                                      scale, None, None)
    err = error(ours()[:n_q], want)
    k, v, _ = torch_impl.gather_kv(k_cache, v_cache, tables, lens)          # [S, kv, ctx, d]
    qs = q.view(seqs, q_len, -1, HEAD_DIM).transpose(1, 2)                  # [S, H, q, d]
    causal = torch.ones(q_len, context, dtype=torch.bool, device=device).tril(context - q_len)

    def sdpa():
        return F.scaled_dot_product_attention(qs, k, v, attn_mask=causal, scale=scale,
                                              enable_gqa=True)

    seconds, base = bench(ours, device), bench(sdpa, device)
    pairs = seqs * KV_HEADS * GROUP * (q_len * context - q_len * (q_len - 1) / 2)
    flops = 4 * HEAD_DIM * pairs
    nbytes = (2 * k.numel() + 2 * q.numel()) * q.element_size()
    return {"kernel": "paged_attention", "dtype": str(dtype).removeprefix("torch."),
            "size": f"{seqs} seqs x {context} ctx, q {q_len}", "max_rel_error": err,
            "ms": seconds * 1e3, "baseline": "sdpa (contiguous)", "baseline_ms": base * 1e3,
            "tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9,
            "flops_ceiling": ceilings["flops"][str(dtype).removeprefix("torch.")] / 1e12,
            "gbps_ceiling": ceilings["bandwidth"] / 1e9}


def norm_row(rows, hidden, dtype, device, ceilings, gen) -> dict:
    """Check and time fused residual + RMSNorm against eager."""
    x = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    r = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    w = torch.randn(hidden, generator=gen).to(device, dtype)
    h = x.double() + r.double()
    want = w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    err = error(rms_norm(x, w, 1e-6, r, backend="triton")[0], want)

    def eager():
        s = x + r
        return w * (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True)
                                            + 1e-6)).to(dtype), s

    seconds = bench(lambda: rms_norm(x, w, 1e-6, r, backend="triton"), device)
    nbytes = 4 * x.numel() * x.element_size()
    return {"kernel": "rms_norm (+residual)", "dtype": str(dtype).removeprefix("torch."),
            "size": f"{rows} x {hidden}", "max_rel_error": err, "ms": seconds * 1e3,
            "baseline": "eager", "baseline_ms": bench(eager, device) * 1e3, "tflops": None,
            "gbps": nbytes / seconds / 1e9, "flops_ceiling": None,
            "gbps_ceiling": ceilings["bandwidth"] / 1e9}


def rotary_row(tokens, dtype, device, ceilings, gen) -> dict:
    """Check and time rotary embedding against the torch implementation run eagerly."""
    q = torch.randn(tokens, KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(device, dtype)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    positions = torch.randint(0, 8192, (tokens,), generator=gen).to(device)
    inv = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.arange(8192, dtype=torch.float64)[:, None] * inv[None, :]
    cache = torch.cat([angles.cos(), angles.sin()], -1).to(device)
    want = torch_impl.rotary(q.double(), k.double(), positions, cache, True)
    got = rotary(q, k, positions, cache.to(dtype), backend="triton")
    err = max(error(g, w) for g, w in zip(got, want))
    seconds = bench(lambda: rotary(q, k, positions, cache.to(dtype), backend="triton"), device)
    base = bench(lambda: torch_impl.rotary(q, k, positions, cache.to(dtype), True), device)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    return {"kernel": "rotary", "dtype": str(dtype).removeprefix("torch."),
            "size": f"{tokens} tokens", "max_rel_error": err, "ms": seconds * 1e3,
            "baseline": "torch (eager)", "baseline_ms": base * 1e3, "tflops": None,
            "gbps": nbytes / seconds / 1e9, "flops_ceiling": None,
            "gbps_ceiling": ceilings["bandwidth"] / 1e9}


def write_row(tokens, dtype, device, ceilings, gen) -> dict:
    """Check and time the KV store against index_copy_."""
    blocks = -(-tokens // BLOCK) * 2
    k_cache = torch.zeros(blocks, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    v = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    slots = torch.randperm(blocks * BLOCK, generator=gen)[:tokens].to(device)
    write_kv(k, v, k_cache, v_cache, slots, "triton")
    err = error(k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], k.double())
    seconds = bench(lambda: write_kv(k, v, k_cache, v_cache, slots, "triton"), device)
    base = bench(lambda: torch_impl.write_kv(k, v, k_cache, v_cache, slots), device)
    nbytes = 4 * k.numel() * k.element_size()
    return {"kernel": "write_kv", "dtype": str(dtype).removeprefix("torch."),
            "size": f"{tokens} tokens", "max_rel_error": err, "ms": seconds * 1e3,
            "baseline": "index_copy_", "baseline_ms": base * 1e3, "tflops": None,
            "gbps": nbytes / seconds / 1e9, "flops_ceiling": None,
            "gbps_ceiling": ceilings["bandwidth"] / 1e9}


def sizes(smoke: bool) -> dict:
    """Sizes per kernel: (seqs, context, q_len) for attention, rows for the rest."""
    if smoke:
        return {"attention": [(2, 40, 1), (1, 24, 8)], "norm": [(4, 64)], "tokens": [8]}
    decode = [(s, c, 1) for s in (1, 16, 64, 256) for c in (128, 1024, 8192, 32768)
              if s * c <= 2 ** 21]
    prefill = [(s, c, c) for s, c in ((1, 512), (4, 2048), (1, 8192))]
    chunk = [(8, 4096, 512)]
    return {"attention": decode + prefill + chunk,
            "norm": [(r, h) for r in (1, 64, 4096) for h in (4096, 8192)],
            "tokens": [64, 4096]}


def table(rows: list[dict], title: str) -> str:
    """The Markdown table of the results."""
    head = ("| kernel | dtype | size | max rel. error | ms | baseline | baseline ms | x baseline "
            "| TFLOP/s (ceiling) | GB/s (ceiling) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['kernel']} | {r['dtype']} | {r['size']} | {r['max_rel_error']:.1e} | "
        f"{r['ms']:.4g} | {r['baseline']} | {r['baseline_ms']:.4g} | "
        f"{r['baseline_ms'] / r['ms']:.2f} | "
        + (f"{r['tflops']:.1f} ({r['flops_ceiling']:.0f})" if r["tflops"] is not None else "-")
        + f" | {r['gbps']:.0f} ({r['gbps_ceiling']:.0f}) |\n" for r in rows)
    return f"{title}\n\n{head}{body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for kernels.json and kernels.md")
    parser.add_argument("--device-model", default="h100",
                        help="the devices.json entry whose ceilings are printed (default h100)")
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"],
                        choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU through Triton's interpreter")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("kernels_gpu.py: no CUDA device here; run it on a GPU (or --smoke on the CPU "
              "with TRITON_INTERPRET=1 to check the script)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.smoke else "cpu")
    model = load_device(args.device_model)
    ceilings = {"flops": {**model.peak_flops, "float16": model.peak_flops["fp16"],
                          "bfloat16": model.peak_flops["bf16"],
                          "float32": model.peak_flops["fp32"]},
                "bandwidth": model.memory_bandwidth}
    dtypes = [getattr(torch, d) for d in (["float32"] if args.smoke else args.dtype)]
    gen = torch.Generator().manual_seed(0)
    rows = []
    plan = sizes(args.smoke)
    for dtype in dtypes:
        for seqs, context, q_len in plan["attention"]:
            rows.append(attention_row(seqs, context, q_len, dtype, device, ceilings, gen))
            print(rows[-1]["kernel"], rows[-1]["size"], f"{rows[-1]['ms']:.4g} ms", flush=True)
        rows += [norm_row(r, h, dtype, device, ceilings, gen) for r, h in plan["norm"]]
        rows += [rotary_row(t, dtype, device, ceilings, gen) for t in plan["tokens"]]
        rows += [write_row(t, dtype, device, ceilings, gen) for t in plan["tokens"]]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "kernels.json", json.dumps({"device": name, "torch": torch.__version__,
                                                   "rows": rows}, indent=1))
    text = table(rows, f"Kernels on {name}, torch {torch.__version__}; ceilings of the "
                       f"{args.device_model} model")
    write_atomic(out / "kernels.md", text)
    print(text)
    bad = [r for r in rows if not r["max_rel_error"] <= (1e-3 if r["dtype"] == "float32"
                                                          else 2e-2)]
    if bad:
        print(f"{len(bad)} results outside tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
