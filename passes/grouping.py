"""Heterogeneity-aware grouping: cut the graph's operator sequence into operator groups.

Every group is an interval of the graph's topological (program) order, which makes every
group convex and the quotient graph acyclic by construction (ensure_convex still checks).
Cuts are placed
- at repeated-block (layer) boundaries, for granularity "layer" and "operator";
- for "operator", between two heavy operators whose resource class (compute, memory,
  stateful) or sensitivity to batch/length differ, at the position between them where the
  fewest bytes cross the cut. Ties send light operators (norms, residuals, rotary) to the
  row-wise side, keeping stateful groups (which cannot batch across requests) minimal.
Each cut records why it was made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.fx as fx

from fxscale.contracts.exprs import evaluate
from fxscale.passes import classify as C
from fxscale.passes.costs import NodeCost
from fxscale.passes.node_facts import COMPUTE_OPS, node_value
from fxscale.passes.symbols import BATCH, LENGTH, SymbolTable

ANCHOR_CLASSES = frozenset({C.GEMM, C.CONV, C.ATTENTION, C.KV_CACHE, C.EMBEDDING, C.ROUTING,
                            C.MOE_EXPERT})


@dataclass
class Grouping:
    """Which group every compute node is in, and why each group starts where it does."""

    assignment: dict[fx.Node, int]
    reasons: dict[int, str] = field(default_factory=dict)


def group_nodes(gm: fx.GraphModule, costs: dict[fx.Node, NodeCost], symbols: SymbolTable,
                granularity: str) -> Grouping:
    """Assign every compute node of `gm` to an operator group at the given granularity."""
    order = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    if not order:
        return Grouping({})
    env = symbols.env()
    live, valid = _live_bytes(order, costs, env)
    cuts: dict[int, str] = {}
    if granularity == "node":
        cuts = {p: "one operator per group" for p in range(len(order) - 1)
                if _starts_node_group(order[p + 1], costs)}
    elif granularity in ("layer", "operator"):
        regions, cuts = _layer_cuts(order, costs)
        if granularity == "operator":
            for start, end in regions:
                cuts.update(_operator_cuts(order, costs, symbols, env, live, start, end))
    cuts = {_valid_cut(p, valid): why for p, why in sorted(cuts.items())}
    cuts.pop(len(order) - 1, None)
    assignment, reasons = {}, {0: "start of graph"}
    group = 0
    for i, node in enumerate(order):
        assignment[node] = group
        if i in cuts:
            group += 1
            reasons[group] = cuts[i]
    return Grouping(assignment, reasons)


def _starts_node_group(node: fx.Node, costs: dict[fx.Node, NodeCost]) -> bool:
    """For granularity "node": scalars and tuple items stay with the op before them."""
    cost = costs[node]
    return cost.is_tensor and cost.op != "getitem"


def _live_bytes(order, costs, env) -> tuple[list[float], list[bool]]:
    """Bytes of tensors crossing a cut after each position, and whether a cut there is valid.

    A cut is invalid where a tuple/list value would cross it (split_module passes only
    tensors and symbolic sizes between groups cleanly). Weights and their views do not
    count: each group reads its own parameters.
    """
    pos = {n: i for i, n in enumerate(order)}
    n_pos = len(order)
    crossing = [0.0] * (n_pos + 1)
    tuples = [0] * (n_pos + 1)
    for node in order:
        last = max((pos.get(u, n_pos) for u in node.users), default=pos[node])
        if last <= pos[node]:
            continue
        cost = costs[node]
        value = node_value(node)
        if cost.is_tensor and not cost.weight_like:
            size = evaluate(cost.out_bytes, env)
            crossing[pos[node]] += size
            crossing[last] -= size
        elif isinstance(value, (tuple, list)):
            tuples[pos[node]] += 1
            tuples[last] -= 1
    live, valid, total, open_tuples = [], [], 0.0, 0
    for p in range(n_pos):
        total += crossing[p]
        open_tuples += tuples[p]
        live.append(max(total, 0.0))
        valid.append(open_tuples == 0)
    return live, valid


def _valid_cut(p: int, valid: list[bool]) -> int:
    """The nearest position at or after p (else before) where a cut is valid."""
    for q in list(range(p, len(valid))) + list(range(p - 1, -1, -1)):
        if valid[q]:
            return q
    return p


def _layer_cuts(order, costs) -> tuple[list[tuple[int, int]], dict[int, str]]:
    """Regions (prologue, each repeated block, gaps, epilogue) and the cuts between them."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, node in enumerate(order):
        layer = costs[node].layer
        if layer is not None:
            first.setdefault(layer, i)
            last[layer] = i
    layers = sorted(first, key=first.get)
    starts: dict[int, str] = {}
    for idx, layer in enumerate(layers):
        starts.setdefault(first[layer], f"layer boundary: enters {layer}")
        following = first[layers[idx + 1]] if idx + 1 < len(layers) else len(order)
        if last[layer] + 1 < following:
            starts.setdefault(last[layer] + 1, f"layer boundary: leaves {layer}")
    starts.pop(0, None)
    bounds = [0] + sorted(starts) + [len(order)]
    regions = [(a, b - 1) for a, b in zip(bounds, bounds[1:]) if b > a]
    return regions, {s - 1: why for s, why in starts.items()}


