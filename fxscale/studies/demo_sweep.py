"""The declared sweep the demo's devices and slice are chosen from: device count, device
memory and trace slice, each point served in simulated time by both policies
(runtime/simulator/deployment.py) from profiles measured once on this machine. Every number
it writes is predicted; none comes from a live run, and the demo is not tuned on live runs.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from fxscale.contracts.devices import Devices, PlacementError
from fxscale.runtime.simulator.deployment import Deployment
from fxscale.studies.demo import (
    POLICIES,
    TIE_ATTAINMENT,
    DemoConfig,
    calibrated,
    figures,
    predicted_run,
)

MIB = 1 << 20
MIN_ATTAINMENT = 0.5  # the demo's point: a deployment someone would run


@dataclass(frozen=True)
class SweepGrid:
    """The points swept: devices (count x memory, one slot each) and slices (start, speedup)
    of the demo's trace."""

    counts: tuple[int, ...] = (1, 2)
    memories_mib: tuple[int, ...] = (32, 40, 48, 64)
    slices: tuple[tuple[float, float], ...] = tuple(
        (start, speedup) for start in (0.0, 60.0, 120.0) for speedup in (1.0, 2.0, 4.0))


def measure_profiles(config: DemoConfig, counts: tuple[int, ...],
                     progress: Callable[[str], None] | None = None
                     ) -> dict[tuple[str, int], Deployment]:
    """Each policy's calibrated deployment on `count` devices of unbounded memory (what a
    group's execution takes depends on the slots, not on the memory), calibrated on
    requests shaped like the config's slice."""
    import fxscale

    model, requests = config.model(), config.requests()
    profiles = {}
    for policy, count in itertools.product(POLICIES, counts):
        if progress:
            progress(f"measuring {policy}-level on {count} device(s)")
        devices = Devices(count, None, 1)
        with fxscale.serve(model, policy=policy, slo=config.slo(), devices=devices,
                           kv_cache_tokens=config.kv_cache_tokens) as server:
            profiles[(policy, count)] = calibrated(server, replace(config, devices=devices),
                                                   requests)
    return profiles


