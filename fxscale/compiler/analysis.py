"""Summarise a grouped Dynamo graph as a GroupGraph: group costs, edges, names and the reason
each group starts (the passes run in the order of compiler/pipeline.py)."""
from __future__ import annotations

from collections import Counter

import sympy
import torch
import torch.fx as fx

from fxscale.contracts.exprs import evaluate, to_text
from fxscale.contracts.group_graph import Experts, Group, GroupEdge, GroupGraph
from fxscale.passes import classify as C
from fxscale.passes.costs import NodeCost
from fxscale.passes.grouping import ANCHOR_CLASSES, sensitivity
from fxscale.passes.node_facts import (
    input_nodes,
    is_weight_placeholder,
    nbytes_expr,
    node_value,
    op_name,
)
from fxscale.passes.symbols import SymbolTable

ZERO = sympy.Integer(0)
# Memory-bound classes a GPU compiler fuses into one kernel per chain (Inductor does): their
# bytes are the tensors crossing the class's nodes, not each op's reads and writes.
FUSED_CLASSES = frozenset({C.NORM, C.POINTWISE, C.REDUCTION, C.SOFTMAX, C.DATA_MOVEMENT,
                           C.ROTARY, C.ACTIVATION})  # a residual add is a kernel of its own
# state the engine attaches to attention modules: KV blocks, not weights
KV_CACHE_BUFFERS = ("_buffers_fxscale_k_cache_", "_buffers_fxscale_v_cache_")


def group_reasons(order, assignment, grouping) -> dict[int, str]:
    """Why each (renumbered) group starts: the grouping's reason, or a convexity repair."""
    reasons: dict[int, str] = {}
    seen: set[int] = set()
    for node in order:
        group = assignment[node]
        if group in seen:
            continue
        seen.add(group)
        original = grouping.assignment[node]
        first_of_original = next(n for n in order if grouping.assignment[n] == original)
        reasons[group] = (grouping.reasons.get(original, "") if first_of_original is node
                          else "split to keep the group graph acyclic (convexity repair)")
    return reasons


def build_group_graph(gm: fx.GraphModule, costs: dict[fx.Node, NodeCost], symbols: SymbolTable,
                      assignment: dict[fx.Node, int], reasons: dict[int, str], granularity: str,
                      model: str) -> GroupGraph:
    """Summarise per-node costs into groups and the edges between them."""
    weight_bytes = {n.name: int(nbytes_expr(node_value(n)))
                    for n in gm.graph.nodes if is_weight_placeholder(n)
                    and isinstance(node_value(n), torch.Tensor) and not _symbolic(node_value(n))}
    members: dict[int, list[fx.Node]] = {}
    for node, group in assignment.items():
        members.setdefault(group, []).append(node)
    env = symbols.env()
    edge_bytes: dict[tuple[int, int], sympy.Expr] = {}
    leaving: dict[int, sympy.Expr] = {}
    for node, group in assignment.items():
        targets = {assignment.get(u, -1) for u in node.users} - {group}
        cost = costs[node]
        size = cost.out_bytes if cost.is_tensor and not cost.weight_like \
            else ZERO
        for target in targets:
            if target >= 0:
                edge_bytes[(group, target)] = edge_bytes.get((group, target), ZERO) + size
        if targets:
            leaving[group] = leaving.get(group, ZERO) + size
    groups = [_group(gid, members[gid], costs, symbols, env, weight_bytes, leaving.get(gid, ZERO),
                     reasons.get(gid, ""), granularity)
              for gid in sorted(members)]
    routed = experts_per_token(gm, costs)
    # weights stacked along a first dimension (one slice per expert): name -> its size
    stacked = {n.name: int(node_value(n).shape[0]) for n in gm.graph.nodes
               if n.name in weight_bytes and node_value(n).dim() >= 3}
    for gid, group in zip(sorted(members), groups):
        group.experts = experts_of(members[gid], costs, weight_bytes, stacked, routed)
    _number_names(groups)
    edges = [GroupEdge(f"g{a}", f"g{b}", to_text(expr)) for (a, b), expr in sorted(edge_bytes.items())]
    table = {name: {"role": role, "source": symbols.sources.get(name, ""),
                    "example": symbols.hints.get(name, 0)}
             for name, role in symbols.roles.items()}
    return GroupGraph(model=model, granularity=granularity, groups=groups, edges=edges,
                      symbols=table)