def _operator_cuts(order, costs, symbols, env, live, start, end) -> dict[int, str]:
    """Cuts inside one region between heavy operators of different resource class/sensitivity."""
    anchors = [i for i in range(start, end + 1) if _is_anchor(costs[order[i]])]
    cuts: dict[int, str] = {}
    for a, b in zip(anchors, anchors[1:]):
        left, right = _label(costs[order[a]], symbols, env), _label(costs[order[b]], symbols, env)
        if left == right:
            continue
        candidates = range(a, b)
        best = min(live[p] for p in candidates)
        ties = [p for p in candidates if math.isclose(live[p], best, rel_tol=1e-9, abs_tol=0.5)]
        # Light ops go to the row-wise side of a stateful boundary; otherwise to the consumer.
        p = ties[-1] if right[0] == C.STATEFUL else ties[0]
        cuts[p] = (f"{_describe(left)} -> {_describe(right)} ({_difference(left, right)}); "
                   f"cut after {order[p].name}: {best:.0f} B cross at the example shape "
                   f"(best of {len(candidates)} positions)")
    return cuts


def _is_anchor(cost: NodeCost) -> bool:
    """Heavy operators that decide a group's character; light ones join a neighbour.

    Lookups whose indices do not come from the user's inputs (position embeddings, relative
    position buckets) are light: they are shape-driven helpers of their consumers.
    """
    if cost.op_class == C.EMBEDDING:
        return cost.reads_input
    return cost.op_class in ANCHOR_CLASSES


def _label(cost: NodeCost, symbols: SymbolTable, env) -> tuple:
    """(resource class, family, batch exponent, length exponent) of an anchor."""
    family = {C.CONV: C.GEMM, C.KV_CACHE: C.ATTENTION}.get(cost.op_class, cost.op_class)
    if cost.resource != C.COMPUTE:
        # Memory-bound and stateful operators are told apart by family alone; growth rates
        # matter for where compute saturates.
        return (cost.resource, family, None, None)
    measure = cost.flops if evaluate(cost.flops, env) else cost.bytes_total
    return (cost.resource, family, *sensitivity(measure, symbols, env))


def sensitivity(expr, symbols: SymbolTable, env) -> tuple[float | None, float | None]:
    """Growth exponents of a cost in batch and in length (log2 of the cost ratio on doubling)."""
    base = evaluate(expr, env)
    result = []
    for role in (BATCH, LENGTH):
        name = symbols.symbol_of(role)
        if name is None or base <= 0:
            result.append(None)
            continue
        doubled = evaluate(expr, {**env, name: 2 * env[name]})
        result.append(round(math.log2(doubled / base), 1) if doubled > 0 else None)
    return tuple(result)


def _describe(label: tuple) -> str:
    """Short text for a label."""
    return f"{label[1]}[{label[0]}]"


def _difference(left: tuple, right: tuple) -> str:
    """Say which part of two labels differs."""
    if left[0] != right[0]:
        return f"resource {left[0]} vs {right[0]}"
    if left[1] != right[1]:
        return f"operator family {left[1]} vs {right[1]}"
    return f"sensitivity (batch, length) {left[2:]} vs {right[2:]}"

