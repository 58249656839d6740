"""The serving half of `fxscale demo`: one trace slice, served with operator-level and then
model-level autoscaling on the same budget, compared side by side.

The model is a small Llama whose decode reads far more weight bytes than it computes on (as
a large model's does), built from a config with random weights. Both policies run the same
engine (runtime/engine: continuous batching, paged KV cache) with the autoscaler on;
`operator` scales each group, `model` scales whole-model replicas.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from fxscale.contracts.plan import LIVE_POLICIES, SLO
from fxscale.contracts.trace import Request
from fxscale.serving.replay import replay, scaled_slice


@dataclass(frozen=True)
class DemoConfig:
    """What the serving demo serves, and how."""

    trace: str = "azure-conv"
    seconds: float = 30.0          # replay length (after the speed-up)
    speedup: float = 2.0           # trace seconds per replay second
    hidden: int = 2048
    layers: int = 2
    budget: int = 2
    ttft: float = 2.0
    tbt: float = 0.2
    interval_s: float = 2.0        # autoscaler interval
    prompt_divisor: float = 64.0
    max_prompt: int = 32
    output_divisor: float = 16.0
    max_new: int = 16
    seed: int = 0

    def model(self) -> Any:
        """The served Llama (random weights, eval mode)."""
        from fxscale.models import zoo

        return zoo.build("llama", layers=self.layers, hidden=self.hidden).model.eval()

    def requests(self) -> list[Request]:
        """The scaled trace slice."""
        return scaled_slice(self.trace, duration_s=self.seconds * self.speedup,
                            speedup=self.speedup, prompt_divisor=self.prompt_divisor,
                            output_divisor=self.output_divisor, max_prompt=self.max_prompt,
                            max_new=self.max_new)


def serve_trace(config: DemoConfig, policies: tuple[str, ...] = LIVE_POLICIES,
                progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Serve the slice once per policy; the replays, with each server's final stats."""
    import fxscale

    model, requests = config.model(), config.requests()
    slo = SLO(config.ttft, config.tbt)
    results: dict[str, Any] = {"config": asdict(config), "requests": len(requests),
                               "policies": {}}
    for policy in policies:
        start = time.perf_counter()
        with fxscale.serve(model, policy=policy, slo=slo, budget=config.budget,
                           autoscale=True, autoscale_interval_s=config.interval_s) as server:
            ready = time.perf_counter() - start
            run = replay(server, requests, slo, seed=config.seed,
                         progress=(lambda i, n, p=policy: progress(p, i, n)) if progress
                         else None)
            stats = server.stats()
        run.update(ready_s=ready, autoscaler=stats["autoscaler"], engine=stats["engine"],
                   groups={name: {k: g[k] for k in ("batch_mean", "replicas", "retries")}
                           for name, g in stats["groups"].items()})
        results["policies"][policy] = run
    return results


def summary_table(results: dict[str, Any]) -> Any:
    """A rich table: one row per policy."""
    from rich.table import Table

    table = Table(title=f"{results['requests']} requests of {results['config']['trace']}, "
                        f"budget {results['config']['budget']}, SLO TTFT "
                        f"{results['config']['ttft']:g} s / TBT {results['config']['tbt']:g} s")
    for column in ("policy", "completed", "SLO attainment", "tokens/s", "TTFT p50 / p90 s",
                   "TBT p50 / p90 s", "scale decisions"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for policy, run in results["policies"].items():
        s = run["summary"]
        table.add_row(policy, f"{s['completed']}/{s['requests']}",
                      f"{s['slo_attainment']:.1%}", f"{s['tokens_per_s']:.1f}",
                      f"{_num(s['ttft_p50_s'])} / {_num(s['ttft_p90_s'])}",
                      f"{_num(s['tbt_p50_s'])} / {_num(s['tbt_p90_s'])}",
                      str(len(run["autoscaler"]["decisions"])))
    return table


def replicas_table(policy: str, run: dict[str, Any], columns: int = 8) -> Any:
    """A rich table of replicas per group over time (sampled every few seconds)."""
    from rich.table import Table

    timeline = run["timeline"]
    step = max(1, len(timeline) // columns)
    picked = timeline[::step]
    table = Table(title=f"{policy}: replicas per group over time")
    table.add_column("group")
    for row in picked:
        table.add_column(f"{row['t']:.0f}s", justify="right")
    groups = sorted({g for row in timeline for g in row["replicas"]})
    for group in groups:
        table.add_row(group, *(str(row["replicas"].get(group, "")) for row in picked))
    table.add_row("[dim]requests/s[/dim]", *(f"{row['rate']:.0f}" for row in picked))
    table.add_row("[dim]SLO attained[/dim]",
                  *("-" if row["attainment"] is None else f"{row['attainment']:.0%}"
                    for row in picked))
    return table


def _num(value: float | None) -> str:
    """Seconds with three decimals, or '-' when there is no value."""
    return "-" if value is None else f"{value:.3f}"