def experts_per_token(gm: fx.GraphModule, costs: dict[fx.Node, NodeCost]) -> dict[str, int]:
    """Per layer, the experts a mixture-of-experts router sends each token to: the k of its
    top-k over the router's scores."""
    found: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node in costs and costs[node].op_class == C.ROUTING and op_name(node, gm) == "topk":
            k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
            if costs[node].layer:
                found.setdefault(costs[node].layer, set()).add(k)
    # a layer with two top-k of different k (grouped routing) is not told
    return {layer: ks.pop() for layer, ks in found.items()
            if len(ks) == 1 and isinstance(next(iter(ks)), int)}


def experts_of(nodes: list[fx.Node], costs: dict[fx.Node, NodeCost],
               weight_bytes: dict[str, int], stacked: dict[str, int],
               routed: dict[str, int]) -> Experts | None:
    """A group's routed experts: the expert GEMMs' weights (`stacked`: their first dimension
    counts the experts) and the top-k of its layer's router; None for a group without expert
    GEMMs (or whose router is not told)."""
    expert_nodes = [n for n in nodes if costs[n].op_class == C.MOE_EXPERT]
    layer = next((costs[n].layer for n in expert_nodes if costs[n].layer), None)
    if layer not in routed:
        return None
    weights = {p for n in expert_nodes for p in costs[n].params if p in weight_bytes}
    counts = {stacked[p] for p in weights if p in stacked}
    if len(counts) != 1 or routed[layer] > next(iter(counts)):
        return None
    return Experts(counts.pop(), routed[layer], sum(weight_bytes[p] for p in weights))


def _number_names(groups: list[Group]) -> None:
    """Make names unique and stable across captures: '<layer>#<k>/<class>', k-th group of the layer."""
    seen: Counter = Counter()
    for g in groups:
        prefix, _, kind = g.name.partition("/")
        g.name = f"{prefix}#{seen[prefix]}/{kind}" if kind else g.name
        seen[prefix] += 1


def _symbolic(t: torch.Tensor) -> bool:
    """Whether a tensor has symbolic sizes."""
    return any(isinstance(s, torch.SymInt) for s in t.shape)


def _group(gid, nodes, costs, symbols, env, weight_bytes, leaving, reason, granularity) -> Group:
    """Summarise one group's member costs."""
    member_costs = [costs[n] for n in nodes]
    flops = sympy.Add(*(c.flops for c in member_costs))
    read = sympy.Add(*(c.bytes_read for c in member_costs))
    written = sympy.Add(*(c.bytes_written for c in member_costs))
    kv = sympy.Add(*(c.kv_bytes_per_token for c in member_costs))
    params = set().union(*(c.params for c in member_costs))
    # Rank classes: heavy (anchor) classes first, then by FLOPs, then by bytes moved.
    rank: dict[str, list[float]] = {}
    for c in member_costs:
        if c.op_class not in (C.SCALAR, C.DATA_MOVEMENT):
            entry = rank.setdefault(c.op_class, [float(c.op_class in ANCHOR_CLASSES), 0.0, 0.0])
            entry[1] += evaluate_or_zero(c.flops, env)
            entry[2] += evaluate_or_zero(c.bytes_total, env)
    classes = sorted(rank, key=lambda k: rank[k], reverse=True) or [C.DATA_MOVEMENT]
    stateful = any(c.resource == C.STATEFUL for c in member_costs)
    dominant = classes[0]
    resource = C.STATEFUL if stateful else C.resource_of(dominant)
    layers = Counter(c.layer for c in member_costs if c.layer)
    layer = layers.most_common(1)[0][0] if layers else None
    if granularity == "model":
        name = "model"
    else:
        name = f"{layer or 'top'}/{C.ATTENTION if stateful and C.ATTENTION in classes else dominant}"
    b_flops, l_flops = sensitivity(flops, symbols, env)
    b_bytes, l_bytes = sensitivity(read + written, symbols, env)
    weights = [p for p in params if not p.endswith(KV_CACHE_BUFFERS)]  # the engine's KV cache
    return Group(
        id=f"g{gid}", name=name, nodes=[n.name for n in nodes], classes=classes,
        resource=resource, flops=to_text(flops), bytes_read=to_text(read),
        bytes_written=to_text(written), activation_bytes=to_text(leaving),
        param_bytes=sum(weight_bytes.get(p, 0) for p in weights), kv_bytes_per_token=to_text(kv),
        row_wise=not any(c.mixes_tokens for c in member_costs),
        kernels=sorted({str(n.target).split(".")[1] for n in nodes
                        if str(n.target).startswith("fxscale.")}),
        class_costs=class_costs(nodes, costs),
        stateful=stateful, layer=layer, split_reason=reason,
        sensitivity={"flops_batch": b_flops, "flops_length": l_flops,
                     "bytes_batch": b_bytes, "bytes_length": l_bytes},
        graph=0, lowering="not lowered")


