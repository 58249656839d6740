"""The `run` input of the report: timelines of a simulation or serving run, checked field by
field and turned into chart series (the schema is in docs/report.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fxscale.contracts.errors import InputError

Points = list[tuple[float, float]]
# row fields with a fixed meaning; every other numeric field is a count (devices, pool replicas)
_RATE, _ATTAINMENT, _REPLICAS = ("rate", "rate_rps"), "attainment", ("replicas", "group_devices")


@dataclass
class Run:
    """One run's series: request rate, SLO attainment, replicas per group, other counts."""

    label: str
    rate: Points = field(default_factory=list)
    attainment: Points = field(default_factory=list)
    replicas: dict[str, Points] = field(default_factory=dict)
    replica_unit: str = "replicas"
    counts: dict[str, Points] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)


def load_runs(run: Any, where: str = "run") -> list[Run]:
    """Runs from a simulator Result, a run dict, or `fxscale simulate --json` output (one
    policy, or all of them under 'policies'); `where` names the source in errors."""
    if hasattr(run, "timeline") and hasattr(run, "decisions"):  # a runtime.simulator.Result
        run = {"policy": run.policy, "timeline": run.timeline,
               "decisions": [d.to_dict() for d in run.decisions]}
    if not isinstance(run, dict):
        raise InputError(f"{where}: a run must be a JSON object with a 'timeline' list, got "
                         f"{type(run).__name__}")
    if isinstance(run.get("policies"), dict):  # fxscale simulate --policy all
        # a policy no deployment let meet the SLO has no timeline (its row says why)
        return [parse_run(r, f"{where}: field 'policies.{name}'", name)
                for name, r in run["policies"].items()
                if not (isinstance(r, dict) and "infeasible" in r)]
    return [parse_run(run, where, str(run.get("policy", "run")))]


def parse_run(data: Any, where: str, label: str) -> Run:
    """Check one run dict and collect its series; errors name the field."""
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a JSON object, got {type(data).__name__}")
    rows = data.get("timeline")
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{where}: field 'timeline' must be a non-empty list of rows "
                         "{t, rate, attainment, replicas}, got "
                         f"{'nothing' if rows is None else repr(rows)[:60]}")
    decisions = data.get("decisions", [])
    if not isinstance(decisions, list) or not all(isinstance(d, dict) for d in decisions):
        raise InputError(f"{where}: field 'decisions' must be a list of objects")
    run = Run(label, decisions=decisions, summary=_scalars(data))
    for i, row in enumerate(rows):
        _add_row(run, row, f"{where}: field 'timeline[{i}]")
    return run


def _add_row(run: Run, row: Any, at: str) -> None:
    """Append one timeline row's values to the run's series."""
    if not isinstance(row, dict):
        raise InputError(f"{at}' must be an object, got {type(row).__name__}")
    if "t" not in row:
        raise InputError(f"{at}.t' is missing (seconds since the start of the run)")
    t = _number(row["t"], f"{at}.t'")
    for name, value in row.items():
        if name in _RATE:
            run.rate.append((t, _number(value, f"{at}.{name}'")))
        elif name == _ATTAINMENT:
            if value is None:  # no request finished in this window: nothing to plot
                continue
            fraction = _number(value, f"{at}.{name}'")
            if not 0 <= fraction <= 1:
                raise InputError(f"{at}.{name}' must be a fraction in [0, 1], got {fraction}")
            run.attainment.append((t, fraction))
        elif name in _REPLICAS:
            if not isinstance(value, dict):
                raise InputError(f"{at}.{name}' must be an object {{group: count}}")
            run.replica_unit = "replicas" if name == "replicas" else "devices"
            for group, n in value.items():
                run.replicas.setdefault(group, []).append((t, _number(n, f"{at}.{name}.{group}'")))
        elif name != "t" and isinstance(value, (int, float)) and not isinstance(value, bool):
            run.counts.setdefault(name, []).append((t, _number(value, f"{at}.{name}'")))


def _number(value: Any, at: str) -> float:
    """The value as a float, or an InputError naming the field."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not math.isfinite(value):
        raise InputError(f"{at} must be a finite number, got {value!r}")
    return float(value)


def _scalars(data: dict) -> dict[str, Any]:
    """The run's scalar fields (metrics, settings), one level of nested objects flattened."""
    out = {}
    for key, value in data.items():
        nested = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in nested:
            if isinstance(v, (int, float, str, bool)):
                out[f"{key}.{sub}" if sub else key] = v
    return out
