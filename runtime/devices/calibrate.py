"""Device models against measured GPU profiles: the all-reduce fitted, the roofline scored.

    python -m fxscale.runtime.devices.calibrate            # Markdown tables (under a second)
    python -m fxscale.runtime.devices.calibrate --json -   # the same numbers as JSON

Data (runtime/devices/vidur/, its README): Vidur's measured NCCL all-reduce on 8-GPU H100 and
A100 nodes and its per-operator times of a Llama-2-70B layer on one H100 and one A100 at
tensor-parallel degrees 1, 2, 4 and 8 (Agrawal et al., MLSys 2024; MIT licence).

All-reduce: t = latency + 2 (n - 1) / n x bytes / bandwidth (a ring), one (latency,
bandwidth) per device and worker count on one node. Scored by fitting on the even-indexed
message sizes and predicting the odd-indexed ones (median |predicted / measured - 1|); the
constants in devices.json (`all_reduce`) are the fit on every size, which
tests/test_calibration.py recomputes.

Dense operators: one fit per kernel class (`KernelFit`: latency plus a p-norm of compute and
memory time for GEMMs, latency plus bytes over a rate with a cache term for the memory-bound),
the GEMMs jointly, the two norms jointly, the embedding, the rotary, the activation and the
residual add each alone (their bandwidths differ up to 6x). Scored by fitting on tensor-
parallel degrees 1 and 2 and predicting 4 and 8 (median |predicted / measured - 1| over every
token count, per operator); the constants in devices.json (`kernels`) are the fit on every
degree. Attention has no measured profile here.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from importlib import resources
from typing import Any

import numpy as np

from .catalogue import load_device
from .model import (
    FIT_DTYPE,
    UNMEASURED_ALL_REDUCE_LATENCY_S,
    DeviceModel,
    KernelFit,
    ring_all_reduce_time,
)

ALL_REDUCE_FILES = {"h100": "network_h100_dgx_all_reduce.csv",
                    "a100": "network_a100_dgx_all_reduce.csv"}
COMPUTE_FILES = {"h100": "compute_h100_mlp.csv", "a100": "compute_a100_mlp.csv"}
SMALL_MESSAGE = 1 << 20  # bytes: decode's all-reduces are below this

# Llama-2-70B, as Vidur profiled it: hidden, intermediate, query and KV heads, head dim, fp16
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, ELEMENT = 8192, 28672, 64, 8, 128, 2
# (in, out, which side tensor parallelism splits)
GEMMS = {"attn_pre_proj": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, "out"),  # fused QKV
         "attn_post_proj": (HEADS * HEAD_DIM, HIDDEN, "in"),
         "mlp_up_proj": (HIDDEN, 2 * INTERMEDIATE, "out"),                     # gate and up
         "mlp_down_proj": (INTERMEDIATE, HIDDEN, "in")}


# The cost model's kernel classes with measured operators, and the operators each is fitted on
KERNEL_CLASSES = {"gemm": tuple(GEMMS),
                  "norm": ("input_layernorm", "post_attention_layernorm"),
                  "embedding": ("emb",), "rotary": ("attn_rope",), "activation": ("mlp_act",),
                  "residual": ("add",)}


def _rows(name: str) -> list[dict[str, str]]:
    """The rows of one shipped CSV."""
    text = resources.files("fxscale.runtime.devices").joinpath("vidur", name).read_text()
    return list(csv.DictReader(text.splitlines()))


def load_all_reduce(device: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per worker count within one node: message sizes (bytes, ascending) and median times
    (seconds)."""
    by_workers: dict[int, dict[int, list[float]]] = {}
    for row in _rows(ALL_REDUCE_FILES[device]):
        workers = int(row["num_workers"])
        if int(row["devices_per_node"]) != workers:
            continue  # across nodes: the network, not NVLink
        by_workers.setdefault(workers, {}).setdefault(int(row["size"]), []).append(
            float(row["time_stats.all_reduce.median"]) * 1e-3)
    return {n: (np.array(sorted(sizes), dtype=float),
                np.array([np.mean(sizes[s]) for s in sorted(sizes)]))
            for n, sizes in sorted(by_workers.items())}


def fit_ring(sizes: np.ndarray, times: np.ndarray, workers: int) -> tuple[float, float]:
    """(latency s, bandwidth B/s) of the ring model with the least mean relative error: for
    a bandwidth the best latency is a weighted median; the bandwidth is searched on a
    logarithmic grid, refined twice."""
    volume = 2 * (workers - 1) / workers * sizes

    def best_latency(bandwidth: float) -> tuple[float, float]:
        rest = times - volume / bandwidth
        order = np.argsort(rest)
        weights = (1 / times)[order]
        median = rest[order][np.searchsorted(np.cumsum(weights), weights.sum() / 2)]
        latency = max(0.0, float(median))
        return float(np.mean(np.abs(latency + volume / bandwidth - times) / times)), latency

    low, high = np.log(1e9), np.log(5e12)
    for _ in range(3):
        grid = np.exp(np.linspace(low, high, 200))
        errors = [best_latency(b)[0] for b in grid]
        i = int(np.argmin(errors))
        low, high = np.log(grid[max(0, i - 1)]), np.log(grid[min(len(grid) - 1, i + 1)])
    bandwidth = float(grid[i])
    return best_latency(bandwidth)[1], bandwidth


