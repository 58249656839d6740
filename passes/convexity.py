"""Convexity of a partition of a DAG: check it, and repair a partition that is not convex.

split_module needs parts whose quotient graph is acyclic (no path leaves a part and comes
back). A non-convex request is refined, never passed on.
"""
from __future__ import annotations

from typing import Hashable, Mapping

import networkx as nx
import torch.fx as fx

from fxscale.passes.node_facts import COMPUTE_OPS


def graph_dag(gm: fx.GraphModule) -> nx.DiGraph:
    """The data dependencies between the compute nodes of an FX graph."""
    dag = nx.DiGraph()
    for node in gm.graph.nodes:
        if node.op in COMPUTE_OPS:
            dag.add_node(node)
            dag.add_edges_from((i, node) for i in node.all_input_nodes if i.op in COMPUTE_OPS)
    return dag


def _quotient(dag: nx.DiGraph, part: Mapping) -> nx.DiGraph:
    """The graph of parts, with an edge where any member edge crosses between two parts."""
    q = nx.DiGraph()
    q.add_nodes_from(set(part[n] for n in dag.nodes))
    q.add_edges_from((part[u], part[v]) for u, v in dag.edges if part[u] != part[v])
    return q


def is_convex_partition(dag: nx.DiGraph, part: Mapping) -> bool:
    """Whether the partition's quotient graph is acyclic (every part convex, parts orderable)."""
    return nx.is_directed_acyclic_graph(_quotient(dag, part))


def ensure_convex(dag: nx.DiGraph, part: Mapping) -> tuple[dict, list[str]]:
    """Refine a partition until its quotient graph is acyclic; return it and what was split.

    Parts on a cycle of the quotient graph are split by "crossing depth": along every edge
    the depth grows by one when the edge enters a different part. Within the refined parts
    every edge strictly increases depth, so each round removes the cycles it looks at; a
    round always splits at least one part, so the loop ends (singletons are acyclic).
    """
    part = dict(part)
    notes: list[str] = []
    while True:
        quotient = _quotient(dag, part)
        cyclic = [c for c in nx.strongly_connected_components(quotient) if len(c) > 1]
        if not cyclic:
            return part, notes
        on_cycle = set().union(*cyclic)
        depth: dict = {}
        for node in nx.topological_sort(dag):
            depth[node] = max((depth[p] + (part[p] != part[node]) for p in dag.predecessors(node)),
                              default=0)
        refined = {n: (part[n], depth[n]) if part[n] in on_cycle else (part[n], -1)
                   for n in dag.nodes}
        split = {part[n] for n in dag.nodes if part[n] in on_cycle}
        notes.append(f"split part(s) {sorted(map(str, split))} by crossing depth: they formed "
                     "a cycle with other parts")
        part = _relabel(refined, part)


def _relabel(refined: Mapping, previous: Mapping) -> dict:
    """Fresh hashable labels: the old label for parts that stay whole, (old, k) for pieces."""
    pieces: dict[Hashable, set] = {}
    for key in refined.values():
        pieces.setdefault(key[0], set()).add(key[1])
    out = {}
    for node, (old, d) in refined.items():
        out[node] = old if len(pieces[old]) == 1 else (old, d)
    return out
