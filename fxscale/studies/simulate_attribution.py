"""`fxscale simulate --attribute`: the operator-vs-model gap by source, as a waterfall.

Writes runtime/simulator/attribution.py's decomposition as `attribution.json`, a waterfall
plot (PNG and SVG: model-level device-hours and energy, each source's step, operator-level)
and a Markdown page with the table and every replayed coalition.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from fxscale.contracts.jsonio import write_atomic
from fxscale.studies.simulate_sweep import figure_files

UNITS = {"gpu_hours": "GPU-h", "energy_kwh": "kWh"}


def waterfall(data: dict) -> dict[str, bytes]:
    """Device-hours and energy as two waterfalls: {'png': ..., 'svg': ...}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = data["parts"]
    labels = ["model", *(p["source"] for p in parts), "operator"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, metric in zip(axes, UNITS):
        start = data["model"][metric]
        bottoms, heights, colours = [0.0], [start], ["#777777"]
        level = start
        for part in parts:
            step = part[metric]
            bottoms.append(min(level, level + step))
            heights.append(abs(step))
            colours.append("#2166ac" if step < 0 else "#b2182b")
            level += step
        bottoms.append(0.0)
        heights.append(data["operator"][metric])
        colours.append("#777777")
        ax.bar(range(len(labels)), heights, bottom=bottoms, color=colours)
        for i, part in enumerate(parts, start=1):
            ax.text(i, bottoms[i] + heights[i], f"{part[metric + '_points']:+.1f}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.15 * max(b + h for b, h in zip(bottoms, heights)))  # room for labels
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(UNITS[metric])
        ax.set_title(f"{UNITS[metric]}: operator - model = "
                     f"{data['total_points'][metric]:+.1f} points of model-level "
                     "(blue saves, red costs)", fontsize=9)
    return figure_files(fig)


def _setting(value) -> str:
    """A setting's value as text: a mapping as key=value pairs."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
    return str(value)


def attribution_markdown(data: dict, command: str) -> str:
    """The decomposition as Markdown: the waterfall, the parts table and every coalition."""
    config = data.get("config", {})
    lines = ["# Where the operator-vs-model gap comes from (simulated)", "",
             f"Reproduce: `{command}` ({data.get('wall_s', 0):.0f} s here).", ""]
    if config:
        lines += ["Setting: " + ", ".join(f"{k} {_setting(v)}" for k, v in config.items())
                  + ".", ""]
    lines += ["![waterfall](attribution.svg)", "",
              "Points are percent of model-level. The operator engine step is fixed first; each "
              "mechanism's part is its Shapley value over the orders of switching mechanisms "
              "on, so the parts do not depend on an order.", "",
              "| source | GPU-h | points | kWh | points | note |", "|---|---|---|---|---|---|"]
    for part in data["parts"]:
        lines.append(f"| {part['source']} | {part['gpu_hours']:+.3f} | "
                     f"{part['gpu_hours_points']:+.1f} | {part['energy_kwh']:+.3f} | "
                     f"{part['energy_kwh_points']:+.1f} | {part.get('note', '')} |")
    total, points = data["total"], data["total_points"]
    lines += [f"| **operator - model** | {total['gpu_hours']:+.3f} | "
              f"{points['gpu_hours']:+.1f} | {total['energy_kwh']:+.3f} | "
              f"{points['energy_kwh']:+.1f} | residual {data['residual_points']['gpu_hours']:+.2g}"
              f" / {data['residual_points']['energy_kwh']:+.2g} points |", "",
              "Every replay (each at its best searched setting):", "",
              "| run | mechanisms | interval s | GPU-h | kWh | SLO met | headroom, floor |",
              "|---|---|---|---|---|---|---|"]
    runs = [("model", data["model"])] + [("operator", c) for c in data["coalitions"]]
    for name, run in runs:
        mechanisms = "—" if run["mechanisms"] is None else ", ".join(run["mechanisms"]) or "none"
        met = f"{run['slo_attainment']:.2%}" + ("" if run["meets_target"] else " (!)")
        lines.append(f"| {name} | {mechanisms} | {run['interval_s']:g} | "
                     f"{run['gpu_hours']:.3f} | {run['energy_kwh']:.3f} | {met} | "
                     f"{run['headroom']:g}, {run['floor']:g} |")
    if not data["all_met"]:
        lines += ["", "(!) This run missed the attainment target at every searched setting: "
                      "its value is the best attainment's cost, so parts involving it "
                      "compare deployments that do not serve alike."]
    return "\n".join(lines)


def attribution_table(data: dict) -> str:
    """The parts as a terminal table, with the total and the residual."""
    from rich.console import Console
    from rich.table import Table

    model = data["model"]
    table = Table(title=f"operator - model, by source (model-level: {model['gpu_hours']:.2f} "
                        f"GPU-h, {model['energy_kwh']:.2f} kWh)", title_justify="left")
    for col in ("source", "GPU-h", "points", "kWh", "points", "note"):
        table.add_column(col, justify="left" if col in ("source", "note") else "right")
    for part in data["parts"]:
        table.add_row(part["source"], f"{part['gpu_hours']:+.3f}",
                      f"{part['gpu_hours_points']:+.1f}", f"{part['energy_kwh']:+.3f}",
                      f"{part['energy_kwh_points']:+.1f}", part.get("note", ""))
    total, points, residual = data["total"], data["total_points"], data["residual_points"]
    table.add_row("operator - model", f"{total['gpu_hours']:+.3f}",
                  f"{points['gpu_hours']:+.1f}", f"{total['energy_kwh']:+.3f}",
                  f"{points['energy_kwh']:+.1f}",
                  f"residual {residual['gpu_hours']:+.2g} / {residual['energy_kwh']:+.2g}")
    table.caption = ("points: percent of model-level; the operator engine step comes first, "
                     "each mechanism's part is its Shapley value")
    if not data["all_met"]:
        table.caption += "; a replay missed its attainment target (see attribution.md)"
    buffer = io.StringIO()
    Console(file=buffer, width=200, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue()


def write_attribution(data: dict, directory: Path, command: str) -> list[Path]:
    """attribution.json, attribution.md and the waterfall (PNG, SVG) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "attribution.json", directory / "attribution.md"]
    write_atomic(written[0], json.dumps(data, indent=1) + "\n")
    write_atomic(written[1], attribution_markdown(data, command) + "\n")
    for ext, content in waterfall(data).items():
        path = directory / f"attribution.{ext}"
        write_atomic(path, content)
        written.append(path)
    return written
