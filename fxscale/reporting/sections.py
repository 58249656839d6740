"""The report's sections below the graph: the plan, each run's timelines, the capture's notes."""
from __future__ import annotations

import json
from html import escape
from typing import Any

from fxscale.contracts.group_graph import GroupGraph, kind_name
from fxscale.contracts.plan import GroupPlacement
from fxscale.reporting.details import replica_series, scalar
from fxscale.reporting.run import Run
from fxscale.reporting.svg import line_chart

_PLAN_FIELDS = ("policy", "model", "device", "rate", "devices", "power_w", "ttft_p50",
                "ttft_p99", "tbt_p50", "tbt_p99", "chunk")
_MAX_DECISIONS = 300  # rows of a run's decision log shown (the rest is counted)


def plan_section(graph: GroupGraph, plan: Any) -> str:
    """The plan's predictions, engines and per-kind placement (replicas, shards, batch)."""
    head = "".join(f"<tr><th>{f.replace('_', ' ')}</th><td>{scalar(getattr(plan, f))}</td></tr>"
                   for f in _PLAN_FIELDS)
    engines = "".join(f"<tr><td>{escape(json.dumps(e.engine.to_dict()))}</td>"
                      f"<td>{scalar(e.count)}</td></tr>" for e in plan.engines)
    names = {g.id: g.name for g in graph.groups}
    kinds: dict[tuple[str, str], tuple[GroupPlacement, int]] = {}
    for row in plan.groups:
        if row.group in names:
            key = (kind_name(names[row.group]), row.role)
            first, count = kinds.get(key, (row, 0))
            kinds[key] = (first, count + 1)
    placement = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(role)}</td><td>{count}</td>"
        + "".join(f"<td>{scalar(getattr(r, c))}</td>" for c in ("replicas", "shards", "max_batch"))
        + "</tr>" for (k, role), (r, count) in kinds.items())
    unmatched = sum(1 for row in plan.groups if row.group not in names)
    note = (f"<p class='sub'>{unmatched} plan rows name groups that are not in this graph "
            "(a plan made for another capture?).</p>") if unmatched else ""
    return (f"<section id='plan'><h2>Plan</h2><table class='grid'>{head}</table>"
            f"<h4>Engines</h4><table class='grid'><tr><th>engine</th><th>count</th></tr>"
            f"{engines}</table><h4>Placement per kind</h4><table class='grid'><tr><th>kind"
            f"</th><th>role</th><th>groups</th><th>replicas</th><th>shards</th><th>max batch"
            f"</th></tr>{placement}</table>{note}</section>")


def run_section(run: Run) -> str:
    """A run's summary, its rate / attainment / replica timelines and its decision log."""
    summary = "".join(f"<tr><th>{escape(k)}</th><td>{scalar(v)}</td></tr>"
                      for k, v in run.summary.items())
    by_kind = {kind_name(k) for k in run.replicas}
    replicas = {}
    for kind in sorted(by_kind):
        pts, matched = replica_series(run, {k for k in run.replicas if kind_name(k) == kind})
        replicas[kind + (f" (max of {matched})" if matched > 1 else "")] = pts
    charts = [line_chart({"rate": run.rate}, "request rate", "time (s)", "req/s")
              if run.rate else "",
              line_chart({"attainment": run.attainment}, "SLO attainment", "time (s)",
                         "fraction") if run.attainment else "",
              line_chart(replicas, f"{run.replica_unit} per group", "time (s)",
                         run.replica_unit, step=True, width=460) if replicas else "",
              line_chart(run.counts, "pools and devices", "time (s)", "count", step=True)
              if run.counts else ""]
    decisions = "".join(f"<tr><td>{scalar(d.get('t'))}</td><td>{escape(str(d.get('action', '')))}"
                        f"</td><td>{escape(str(d.get('reason', '')))}</td></tr>"
                        for d in run.decisions[:_MAX_DECISIONS])
    more = len(run.decisions) - _MAX_DECISIONS
    log = (f"<details><summary>{len(run.decisions)} scaling decisions</summary><table "
           f"class='grid'><tr><th>t (s)</th><th>action</th><th>reason</th></tr>{decisions}"
           f"</table>{f'<p>{more} more not shown</p>' if more > 0 else ''}</details>"
           if run.decisions else "")
    return (f"<section class='run'><h2>Run: {escape(run.label)}</h2>"
            f"<div class='charts'>{''.join(charts)}</div>"
            + (f"<details><summary>summary</summary><table class='grid'>{summary}</table>"
               "</details>" if summary else "") + log + "</section>")


def notes_section(graph: GroupGraph) -> str:
    """The capture's notes (e.g. what a meta-device analysis left out)."""
    if not graph.notes:
        return ""
    items = "".join(f"<li>{escape(n)}</li>" for n in graph.notes)
    return f"<section id='notes'><h2>Notes</h2><ul>{items}</ul></section>"
