"""What the report says about each group and each folded kind: costs at one shape, boundary
bytes, why it was split, its plan placement, profile curves and replicas over time."""
from __future__ import annotations

from html import escape
from typing import Any

from fxscale.contracts.group_graph import Group, GroupGraph, kind_name
from fxscale.contracts.plan import GroupPlacement
from fxscale.reporting.layout import Block
from fxscale.reporting.run import Points, Run
from fxscale.reporting.svg import line_chart, si

# (field of Group, label, unit) in the order the details table shows them
_COSTS = (("flops", "FLOPs", "FLOP"), ("bytes_read", "bytes read", "B"),
          ("bytes_written", "bytes written", "B"), ("activation_bytes", "activations", "B"),
          ("kv_bytes_per_token", "KV cache per token", "B"))
_PLAN_COLUMNS = ("role", "replicas", "shards", "max_batch", "device_fraction", "tbt_budget_s")


class Facts:
    """Everything shown about groups, computed once: costs at (batch, length), boundary
    edges, plan rows, profiles and replica series, by group id."""

    def __init__(self, graph: GroupGraph, plan: Any, profile: Any, runs: list[Run],
                 batch: int | None, length: int | None) -> None:
        self.runs = runs
        self.groups = {g.id: g for g in graph.groups}
        self.costs = {g.id: {name: graph.cost(g, name, batch, length) for name, _, _ in _COSTS}
                      for g in graph.groups}
        self.inputs: dict[str, list[tuple[str, float]]] = {g.id: [] for g in graph.groups}
        self.outputs: dict[str, list[tuple[str, float]]] = {g.id: [] for g in graph.groups}
        for e in graph.edges:
            moved = graph.edge_bytes(e, batch, length)
            self.inputs[e.dst].append((e.src, moved))
            self.outputs[e.src].append((e.dst, moved))
        self.plan_rows: dict[str, list[GroupPlacement]] = {}
        for row in plan.groups if plan is not None else []:
            self.plan_rows.setdefault(row.group, []).append(row)
        by_name = {p.name: p for p in profile.groups} if profile is not None else {}
        by_id = {p.group: p for p in profile.groups} if profile is not None else {}
        self.profiles = {g.id: by_id.get(g.id) or by_name.get(g.name) for g in graph.groups}

    def boundary(self, gid: str) -> tuple[float, float]:
        """(bytes entering, bytes leaving) the group from and to other groups."""
        return sum(b for _, b in self.inputs[gid]), sum(b for _, b in self.outputs[gid])

    def badge(self, gid: str) -> str:
        """The short plan summary drawn on a block: replicas and batch size per role."""
        return "; ".join(f"{scalar(r.role)} {scalar(r.replicas)}&times; batch "
                         f"{scalar(r.max_batch)}" for r in self.plan_rows.get(gid, []))


def replica_series(run: Run, keys: set[str]) -> tuple[Points, int]:
    """The replicas over time of the run's series named by any of `keys` (the largest at each
    time when several match, as for the groups of one kind); also how many matched."""
    matched = [pts for key, pts in run.replicas.items() if key in keys]
    most: dict[float, float] = {}
    for pts in matched:
        for t, n in pts:
            most[t] = max(n, most.get(t, n))
    return sorted(most.items()), len(matched)


def group_info(facts: Facts, g: Group, in_kind: bool = False) -> str:
    """The details of one group (shown in the side panel when it is clicked); a group folded
    `in_kind` leaves series of its whole kind to the kind's details."""
    c = facts.costs[g.id]
    moved = c["bytes_read"] + c["bytes_written"]
    incoming, outgoing = facts.boundary(g.id)
    batching = "stateful (one request per call)" if g.stateful else (
        "row-wise (batches across requests)" if g.row_wise else "whole")
    rows = [(label, si(c[name], unit), getattr(g, name)) for name, label, unit in _COSTS]
    rows += [("parameters", si(g.param_bytes, "B"), ""),
             ("FLOP per byte moved", f"{c['flops'] / moved:.3g}" if moved else "-", ""),
             ("boundary in", si(incoming, "B"), f"{len(facts.inputs[g.id])} edges"),
             ("boundary out", si(outgoing, "B"), f"{len(facts.outputs[g.id])} edges")]
    parts = [f"<h3>{escape(g.name)}</h3><p class='sub'>{g.id} &middot; {escape(g.resource)} "
             f"&middot; {escape(', '.join(g.classes))} &middot; layer {escape(g.layer or '-')} "
             f"&middot; graph {g.graph} &middot; {batching} &middot; lowering "
             f"{escape(g.lowering)}</p>", _table(rows),
             f"<p class='why'><b>Why split here:</b> {escape(g.split_reason)}</p>",
             _edge_list(facts, g.id), _plan_table(facts.plan_rows.get(g.id, [])),
             _profile_charts(facts.profiles[g.id]),
             _replica_charts(facts.runs, {g.id, g.name} if in_kind else
                             {g.id, g.name, kind_name(g.name)})]
    return "".join(parts)


