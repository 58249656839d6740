"""Analytic profiles: a group's latency from its FLOPs and bytes on a device model (roofline).

Costs come from the same cost pass users get (`fxscale.explain`), captured at every grid point
(prefill: a prompt of the stated length; decode: one token against a KV cache of that length),
so analytic and measured profiles describe the same groups.
"""
from __future__ import annotations

import statistics

import torch

from fxscale.compiler.capture import explain
from fxscale.contracts.profile import GroupProfile, Profile, ProfilePoint
from fxscale.profiling.measure import Grid, dtype_name, library_versions
from fxscale.profiling.workloads import inputs_for
from fxscale.runtime.devices import DeviceModel


def analytic_profile(model: torch.nn.Module, grid: Grid, device: DeviceModel,
                     granularity: str = "operator", dtype: str | None = None) -> Profile:
    """The roofline latency of every group at every grid point on `device` (the model may
    live on the meta device: nothing is allocated)."""
    module = getattr(model, "_orig_mod", model).eval()
    param = next(module.parameters())
    dtype = dtype or dtype_name(param.dtype)
    points: dict[str, list[ProfilePoint]] = {}
    ids: dict[str, str] = {}
    stateful: dict[str, bool] = {}
    for (phase, batch, length), graph in group_graphs_over(module, grid, granularity):
        for group in graph.groups:
            seconds = device.latency(graph.cost(group, "flops"), graph.bytes_moved(group), dtype)
            ids.setdefault(group.name, group.id)
            stateful[group.name] = group.stateful
            points.setdefault(group.name, []).append(ProfilePoint(
                phase, batch, length, seconds, seconds, seconds, 1))
    return Profile(model=type(module).__name__, granularity=granularity, device=device.description,
                   source=f"analytic:{device.name}", dtype=dtype, threads=torch.get_num_threads(),
                   versions=library_versions(),
                   groups=[GroupProfile(ids[name], name, pts, stateful[name])
                           for name, pts in points.items()],
                   notes=["roofline: overhead + max(compute time, memory time); "
                          "see docs/devices.md"])


def group_graphs_over(model: torch.nn.Module, grid: Grid, granularity: str):
    """(grid point, GroupGraph captured at exactly that point) for every point of the grid."""
    inputs = inputs_for(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for phase, batch, length in grid.points():
            yield (phase, batch, length), explain(
                model, granularity=granularity, dynamic=False,
                **inputs.for_phase(phase, batch, length, generator))


def compare(measured: Profile, predicted: Profile, min_latency_s: float = 1e-3) -> list[dict]:
    """Per group and phase: median absolute percentage error of `predicted` vs `measured`,
    over grid points whose measured latency is at least `min_latency_s` (> 0)."""
    if min_latency_s <= 0:
        raise ValueError(f"min_latency_s must be positive, got {min_latency_s}")
    rows = []
    for group in measured.groups:
        other = next((g for g in predicted.groups if g.name == group.name), None)
        if other is None:
            continue
        for phase in ("prefill", "decode"):
            errors = []
            for point in group.points:
                match = other.at(point.phase, point.batch, point.length)
                if point.phase == phase and match and point.median_s >= min_latency_s:
                    errors.append(abs(match.median_s - point.median_s) / point.median_s)
            if errors:
                rows.append({"group": group.name, "phase": phase, "points": len(errors),
                             "mape": statistics.median(errors)})
    return rows
