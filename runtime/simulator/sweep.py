"""The map: where operator-level scaling pays against model-level, as 2-D slices through a
stated base point.

Every point replays the same requests under both policies (`compare`, no setting search: the
base headroom and no floor for both, so a point costs two replays) and keeps the
operator / model ratios of device-hours and energy with each policy's SLO attainment. Axes:
arrival rate, burstiness (the coefficient of variation of the arrival gaps; 1 is Poisson),
the prompt/output length mix of a shipped trace, SLO tightness (x the model's default),
model, the autoscaler's decision interval and the cold start. Requests are resampled from the
length trace (`renewal_resample`), so every axis moves one thing. Pure Python: the caller
supplies the service model of a (model, layers) pair.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

from fxscale.contracts.plan import SLO
from fxscale.runtime.planner.search import default_slo
from fxscale.runtime.planner.service import ServiceModel
from fxscale.runtime.simulator.evaluate import compare
from fxscale.runtime.simulator.replay import ScalingConfig
from fxscale.runtime.traces.loaders import load_trace, renewal_resample

POLICIES = ("model", "operator")


@dataclass(frozen=True)
class SweepPoint:
    """One point of the map: the workload, SLO, model and autoscaler it replays."""

    model: str = "llama-2-70b"
    layers: int | None = None        # None: the whole model
    device: str = "h100"
    lengths: str = "azure-conv"      # the shipped trace whose length mix is resampled
    rate_rps: float = 5.0
    burstiness: float = 1.0          # coefficient of variation of the arrival gaps
    slo_scale: float = 1.0           # x the model's default TTFT and TBT
    interval_s: float = 30.0
    startup_s: float = 10.0
    seconds: float = 1200.0          # of arrivals
    seed: int = 0


# values of each axis; the base point's value is among them
AXES: dict[str, tuple] = {
    "rate_rps": (2.5, 5.0, 10.0, 20.0),
    "burstiness": (0.5, 1.0, 2.0, 4.0),
    "lengths": ("azure-conv", "azure-code"),
    "slo_scale": (0.5, 1.0, 2.0),
    "model": ("llama-2-7b", "llama-2-70b", "mixtral-8x7b"),
    "interval_s": (5.0, 10.0, 30.0, 60.0),
    "startup_s": (0.0, 10.0, 30.0, 60.0),
}
# pairs of axes per set; `quick` is one slice on a shorter, coarser grid
SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "quick": (("rate_rps", "burstiness"),),
    "full": (("rate_rps", "burstiness"), ("lengths", "slo_scale"), ("model", "rate_rps"),
             ("interval_s", "startup_s")),
}
QUICK_AXES = {"rate_rps": (2.5, 5.0, 10.0), "burstiness": (1.0, 2.0, 4.0)}
QUICK_SECONDS = 600.0


@dataclass(frozen=True)
class SweepPlan:
    """The slices of one sweep: the base point and, per slice, its two axes' values."""

    base: SweepPoint
    slices: tuple[tuple[tuple[str, tuple], tuple[str, tuple]], ...]

    @property
    def points(self) -> int:
        """Points in all slices."""
        return sum(len(x[1]) * len(y[1]) for x, y in self.slices)


def sweep_plan(which: str, base: SweepPoint | None = None) -> SweepPlan:
    """The `quick` or `full` set of slices through `base` (the stated default)."""
    if which not in SETS:
        raise ValueError(f"sweep set must be one of {sorted(SETS)}, got {which!r}")
    base = base or SweepPoint()
    axes = AXES
    if which == "quick":
        base, axes = replace(base, seconds=min(base.seconds, QUICK_SECONDS)), QUICK_AXES
    return SweepPlan(base, tuple(((x, axes[x]), (y, axes[y])) for x, y in SETS[which]))


def run_point(point: SweepPoint, service: ServiceModel) -> dict:
    """Both policies on one point: device-hours, energy, attainment and the ratios."""
    lengths = load_trace(point.lengths)
    trace = renewal_resample(lengths, point.rate_rps, point.seconds, point.seed,
                             point.burstiness)
    ttft, tbt = default_slo(service.weight_bytes / 2)
    slo = SLO(ttft * point.slo_scale, tbt * point.slo_scale)
    scaling = ScalingConfig(interval_s=point.interval_s, startup_s=point.startup_s)
    rows = {r["policy"]: r for r in compare(service, trace, POLICIES, slo, scaling,
                                            tune=False)["rows"]}
    # a policy no deployment lets meet the SLO here has no numbers (None), and no ratio
    metric = {key: {p: rows[p].get(key) for p in POLICIES}
              for key in ("gpu_hours", "energy_kwh", "slo_attainment")}

    def ratio(key: str) -> float | None:
        model, operator = metric[key]["model"], metric[key]["operator"]
        return None if model is None or operator is None else operator / model

    served = next((r["requests"] for r in rows.values() if "requests" in r), len(trace.requests))
    return {"point": asdict(point), "requests": served,
            "gpu_hours": metric["gpu_hours"], "energy_kwh": metric["energy_kwh"],
            "attainment": metric["slo_attainment"],
            "met": {p: (a or 0.0) >= slo.attainment for p, a in metric["slo_attainment"].items()},
            "infeasible": {p: rows[p]["infeasible"] for p in POLICIES if "infeasible" in rows[p]},
            "gpu_hours_ratio": ratio("gpu_hours"), "energy_ratio": ratio("energy_kwh")}


def run_sweep(plan: SweepPlan, service_for: Callable[[SweepPoint], ServiceModel],
              progress: Callable[[str], None] | None = None) -> dict:
    """Every slice of a plan: per slice its axes and a grid of points (rows: the second
    axis, columns: the first)."""
    slices = []
    for (x, xs), (y, ys) in plan.slices:
        grid = []
        for y_value in ys:
            row = []
            for x_value in xs:
                point = replace(plan.base, **{x: x_value, y: y_value})
                if progress:
                    progress(f"{x}={x_value}, {y}={y_value}")
                row.append(run_point(point, service_for(point)))
            grid.append(row)
        slices.append({"x": x, "x_values": list(xs), "y": y, "y_values": list(ys),
                       "grid": grid})
    return {"base": asdict(plan.base), "policies": list(POLICIES), "slices": slices}
