"""The report page: one self-contained HTML document (inline CSS, JS and SVG, nothing fetched)
drawing the grouped graph as ranked rows of blocks, each holding its details."""
from __future__ import annotations

import json
from html import escape
from importlib import resources
from typing import Any

from fxscale.contracts.group_graph import Group, GroupGraph
from fxscale.reporting.details import Facts, group_info, kind_info
from fxscale.reporting.layout import Block, Layout
from fxscale.reporting.run import Run
from fxscale.reporting.sections import notes_section, plan_section, run_section
from fxscale.reporting.svg import OTHER_COLOURS, RESOURCE_COLOURS, si

_LEGEND = {"compute": "compute-bound", "memory": "memory-bound",
           "stateful": "stateful (attention over the KV cache)"}
# the layer the page's script draws edges into, with the arrow head they end in
_EDGE_LAYER = ('<svg id="edges" xmlns="http://www.w3.org/2000/svg"><defs><marker id="arrow" '
               'viewBox="0 0 10 10" refX="10" refY="5" markerUnits="userSpaceOnUse" '
               'markerWidth="9" markerHeight="9" orient="auto"><path d="M0,0 L10,5 L0,10 z" '
               'fill="#8a8a8a"/></marker></defs></svg>')
_PANEL = ('<aside id="panel"><div id="panel-body"><p class="sub">Click a group (or a folded '
          "block) for its costs, boundary bytes, why it was split, its plan placement, profile "
          "and replicas.</p></div></aside>")


def page(graph: GroupGraph, lay: Layout, facts: Facts, plan: Any, runs: list[Run],
         shape: str) -> str:
    """The whole HTML document."""
    blocks = {b.id: b for b in lay.blocks}
    edge_data = [[e.src, e.dst, e.edges, e.back, blocks[e.dst].rank - blocks[e.src].rank,
                  f"{blocks[e.src].name} -> {blocks[e.dst].name} ({e.edges} group edges)"]
                 for e in lay.edges]
    # "</" inside a script element would end it early
    edge_json = json.dumps(edge_data).replace("</", "<\\/")
    rows = "".join(f'<div class="rank" data-rank="{i}">'
                   + "".join(_block(facts, b) for b in row) + "</div>"
                   for i, row in enumerate(lay.rows))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>fxscale report: {escape(graph.model)}</title><style>{_asset('css')}"
            f"{_colour_rules()}</style></head><body>{_header(graph, lay, facts, shape)}"
            f'<main><div id="graph">{_EDGE_LAYER}{rows}</div>{_PANEL}</main>'
            + (plan_section(graph, plan) if plan is not None else "")
            + "".join(run_section(run) for run in runs) + notes_section(graph)
            + f'<script type="application/json" id="edge-data">{edge_json}</script>'
              f"<script>{_asset('js')}</script></body></html>\n")


def _asset(kind: str) -> str:
    """The page's stylesheet or script, shipped beside this module."""
    return resources.files("fxscale.reporting").joinpath(f"page.{kind}").read_text()


def _colour_rules() -> str:
    """CSS custom properties per resource class, from the colours DOT output uses too."""
    rules = [f".res-{name}{{--fill:{fill};--line:{line}}}"
             for name, (fill, line) in RESOURCE_COLOURS.items()]
    return "".join(rules) + f".res-other{{--fill:{OTHER_COLOURS[0]};--line:{OTHER_COLOURS[1]}}}"


def _resource_class(group: Group) -> str:
    """The CSS class colouring a group by its resource."""
    return f"res-{group.resource if group.resource in RESOURCE_COLOURS else 'other'}"


def _header(graph: GroupGraph, lay: Layout, facts: Facts, shape: str) -> str:
    """Title, summary line, colour legend and the expand/collapse buttons."""
    folded = sum(1 for b in lay.blocks if b.folded)
    flops = sum(c["flops"] for c in facts.costs.values())
    params = sum(g.param_bytes for g in graph.groups)
    legend = "".join(f'<span class="res-{k}"><i></i>{escape(v)}</span>' for k, v in _LEGEND.items())
    return (f"<header><h1>{escape(graph.model)}</h1><p>{len(graph.groups)} operator groups "
            f"(granularity {escape(graph.granularity)}) in {len(lay.blocks)} blocks, "
            f"{folded} of them repeated layers folded into one expandable block; "
            f"{len(graph.edges)} boundary edges. Costs at {escape(shape)}: "
            f"{si(flops, 'FLOP')} in all, {si(params, 'B')} of parameters.</p>"
            f'<p class="legend">{legend}<button type="button" id="expand-all">expand all'
            '</button> <button type="button" id="collapse-all">collapse all</button></p>'
            "</header>")


def _stats(facts: Facts, group: Group) -> str:
    """The one-line cost summary drawn on a block."""
    c = facts.costs[group.id]
    return (f"{si(c['flops'], 'FLOP')} &middot; {si(c['bytes_read'] + c['bytes_written'], 'B')}"
            f" moved &middot; params {si(group.param_bytes, 'B')}")


def _block(facts: Facts, block: Block) -> str:
    """One block: a group, or a folded kind holding one cell per member group."""
    first = facts.groups[block.group_ids[0]]
    badge = facts.badge(first.id)
    badge_html = f'<div class="badge">{badge}</div>' if badge else ""
    if not block.folded:
        return (f'<div class="block {_resource_class(first)}" data-block="{block.id}" '
                f'data-group-id="{first.id}" tabindex="0"><div class="name">'
                f'{escape(first.name)}</div><div class="stats">{_stats(facts, first)}</div>'
                f"{badge_html}<template>{group_info(facts, first)}</template></div>")
    members = "".join(_member(facts, facts.groups[gid]) for gid in block.group_ids)
    count = len(block.group_ids)
    return (f'<div class="block kind {_resource_class(first)}" data-block="{block.id}" '
            f'data-kind="{escape(block.name)}" data-count="{count}" tabindex="0">'
            f'<div class="name">{escape(block.name)} <span class="count">&times;{count}</span>'
            f'</div><div class="stats">each {_stats(facts, first)}</div>{badge_html}'
            f'<button type="button" class="toggle" aria-expanded="false">expand {count} '
            f"layers</button><template>{kind_info(facts, block)}</template>"
            f'<div class="members">{members}</div></div>')


def _member(facts: Facts, group: Group) -> str:
    """A folded group's cell, labelled with its layer index."""
    label = group.layer.rsplit(".", 1)[-1] if group.layer else group.id
    return (f'<div class="member {_resource_class(group)}" data-group-id="{group.id}" '
            f'title="{escape(group.name)}" tabindex="0">{escape(label)}'
            f"<template>{group_info(facts, group, in_kind=True)}</template></div>")
