"""Layered layout of a GroupGraph for the report: repeated layers folded into blocks, blocks
ranked into rows (longest path over forward edges), rows ordered to cut crossings."""
from __future__ import annotations

from dataclasses import dataclass, field

from fxscale.contracts.group_graph import GroupGraph, kind_name


@dataclass
class Block:
    """One box of the drawing: a single group, or the groups of one kind (repeated layers)."""

    id: str
    name: str
    group_ids: list[str]
    rank: int = 0
    order: int = 0  # position of its first group in the graph's program order

    @property
    def folded(self) -> bool:
        """Whether the block stands for several groups (drawn collapsed, expandable)."""
        return len(self.group_ids) > 1


@dataclass
class BlockEdge:
    """Tensors flowing between two blocks; `back` when it runs against the ranking (the
    edge from one layer's last kind to the next layer's first)."""

    src: str
    dst: str
    edges: int
    back: bool


@dataclass
class Layout:
    """Blocks, the rows they are drawn in (top to bottom) and the edges between them."""

    blocks: list[Block]
    rows: list[list[Block]]
    edges: list[BlockEdge]
    block_of: dict[str, str] = field(default_factory=dict)  # group id -> block id


def fold(graph: GroupGraph) -> list[Block]:
    """One block per kind: groups of one captured graph whose names differ only in the layer
    index (contracts.group_graph.kind_name), in the order their first group appears."""
    kinds: dict[tuple[int, str], list[str]] = {}
    for g in graph.groups:
        kinds.setdefault((g.graph, kind_name(g.name)), []).append(g.id)
    position = {g.id: i for i, g in enumerate(graph.groups)}
    return [Block(f"b{i}", name, ids, order=position[ids[0]])
            for i, ((_, name), ids) in enumerate(kinds.items())]


def layout(graph: GroupGraph) -> Layout:
    """Fold the groups into blocks, rank the blocks and order each row."""
    blocks = fold(graph)
    by_id = {b.id: b for b in blocks}
    block_of = {gid: b.id for b in blocks for gid in b.group_ids}
    counts: dict[tuple[str, str], int] = {}
    for e in graph.edges:
        pair = (block_of[e.src], block_of[e.dst])
        if pair[0] != pair[1]:  # an edge inside a kind (a residual into the next layer's copy)
            counts[pair] = counts.get(pair, 0) + 1
    edges = [BlockEdge(s, d, n, by_id[d].order < by_id[s].order) for (s, d), n in counts.items()]
    preds: dict[str, list[str]] = {b.id: [] for b in blocks}
    for e in edges:
        if not e.back:
            preds[e.dst].append(e.src)
    for b in blocks:  # in program order, so every forward predecessor is ranked first
        b.rank = max((by_id[p].rank + 1 for p in preds[b.id]), default=0)
    rows: list[list[Block]] = [[] for _ in range(max(b.rank for b in blocks) + 1)]
    for b in blocks:
        rows[b.rank].append(b)
    _order_rows(rows, preds)
    return Layout(blocks, rows, edges, block_of)


def _order_rows(rows: list[list[Block]], preds: dict[str, list[str]]) -> None:
    """One barycentre sweep: sort each row by the mean position of its blocks' predecessors
    (program order breaks ties), which removes most crossings of a layered DAG."""
    position: dict[str, float] = {}
    for row in rows:
        def key(b: Block) -> tuple[float, int]:
            placed = [position[p] for p in preds[b.id] if p in position]
            return (sum(placed) / len(placed) if placed else -1.0, b.order)
        row.sort(key=key)
        position.update({b.id: i / max(1, len(row) - 1) for i, b in enumerate(row)})
