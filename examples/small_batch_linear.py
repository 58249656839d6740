"""Time a weight-bound fp32 linear layer at the batch sizes selective batching forms on CPU.

    python examples/small_batch_linear.py [IN_FEATURES OUT_FEATURES]

One intra-op thread, as a replica runs. Columns: `x @ W.T` (what the served groups run; MKL
on x86 builds) and oneDNN's linear with the weight packed once for that batch size. Each is
checked against a float64 product first.
"""
from __future__ import annotations

import sys
import time

import torch

BATCHES = (1, 2, 3, 4, 8, 16)


def milliseconds(run, repeats: int = 30) -> float:
    """Mean wall milliseconds of one call, after one warm-up call."""
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e3


def main(in_features: int = 2048, out_features: int = 5632) -> None:
    """Print one row per batch size."""
    torch.set_num_threads(1)
    weight = torch.randn(out_features, in_features)
    print(f"weight {out_features}x{in_features} fp32 ({weight.numel() * 4 / 2**20:.0f} MiB)")
    print("| rows | x @ W.T (ms) | oneDNN packed (ms) |\n|---|---|---|")
    for rows in BATCHES:
        x = torch.randn(rows, in_features)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

        def onednn(x=x, packed=packed):
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

        reference = x.double() @ weight.double().T
        for out in (x @ weight.T, onednn()):
            torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-3)
        print(f"| {rows} | {milliseconds(lambda x=x: x @ weight.T):.2f} "
              f"| {milliseconds(onednn):.2f} |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
