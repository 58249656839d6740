"""`fxscale simulate --sweep`: the map of where operator-level scaling pays, run and drawn.

Runs runtime/simulator/sweep.py's slices with the presets' service models and writes
`sweep.json`, a heatmap per slice (PNG and SVG: operator / model device-hours, a star where a
policy missed its SLO target) and a Markdown page of the same numbers.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Callable

from fxscale.contracts.jsonio import write_atomic
from fxscale.runtime.simulator.sweep import SweepPlan, SweepPoint, run_sweep


def sweep(plan: SweepPlan, progress: Callable[[str], None] | None = None) -> dict:
    """Run a sweep on the presets (each service model built once)."""
    from fxscale.models.presets import preset_service

    services: dict[tuple, object] = {}

    def service_for(point: SweepPoint):
        key = (point.model, point.device, point.layers)
        if key not in services:
            services[key] = preset_service(*key)
        return services[key]

    return run_sweep(plan, service_for, progress)


def _label(axis: str, value) -> str:
    """A tick label: rates in req/s, seconds with s, scales with x."""
    unit = {"rate_rps": " req/s", "interval_s": " s", "startup_s": " s", "slo_scale": "x",
            "burstiness": ""}.get(axis, "")
    return f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"


AXIS_NAMES = {"rate_rps": "arrival rate", "burstiness": "burstiness (arrival-gap CV)",
              "lengths": "prompt/output mix of", "slo_scale": "SLO (x default)",
              "model": "model", "interval_s": "decision interval", "startup_s": "cold start"}


def _cell(point: dict) -> str:
    """A cell's text: the device-hour ratio (a dash where model or operator had no
    deployment that meets the SLO), starred when a policy missed its target."""
    star = "" if all(point["met"].values()) else "*"
    return _ratio(point["gpu_hours_ratio"]) + star


def _ratio(value: float | None) -> str:
    """A ratio to two decimals, or a dash for none."""
    return "—" if value is None else f"{value:.2f}"


def _share(value: float | None) -> str:
    """An attainment in percent, or 'none' (no deployment to replay)."""
    return "none" if value is None else f"{value:.1%}"


def heatmap(slice_: dict) -> dict[str, bytes]:
    """One slice as a heatmap: {'png': ..., 'svg': ...}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    grid = [[math.nan if p["gpu_hours_ratio"] is None else p["gpu_hours_ratio"] for p in row]
            for row in slice_["grid"]]
    spread = max([0.05] + [abs(v - 1) for row in grid for v in row if not math.isnan(v)])
    fig, ax = plt.subplots(figsize=(1.4 * len(slice_["x_values"]) + 2.5,
                                    0.9 * len(slice_["y_values"]) + 1.8))
    image = ax.imshow(grid, cmap="RdBu_r", origin="lower", aspect="auto",
                      norm=TwoSlopeNorm(1.0, 1 - spread, 1 + spread))
    for i, row in enumerate(slice_["grid"]):
        for j, point in enumerate(row):
            ax.text(j, i, _cell(point), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(slice_["x_values"])),
                  [_label(slice_["x"], v) for v in slice_["x_values"]])
    ax.set_yticks(range(len(slice_["y_values"])),
                  [_label(slice_["y"], v) for v in slice_["y_values"]])
    ax.set_xlabel(AXIS_NAMES[slice_["x"]])
    ax.set_ylabel(AXIS_NAMES[slice_["y"]])
    ax.set_title("operator / model device-hours (< 1: operator cheaper; * SLO missed)",
                 fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return figure_files(fig)


def figure_files(fig) -> dict[str, bytes]:
    """A finished matplotlib figure as {'png': ..., 'svg': ...} (written atomically by the
    caller), the figure closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = {}
    for ext in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext)
        out[ext] = buffer.getvalue()
    plt.close(fig)
    return out


def sweep_markdown(data: dict, command: str) -> str:
    """The sweep as Markdown: the base point, then per slice a table of device-hour and energy
    ratios with both policies' attainment."""
    base = data["base"]
    lines = ["# Where operator-level scaling pays: the map (simulated)", "",
             f"Reproduce: `{command}` ({data['wall_s']:.0f} s here).", "",
             "Base point: " + ", ".join(f"{k} {v}" for k, v in base.items()) + ".",
             "Each cell: operator / model device-hours, then energy; the attainment of model "
             "and operator; no setting search (headroom 1, no floor, for both).", ""]
    for slice_ in data["slices"]:
        x, y = slice_["x"], slice_["y"]
        lines += [f"## {AXIS_NAMES[y]} x {AXIS_NAMES[x]}", "",
                  f"![{y} x {x}]({x}-{y}.svg)", "",
                  "| " + " | ".join([f"{y} \\ {x}"] + [_label(x, v) for v in slice_["x_values"]])
                  + " |", "|" + "---|" * (len(slice_["x_values"]) + 1)]
        for value, row in zip(slice_["y_values"], slice_["grid"]):
            cells = [f"{_ratio(p['gpu_hours_ratio'])} / {_ratio(p['energy_ratio'])} "
                     f"({_share(p['attainment']['model'])}, "
                     f"{_share(p['attainment']['operator'])})" for p in row]
            lines.append("| " + " | ".join([_label(y, value)] + cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_sweep(data: dict, directory: Path, command: str) -> list[Path]:
    """sweep.json, sweep.md and a heatmap per slice (PNG, SVG) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "sweep.json", directory / "sweep.md"]
    write_atomic(written[0], json.dumps(data, indent=1) + "\n")
    write_atomic(written[1], sweep_markdown(data, command) + "\n")
    for slice_ in data["slices"]:
        for ext, content in heatmap(slice_).items():
            path = directory / f"{slice_['x']}-{slice_['y']}.{ext}"
            write_atomic(path, content)
            written.append(path)
    return written
