"""What a Ray Compiled Graph saves per step, on trivial calls: the probe behind fxscale's
compiled-graph path (`fxscale.serve(..., backend="ray", compiled_graph=True)`, docs/ray.md).

A step of an operator-level server is a chain of group calls on actors. This probe times a
chain of 8 trivial calls (x + 1 on a [16, 512] fp32 tensor) over two actors, placed
alternating (A B A B ...: every call moves) or in two runs (A A A A B B B B: one move):

- plain: actor calls with each result's ref passed to the next call, one ray.get at the end
  (fxscale's default path);
- compiled: the same chain as a Ray Compiled Graph (`experimental_compile`), one execute().

Rounds of the two are interleaved; it prints the median and p10-p90 per step in ms, and
the CPU the two actors burn while a compiled graph sits idle (its loops poll).

    python examples/ray_compiled_graph_probe.py [--rounds 3] [--steps 70]

It starts a private Ray instance on 127.0.0.1 and stops it at the end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
import torch
from ray.dag import InputNode

CALLS = 8


@ray.remote(num_cpus=0)
class Stage:
    """An actor standing for a group replica."""

    def pid(self) -> int:
        return os.getpid()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def plain(actors: list, x: torch.Tensor) -> torch.Tensor:
    """The chain as plain actor calls, refs passed along, one wait."""
    ref = x
    for actor in actors:
        ref = actor.step.remote(ref)
    return ray.get(ref)


def compiled(actors: list) -> object:
    """The chain as a compiled graph."""
    with InputNode() as node:
        out = node
        for actor in actors:
            out = actor.step.bind(out)
    return out.experimental_compile()


def timed(fn, steps: int) -> list[float]:
    """Seconds per call of fn, `steps` times."""
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def spread_ms(seconds: list[float]) -> str:
    q = statistics.quantiles([s * 1e3 for s in seconds], n=10)
    return f"{statistics.median(seconds) * 1e3:.1f} ms ({q[0]:.1f}-{q[-1]:.1f})"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes so far (from /proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=70, help="timed steps per round")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        a, b = Stage.remote(), Stage.remote()
        pids = ray.get([a.pid.remote(), b.pid.remote()])
        x = torch.zeros(16, 512)
        for name, actors in (("A B A B ...", [a, b] * (CALLS // 2)),
                             ("A A A A B B B B", [a] * (CALLS // 2) + [b] * (CALLS // 2))):
            times: dict[str, list[float]] = {"plain": [], "compiled": []}
            idle = 0.0
            for _ in range(args.rounds):
                timed(lambda: plain(actors, x), 10)  # warm
                times["plain"] += timed(lambda: plain(actors, x), args.steps)
                graph = compiled(actors)
                try:
                    timed(lambda: ray.get(graph.execute(x)), 10)
                    times["compiled"] += timed(lambda: ray.get(graph.execute(x)), args.steps)
                    before = cpu_seconds(pids)
                    time.sleep(1.0)
                    idle = cpu_seconds(pids) - before
                finally:
                    graph.teardown()  # an actor takes part in one live graph at a time
            print(f"{name}: plain {spread_ms(times['plain'])}, compiled "
                  f"{spread_ms(times['compiled'])} per step of {CALLS} calls; the two actors "
                  f"used {idle:.2f} CPU-s in 1 s with the graph idle")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
