"""Where the operator-vs-model gap comes from: Shapley values over the operator mechanisms.

The gap in device-hours (and energy) between model-level and operator-level autoscaling on
one trace splits into:

- `operator engine`, a fixed first step: model-level's independent replicas become one
  operator engine of co-located replicas, resized in place, using none of the mechanisms
  (they exist only in that engine, so this step cannot be switched in any order; `copies`,
  model-level's own replication of one-replica engines, is a mechanism of its own);
- one part per mechanism (runtime/planner/engines.py `Mechanisms`): its Shapley value, the
  mean over every order of switching the mechanisms on of what switching it on changes.
  `value(S)` is the operator policy using only the mechanisms in S, at its best searched
  setting (the same search as every `fxscale simulate` row); scaling speed includes the
  operator policy's own decision interval, so without it the operator takes model-level's.

Shapley values sum to value(all) - value(none) exactly, so the parts sum to the total; the
residual reported beside them is what floating point leaves. Sources the simulator does not
separate are listed with 0 and the reason, rather than left out.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import fields, replace
from typing import Callable

from fxscale.contracts.plan import SLO
from fxscale.contracts.trace import Trace
from fxscale.runtime.planner.engines import ALL_MECHANISMS, Mechanisms
from fxscale.runtime.planner.service import ServiceModel
from fxscale.runtime.simulator.evaluate import best_setting, serving_trace
from fxscale.runtime.simulator.replay import ScalingConfig

MECHANISMS = tuple(f.name for f in fields(Mechanisms))
SOURCES = {"disaggregation": "attention disaggregation",
           "pooled_prefill": "pooled prefill",
           "fast_start": "scaling speed",
           "copies": "engine copies"}
# Sources of the published argument this simulator does not separate, and why.
NOT_SEPARATED = {
    "granularity": "dense groups scale as one pool here: the only finer unit is the "
                   "attention/dense split, counted under attention disaggregation",
    "forecasting": "every policy plans with the same forecast (--forecast), so it opens no "
                   "gap by construction",
    "packing": "not modelled: no replica is placed into another's spare memory or compute"}
METRICS = ("gpu_hours", "energy_kwh")


def shapley(values: dict[frozenset, float], players: tuple[str, ...]) -> dict[str, float]:
    """Each player's Shapley value of a game given on every coalition of `players`."""
    n = len(players)
    out = {}
    for player in players:
        others = [p for p in players if p != player]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                base = frozenset(coalition)
                total += weight * (values[base | {player}] - values[base])
        out[player] = total
    return out


def attribute(service: ServiceModel, trace: Trace, slo: SLO, scaling: ScalingConfig,
              intervals: dict[str, float] | None = None, tune: bool = True,
              over_context: str = "reject", prefix_caching: bool = False,
              progress: Callable[[str], None] | None = None) -> dict:
    """Decompose operator minus model device-hours and energy on a trace into the operator
    engine step and a Shapley value per mechanism; every run's row is kept."""
    trace, context = serving_trace(service, trace, over_context, prefix_caching)
    intervals = intervals or {}

    def interval(policy: str) -> float:
        return intervals.get(policy, scaling.interval_s)

    def run(policy: str, own: ScalingConfig, mechanisms: Mechanisms | None, label: str) -> dict:
        def tell(what: str) -> None:
            if progress:
                progress(f"{label}: {what}")
        row = best_setting(service, trace, policy, slo, own, tune, tell,
                           mechanisms or ALL_MECHANISMS)
        return {"mechanisms": list(mechanisms.names) if mechanisms else None,
                "interval_s": own.interval_s,
                **{k: row[k] for k in (*METRICS, "slo_attainment", "meets_target", "headroom",
                                       "floor")}}

    model = run("model", replace(scaling, interval_s=interval("model")), None, "model")
    runs: dict[frozenset, dict] = {}
    for size in range(len(MECHANISMS) + 1):
        for on in itertools.combinations(MECHANISMS, size):
            mechanisms = Mechanisms(**{name: name in on for name in MECHANISMS})
            own = replace(scaling, interval_s=interval(
                "operator" if mechanisms.fast_start else "model"))
            runs[frozenset(on)] = run("operator", own, mechanisms,
                                      "operator with " + (", ".join(on) or "no mechanism"))
    none, every = runs[frozenset()], runs[frozenset(MECHANISMS)]
    parts = [{"source": "operator engine", "mechanism": None,
              **{m: none[m] - model[m] for m in METRICS}}]
    values = {m: shapley({k: r[m] for k, r in runs.items()}, MECHANISMS) for m in METRICS}
    parts += [{"source": SOURCES[name], "mechanism": name,
               **{m: values[m][name] for m in METRICS}} for name in MECHANISMS]
    parts += [{"source": name, "mechanism": None, "note": why, **{m: 0.0 for m in METRICS}}
              for name, why in NOT_SEPARATED.items()]
    total = {m: every[m] - model[m] for m in METRICS}
    for part in parts:
        part.update({f"{m}_points": 100 * part[m] / model[m] for m in METRICS})
    return {"model": model, "operator": every,
            "coalitions": [runs[k] for k in sorted(runs, key=lambda k: (len(k), sorted(k)))],
            "parts": parts, "total": total,
            "total_points": {m: 100 * total[m] / model[m] for m in METRICS},
            "residual_points": {m: 100 * (total[m] - sum(p[m] for p in parts)) / model[m]
                                for m in METRICS},
            "all_met": all(r["meets_target"] for r in (model, *runs.values())),
            "context": context}