def sweep(config: DemoConfig, grid: SweepGrid = SweepGrid(),
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict both policies at every point of the grid; the rows, and how long it took."""
    start = time.perf_counter()
    first_start, first_speedup = grid.slices[0]  # calibrated on the first slice's shapes
    profiles = measure_profiles(replace(config, start_s=first_start, speedup=first_speedup),
                                grid.counts, progress)
    rows = []
    points = list(itertools.product(grid.counts, grid.memories_mib, grid.slices))
    for i, (count, memory, (start_s, speedup)) in enumerate(points):
        if progress:
            progress(f"simulating point {i + 1}/{len(points)}")
        point = replace(config, devices=Devices(count, memory * MIB, 1), start_s=start_s,
                        speedup=speedup)
        requests = point.requests()
        row: dict[str, Any] = {"devices": count, "memory_mib": memory, "start_s": start_s,
                               "speedup": speedup, "requests": len(requests)}
        for policy in POLICIES:
            deployment = replace(profiles[(policy, count)], devices=point.devices)
            stateful = [g.model.name for g in deployment.groups if g.stateful]
            try:
                run = predicted_run(deployment, requests, point.slo(), point.sample_s)
            except PlacementError as err:  # this policy cannot be deployed there
                row[policy] = {"error": str(err)}
                continue
            row[policy] = figures(run, stateful)
        row["difference"] = _difference(row)
        rows.append(row)
    return {"grid": asdict(grid), "config": config.to_dict(), "rows": rows,
            "seconds": time.perf_counter() - start, "predicted": True}


def _difference(row: dict[str, Any]) -> float | None:
    """Operator-level's SLO attainment minus model-level's (None where one cannot run)."""
    a, b = row.get("model", {}), row.get("operator", {})
    if a.get("slo_attainment") is None or b.get("slo_attainment") is None:
        return None
    return b["slo_attainment"] - a["slo_attainment"]


def chosen_point(result: dict[str, Any]) -> dict[str, Any] | None:
    """The demo's point: where operator-level's predicted SLO attainment gain over
    model-level is largest, among points where both deploy and operator-level meets the SLO
    for at least MIN_ATTAINMENT of the requests; the lighter load on a tie."""
    candidates = [r for r in result["rows"] if r["difference"] is not None
                  and r["operator"]["slo_attainment"] >= MIN_ATTAINMENT]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (round(r["difference"], 3), -r["requests"]))


def sweep_markdown(result: dict[str, Any], command: str) -> str:
    """The sweep as a Markdown page: how it was made, every point, where the policies differ."""
    config = result["config"]
    lines = [
        "# The demo's sweep (predicted)",
        "",
        "Every number on this page is **predicted** by the deployment simulator "
        "(runtime/simulator/deployment.py: the engine's scheduler, placement and autoscaler in "
        "simulated time) from group profiles measured once on this machine; none comes from a "
        "live run. `fxscale demo` takes its devices and slice from here; it is not tuned on "
        "live runs.",
        "",
        f"Made with `{command}` in {result['seconds']:.0f} s.",
        "",
        f"Model: a {config['layers']}-layer Llama, hidden {config['hidden']}, random weights; "
        f"KV cache {config['kv_cache_tokens']} tokens per attention (model) replica; trace "
        f"{config['trace']}, {config['seconds']:g} s per slice after the speed-up, prompts / "
        f"{config['prompt_divisor']:g} (at most {config['max_prompt']}), outputs / "
        f"{config['output_divisor']:g} (at most {config['max_new']}); SLO TTFT "
        f"{config['ttft']:g} s, TBT {config['tbt']:g} s; autoscaler every "
        f"{config['interval_s']:g} s; each device has one compute slot.",
        "",
        "| devices | memory (MiB) | slice start (s) | speed-up | requests | model SLO | "
        "operator SLO | difference | model tok/s | operator tok/s | model peak KV replicas | "
        "operator peak KV replicas |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = [str(row["devices"]), str(row["memory_mib"]), f"{row['start_s']:g}",
                 f"{row['speedup']:g}", str(row["requests"])]
        cells += [_cell(row[p], "slo_attainment") for p in POLICIES]
        cells.append("-" if row["difference"] is None else f"{row['difference']:+.1%}")
        cells += [_cell(row[p], "tokens_per_s") for p in POLICIES]
        cells += [_cell(row[p], "peak_kv_replicas") for p in POLICIES]
        lines.append("| " + " | ".join(cells) + " |")
    differing = [r for r in result["rows"] if r["difference"] is not None
                 and abs(r["difference"]) >= TIE_ATTAINMENT]
    ahead = [r for r in differing if r["difference"] > 0]
    lines += ["", f"Points where the policies differ by {TIE_ATTAINMENT:.0%} of SLO attainment "
                  f"or more: {len(differing)} of {len(result['rows'])}; operator-level ahead at "
                  f"{len(ahead)}, model-level at {len(differing) - len(ahead)}."]
    point = chosen_point(result)
    if point is None:
        lines += ["", "No point has operator-level meeting the SLO for "
                      f"{MIN_ATTAINMENT:.0%} of requests; the demo keeps its defaults."]
    else:
        lines += ["", f"**The demo's point** (the rule: the largest predicted operator-level "
                      f"gain in SLO attainment where operator-level meets it for at least "
                      f"{MIN_ATTAINMENT:.0%} of requests): {point['devices']} device(s) of "
                      f"{point['memory_mib']} MiB, slice start {point['start_s']:g} s, "
                      f"speed-up {point['speedup']:g}: predicted "
                      f"{point['operator']['slo_attainment']:.1%} (operator) vs "
                      f"{point['model']['slo_attainment']:.1%} (model)."]
    return "\n".join(lines) + "\n"


def _cell(figures_or_error: dict[str, Any], key: str) -> str:
    """One figure of one policy at one point ('does not fit' when it could not deploy)."""
    if "error" in figures_or_error:
        return "does not fit"
    value = figures_or_error[key]
    if key == "slo_attainment":
        return f"{value:.1%}"
    if key == "tokens_per_s":
        return f"{value:.0f}"
    return str(value)