def _error(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Median |predicted / measured - 1|."""
    return float(np.median(np.abs(predicted / measured - 1)))


def all_reduce_report(device: str) -> list[dict[str, Any]]:
    """Per worker count: the constants fitted on every size, the held-out error of a fit on
    half the sizes (all, and below 1 MiB), the error of the catalogued model, and of the
    datasheet model it replaced (10 us plus the NVLink figure)."""
    model = load_device(device)
    rows = []
    for workers, (sizes, times) in load_all_reduce(device).items():
        train = np.arange(len(sizes)) % 2 == 0
        latency, bandwidth = fit_ring(sizes[train], times[train], workers)
        held = ~train
        predicted = ring_all_reduce_time(sizes, workers, latency, bandwidth)
        catalogued = np.array([model.all_reduce_time(s, workers) for s in sizes])
        datasheet = ring_all_reduce_time(sizes, workers, UNMEASURED_ALL_REDUCE_LATENCY_S,
                                         model.interconnect["nvlink"])
        small = held & (sizes < SMALL_MESSAGE)
        full_latency, full_bandwidth = fit_ring(sizes, times, workers)
        rows.append({"device": device, "workers": workers, "sizes": len(sizes),
                     "latency_s": full_latency, "bandwidth": full_bandwidth,
                     "heldout_error": _error(predicted[held], times[held]),
                     "heldout_small_error": _error(predicted[small], times[small]),
                     "catalogued_error": _error(catalogued, times),
                     "datasheet_error": _error(datasheet, times)})
    return rows


def layer_op_work(op: str, tokens: np.ndarray, tp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs and bytes one worker moves for one operator of the layer (operands read once,
    the result written once)."""
    if op in GEMMS:
        k, n, split = GEMMS[op]
        k, n = (k + 0 * tp, n / tp) if split == "out" else (k / tp, n + 0 * tp)
        return 2 * tokens * k * n, ELEMENT * (k * n + tokens * k + tokens * n)
    elements = {"input_layernorm": 2 * tokens * HIDDEN, "post_attention_layernorm":
                2 * tokens * HIDDEN, "add": 3 * tokens * HIDDEN, "emb": 2 * tokens * HIDDEN,
                "mlp_act": 3 * tokens * INTERMEDIATE / tp,
                # queries and keys rotated in place, and each token's cos/sin row read
                "attn_rope": tokens * (2 * (HEADS + KV_HEADS) / tp + 1) * HEAD_DIM}[op]
    return 0 * tokens, ELEMENT * elements  # memory-bound: their few FLOPs do not count


def fit_kernel(flops: np.ndarray, nbytes: np.ndarray, times: np.ndarray) -> KernelFit:
    """The KernelFit with the least mean relative error: a coordinate search over the
    logarithms of its constants (and the sharpness), halving its steps, from a small grid of
    starts (deterministic). Work with FLOPs gets the compute-bound form, work without the
    memory-bound one with its cache term."""
    compute = bool(np.any(flops > 0))

    def model(x: np.ndarray) -> KernelFit:
        if compute:
            return KernelFit(float(np.exp(x[0])), float(np.exp(x[2])),
                             compute_rate=float(np.exp(x[1])), sharpness=float(x[3]))
        return KernelFit(float(np.exp(x[0])), float(np.exp(x[2])),
                         cache_bytes=float(np.exp(x[1])), beyond_rate=float(np.exp(x[3])))

    def loss(x: np.ndarray) -> float:
        return float(np.mean(np.abs(model(x).time(flops, nbytes) / times - 1)))

    def descend(x: np.ndarray) -> tuple[float, np.ndarray]:
        step = np.array([1.0, 1.0, 1.0, 0.5 if compute else 1.0])
        best = loss(x)
        while step.max() > 1e-4:
            improved = False
            for i in range(4):
                for sign in (1, -1):
                    trial = x.copy()
                    trial[i] += sign * step[i]
                    if compute:  # the sharpness, between a sum and the roofline's max
                        trial[3] = min(max(trial[3], 1.0), 60.0)
                    error = loss(trial)
                    if error < best:
                        best, x, improved = error, trial, True
            if not improved:
                step = step / 2
        return best, x

    # x: log latency, log compute rate (or cache bytes), log memory rate, sharpness (or log
    # beyond rate)
    seconds = (1e-6, 5e-6, 2e-5)
    starts = ([[np.log(t), np.log(5e14), np.log(2e12), n] for t in seconds
               for n in (1.0, 2.0, 4.0)] if compute else
              [[np.log(t), np.log(c), np.log(2e12), np.log(3e12)] for t in seconds[:2]
               for c in (4e6, 16e6, 40e6, 100e6)])
    return model(min((descend(np.array(x)) for x in starts), key=lambda r: r[0])[1])


def layer_measurements(device: str, ops: tuple[str, ...]) -> dict[str, np.ndarray]:
    """FLOPs, bytes, measured seconds, tensor-parallel degree and operator of every measured
    point of the given operators (zero readings left out)."""
    rows = _rows(COMPUTE_FILES[device])
    tokens = np.array([float(r["num_tokens"]) for r in rows])
    tp = np.array([float(r["num_tensor_parallel_workers"]) for r in rows])
    parts: dict[str, list] = {"flops": [], "bytes": [], "seconds": [], "tp": [], "op": []}
    for op in ops:
        measured = np.array([float(r[f"time_stats.{op}.median"]) * 1e-3 for r in rows])
        flops, nbytes = layer_op_work(op, tokens, tp)
        ok = measured > 0
        for key, values in (("flops", flops), ("bytes", nbytes), ("seconds", measured),
                            ("tp", tp), ("op", np.full(len(rows), op))):
            parts[key].append(values[ok])
    return {key: np.concatenate(values) for key, values in parts.items()}


@functools.cache
def kernel_fits(device: str) -> dict[str, KernelFit]:
    """Each kernel class fitted on every measured tensor-parallel degree (the catalogue's)."""
    fits = {}
    for kernel, ops in KERNEL_CLASSES.items():
        data = layer_measurements(device, ops)
        fits[kernel] = fit_kernel(data["flops"], data["bytes"], data["seconds"])
    return fits


@functools.cache
def dense_report(device: str) -> tuple[dict[str, Any], ...]:
    """Per operator: its kernel class fitted on tensor-parallel degrees 1-2, that fit's
    median |predicted / measured - 1| on 1-2 and on the held-out 4-8, the catalogued
    model's error on every point, and the datasheet roofline's on 4-8."""
    model: DeviceModel = load_device(device)
    out = []
    for kernel, ops in KERNEL_CLASSES.items():
        data = layer_measurements(device, ops)
        flops, nbytes, seconds, tp = data["flops"], data["bytes"], data["seconds"], data["tp"]
        train = tp <= 2
        predicted = fit_kernel(flops[train], nbytes[train], seconds[train]).time(flops, nbytes)
        roofline = np.array([model.latency(f, b, FIT_DTYPE) for f, b in zip(flops, nbytes)])
        catalogued = np.array([model.kernel_time(kernel, f, b, FIT_DTYPE)
                               for f, b in zip(flops, nbytes)])
        for op in ops:
            mine = data["op"] == op
            out.append({"device": device, "op": op, "kernel": kernel,
                        "error_tp_1_2": _error(predicted[mine & train], seconds[mine & train]),
                        "error_tp_4_8": _error(predicted[mine & ~train], seconds[mine & ~train]),
                        "roofline_error_tp_4_8": _error(roofline[mine & ~train],
                                                        seconds[mine & ~train]),
                        "catalogued_error": _error(catalogued[mine], seconds[mine])})
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    """Print the all-reduce fit and the dense operators' errors as Markdown (or JSON)."""
    parser = argparse.ArgumentParser(prog="python -m fxscale.runtime.devices.calibrate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the numbers as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    report = {"all_reduce": [r for d in ALL_REDUCE_FILES for r in all_reduce_report(d)],
              "dense": [r for d in COMPUTE_FILES for r in dense_report(d)]}
    if args.json:
        text = json.dumps(report, indent=1) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
        return 0
    print("| device | workers | latency us | bandwidth GB/s | held-out error | held-out, "
          "< 1 MiB | catalogued model's error | datasheet model's error |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in report["all_reduce"]:
        print(f"| {r['device']} | {r['workers']} | {r['latency_s'] * 1e6:.1f} | "
              f"{r['bandwidth'] / 1e9:.0f} | {r['heldout_error']:.1%} | "
              f"{r['heldout_small_error']:.1%} | {r['catalogued_error']:.1%} | "
              f"{r['datasheet_error']:.1%} |")
    print("\n| device | operator | kernel class | fit on TP 1-2 | held-out TP 4-8 | "
          "catalogued fit, all TP | roofline, TP 4-8 |\n|---|---|---|---|---|---|---|")
    for r in report["dense"]:
        print(f"| {r['device']} | {r['op']} | {r['kernel']} | {r['error_tp_1_2']:.1%} | "
              f"**{r['error_tp_4_8']:.1%}** | {r['catalogued_error']:.1%} | "
              f"{r['roofline_error_tp_4_8']:.1%} |")
    print("\n| device | kernel class | latency us | compute TFLOP/s | memory GB/s | "
          "beyond the cache GB/s | sharpness |\n|---|---|---|---|---|---|---|")
    for device in COMPUTE_FILES:
        for kernel, fit in kernel_fits(device).items():
            compute = f"{fit.compute_rate / 1e12:.0f}" if fit.compute_rate else "—"
            cache = (f"{fit.cache_bytes / 2**20:.1f} MiB, then +1/{fit.beyond_rate / 1e9:.0f}"
                     if fit.beyond_rate else "—")
            print(f"| {device} | {kernel} | {fit.latency_s * 1e6:.1f} | {compute} | "
                  f"{fit.memory_rate / 1e9:.0f} | {cache} | "
                  f"{f'{fit.sharpness:.2f}' if fit.compute_rate else '—'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