def class_costs(nodes: list[fx.Node], costs: dict[fx.Node, NodeCost]) -> dict[str, dict]:
    """A group's FLOPs and bytes per operator class (pointwise split by kernel: rotary,
    activation, residual). GEMMs, attention, gathers and residual adds move what each op reads
    and writes; a fused class (FUSED_CLASSES) moves the tensors entering its nodes from outside
    them once, where a node that is not a view reads them (a chain of views, such as an
    expert weight's transpose that a grouped GEMM reads, launches no kernel), and those its
    nodes hand outside."""
    members: dict[str, set[fx.Node]] = {}
    for node in nodes:  # pointwise chains told apart by the kernel they become
        members.setdefault(costs[node].kernel or costs[node].op_class, set()).add(node)
    out = {}
    for name, part in sorted(members.items()):
        flops = sympy.Add(*(costs[n].flops for n in part))
        if name in FUSED_CLASSES:
            entering = {i for n in part if not costs[n].is_view for i in _read_from(n, part, costs)}
            written = {_writer(n, part, costs) for n in part if any(u not in part for u in n.users)}
            moved = sum((_tensor_bytes(i, costs) for i in entering), ZERO) + sum(
                (costs[n].out_bytes for n in written if n is not None), ZERO)
        else:
            moved = sympy.Add(*(costs[n].bytes_total for n in part))
        if flops != 0 or moved != 0:
            out[name] = {"flops": to_text(flops), "bytes": to_text(moved)}
    return out


def _read_from(node: fx.Node, part: set[fx.Node], costs: dict[fx.Node, NodeCost]
               ) -> set[fx.Node]:
    """The nodes outside `part` whose tensors `node` reads, directly or through views in
    `part`."""
    found: set[fx.Node] = set()
    for i in input_nodes(node):
        if i not in part:
            found.add(i)
        elif costs[i].is_view:
            found |= _read_from(i, part, costs)
    return found


def _writer(node: fx.Node, part: set[fx.Node], costs: dict[fx.Node, NodeCost]) -> fx.Node | None:
    """The node of `part` whose output `node` hands on (itself, or the base of a view; None
    for a view of a tensor from outside, which the fused kernel never writes)."""
    while costs[node].is_view:
        node = next(iter(input_nodes(node)), None)
        if node not in part:
            return None
    return node


def _tensor_bytes(node: fx.Node, costs: dict[fx.Node, NodeCost]) -> sympy.Expr:
    """Bytes of the tensor a node produces (0 for non-tensors)."""
    if node in costs:
        return costs[node].out_bytes if costs[node].is_tensor else ZERO
    value = node_value(node)
    return nbytes_expr(value) if isinstance(value, torch.Tensor) else ZERO


def evaluate_or_zero(expr, env) -> float:
    """Evaluate an expression; 0 when it cannot be evaluated (unknown symbols)."""
    try:
        return evaluate(expr, env)
    except KeyError:
        return 0.0


def describe_groups(graph: GroupGraph) -> dict[str, str]:
    """Short text per group submodule name, for warnings."""
    return {g.submodule: f"{g.name}: {', '.join(g.classes[:3])}"
            for g in graph.groups}