def kind_info(facts: Facts, block: Block) -> str:
    """The details of a folded kind: its members, totals and what they share."""
    groups = [facts.groups[gid] for gid in block.group_ids]
    first = groups[0]
    total = {name: sum(facts.costs[g.id][name] for g in groups) for name, _, _ in _COSTS}
    rows = [(label, si(facts.costs[first.id][name], unit), si(total[name], unit))
            for name, label, unit in _COSTS]
    rows += [("parameters", si(first.param_bytes, "B"),
              si(sum(g.param_bytes for g in groups), "B")),
             ("boundary in / out", " / ".join(si(b, "B") for b in facts.boundary(first.id)), "")]
    layers = [g.layer for g in groups if g.layer is not None]
    span = f" ({escape(layers[0])} &hellip; {escape(layers[-1])})" if layers else ""
    keys = {block.name, *block.group_ids, *(g.name for g in groups)}
    return (f"<h3>{escape(block.name)} &times;{len(groups)}</h3><p class='sub'>"
            f"{len(groups)} groups whose names differ only in the layer index{span}; "
            f"{escape(first.resource)} &middot; {escape(', '.join(first.classes))}. Expand the "
            "block and click a layer for its own details.</p>"
            + _table(rows, ("", f"first ({first.id})", f"all {len(groups)}"))
            + f"<p class='why'><b>Why split here</b> (first member): "
              f"{escape(first.split_reason)}</p>"
            + _plan_table(facts.plan_rows.get(first.id, []), f" (first member, {first.id})")
            + _replica_charts(facts.runs, keys))


def _table(rows: list[tuple[str, str, str]], head: tuple[str, str, str] | None = None) -> str:
    """A small key/value table; the third column is a note (or an expression tooltip)."""
    header = "".join(f"<th>{escape(h)}</th>" for h in head) if head else ""
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td><td class='note' "
                   f"title='{escape(n)}'>{escape(n)}</td></tr>" for k, v, n in rows)
    return f"<table class='kv'>{f'<tr>{header}</tr>' if header else ''}{body}</table>"


def _edge_list(facts: Facts, gid: str) -> str:
    """The group's boundary edges with the bytes each carries, folded away by default."""
    items = [f"<li>from {src} {escape(facts.groups[src].name)}: {si(b, 'B')}</li>"
             for src, b in facts.inputs[gid]]
    items += [f"<li>to {dst} {escape(facts.groups[dst].name)}: {si(b, 'B')}</li>"
              for dst, b in facts.outputs[gid]]
    return (f"<details><summary>{len(items)} boundary edges</summary><ul class='edges'>"
            f"{''.join(items)}</ul></details>") if items else ""


def _plan_table(rows: list[GroupPlacement], note: str = "") -> str:
    """The group's placement in the plan: one row per engine role."""
    if not rows:
        return ""
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in _PLAN_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{scalar(getattr(r, c))}</td>" for c in _PLAN_COLUMNS)
                   + "</tr>" for r in rows)
    return f"<h4>Plan{escape(note)}</h4><table class='grid'><tr>{head}</tr>{body}</table>"


def scalar(value: Any) -> str:
    """A value for a table cell: floats to four significant digits, escaped text otherwise."""
    return f"{value:.4g}" if isinstance(value, float) else escape(str(value))


def _profile_charts(profile: Any) -> str:
    """Latency vs batch (a line per phase and length) and vs length (per phase and batch)."""
    if profile is None or not profile.points:
        return ""
    by_batch: dict[str, Points] = {}
    by_length: dict[str, Points] = {}
    for p in profile.points:
        by_batch.setdefault(f"{p.phase} L={p.length}", []).append((p.batch, p.median_s * 1e3))
        by_length.setdefault(f"{p.phase} B={p.batch}", []).append((p.length, p.median_s * 1e3))
    return ("<h4>Profile (median latency)</h4><div class='charts'>"
            + line_chart(by_batch, "latency vs batch", "batch", "ms", log_x=True)
            + line_chart(by_length, "latency vs length", "length (tokens)", "ms", log_x=True)
            + "</div>")


def _replica_charts(runs: list[Run], keys: set[str]) -> str:
    """Replicas of the group (or kind) over time, one line per run that has them."""
    series, unit = {}, "replicas"
    for run in runs:
        pts, matched = replica_series(run, keys)
        if pts:
            series[run.label + (f" (max of {matched})" if matched > 1 else "")] = pts
            unit = run.replica_unit
    if not series:
        return ""
    return (f"<h4>{unit.capitalize()} over time</h4>"
            + line_chart(series, f"{unit} of this group", "time (s)", unit, step=True))
