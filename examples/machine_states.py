"""Watch how much two threads at once get from this machine, over time.

    python examples/machine_states.py [SECONDS]

Every ~2 s, one line: the throughput of two jobs at once relative to one, for a
weight-bound GEMV (what `fxscale.fidelity.machine_capacity` measures) and for the served
Llama's MLP on 1 and 2 rows; then a Python loop's speed beside a GEMV thread, and the GEMV
thread's, each relative to running alone. One intra-op thread per job, as a replica runs.
On a shared cloud machine the two-job ratios can flip between states while a single job's
speed stays put (docs/runtime.md, "Fidelity of the runtime model").
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from fxscale.studies.fidelity import concurrent_rates

HIDDEN, INTERMEDIATE = 2048, 5632  # the demo's Llama
PROBE_S = 0.4                      # seconds each rate is measured over


def pair_ratio(make) -> float:
    """Throughput of two copies of a job at once over one copy alone."""
    first, second = make(), make()
    alone = concurrent_rates({"a": first}, PROBE_S)["a"]
    return sum(concurrent_rates({"a": first, "b": second}, PROBE_S).values()) / alone


def gemv():
    """A weight-bound job: one row times a 2048 x 8192 fp32 matrix."""
    weight, row = torch.randn(HIDDEN, 4 * HIDDEN), torch.randn(1, HIDDEN)
    return lambda: row @ weight


def mlp(rows: int):
    """The Llama MLP (gate, up, down) on `rows` rows, with its own weights."""
    gate, up = torch.randn(INTERMEDIATE, HIDDEN), torch.randn(INTERMEDIATE, HIDDEN)
    down, x = torch.randn(HIDDEN, INTERMEDIATE), torch.randn(rows, HIDDEN)
    return lambda: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def python_loop() -> None:
    """Pure Python that holds the interpreter lock (dict updates)."""
    counts: dict[int, int] = {}
    for i in range(2000):
        counts[i % 37] = counts.get(i % 37, 0) + i


def main(seconds: float = 60.0) -> None:
    """Print one line per probe until `seconds` have passed."""
    torch.set_num_threads(1)
    job = gemv()
    end = time.time() + seconds
    while time.time() < end:
        ratios = {"gemv": pair_ratio(gemv), "mlp 1 row": pair_ratio(lambda: mlp(1)),
                  "mlp 2 rows": pair_ratio(lambda: mlp(2))}
        python = concurrent_rates({"py": python_loop}, PROBE_S)["py"]
        alone = concurrent_rates({"gemv": job}, PROBE_S)["gemv"]
        beside = concurrent_rates({"py": python_loop, "gemv": job}, PROBE_S)
        print(time.strftime("%H:%M:%S"), "two jobs / one:",
              "  ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()),
              f"| beside each other: python {beside['py'] / python:.2f}, "
              f"gemv {beside['gemv'] / alone:.2f}", flush=True)


if __name__ == "__main__":
    main(*(float(a) for a in sys.argv[1:2]))
