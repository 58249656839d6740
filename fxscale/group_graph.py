"""The GroupGraph contract: operator groups of a captured graph, their costs and their DAG.

Costs are expressions over the graph's shape symbols (strings in sympy syntax), evaluated at
any (batch, length) with `GroupGraph.cost`. Serialises to JSON (never pickle); the lowered
callables and the split module are run-time attributes that are not serialised.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import sympy

from .exprs import evaluate, parse_expr
from .jsonio import read_json

SCHEMA_VERSION = 1
COST_FIELDS = ("flops", "bytes_read", "bytes_written", "activation_bytes", "kv_bytes_per_token")


@dataclass
class Group:
    """One operator group: its members, classes, costs and how it may be batched."""

    id: str
    name: str
    nodes: list[str]
    classes: list[str]
    resource: str
    flops: str
    bytes_read: str
    bytes_written: str
    activation_bytes: str
    param_bytes: int
    kv_bytes_per_token: str
    row_wise: bool
    stateful: bool
    layer: str | None
    split_reason: str
    sensitivity: dict[str, float | None] = field(default_factory=dict)
    lowering: str = "not lowered"
    graph: int = 0
    callable: Any = field(default=None, repr=False, compare=False)


@dataclass
class GroupEdge:
    """Tensors flowing from one group to another, with their bytes as an expression."""

    src: str
    dst: str
    bytes: str


@dataclass
class GroupGraph:
    """The operator groups of one model (one entry per Dynamo graph when there are breaks)."""

    model: str
    granularity: str
    groups: list[Group]
    edges: list[GroupEdge]
    symbols: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    version: int = SCHEMA_VERSION
    module: Any = field(default=None, repr=False, compare=False)

    # ---- evaluation -------------------------------------------------------------------
    def env(self, batch: int | None = None, length: int | None = None,
            context: int | None = None, **symbols: int) -> dict[str, int]:
        """Values for every shape symbol: batch, length (new tokens) and context (tokens
        already in the KV cache) where given, example values elsewhere."""
        given = {"batch": batch, "length": length, "context": context}
        values = {name: info["example"] for name, info in self.symbols.items()}
        for name, info in self.symbols.items():
            if given.get(info["role"]) is not None:
                values[name] = given[info["role"]]
        values.update(symbols)
        return values

    def cost(self, group: Group | str, what: str, batch: int | None = None,
             length: int | None = None, context: int | None = None, **symbols: int) -> float:
        """One cost of a group (flops, bytes_read, ...) at the given batch, length, context."""
        g = self.group(group) if isinstance(group, str) else group
        if what not in COST_FIELDS:
            raise ValueError(f"unknown cost {what!r}; choose one of {list(COST_FIELDS)}")
        return evaluate(getattr(g, what), self.env(batch, length, context, **symbols))

    def bytes_moved(self, group: Group | str, batch: int | None = None,
                    length: int | None = None, context: int | None = None) -> float:
        """Bytes a group reads plus bytes it writes."""
        return (self.cost(group, "bytes_read", batch, length, context)
                + self.cost(group, "bytes_written", batch, length, context))

    def edge_bytes(self, edge: GroupEdge, batch: int | None = None, length: int | None = None
                   ) -> float:
        """Bytes an edge carries at the given batch and length."""
        return evaluate(edge.bytes, self.env(batch, length))

    def group(self, group_id: str) -> Group:
        """The group with this id."""
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(f"no group {group_id!r}; groups are {[g.id for g in self.groups]}")

    def boundary_bytes(self, group_id: str, batch: int | None = None, length: int | None = None
                       ) -> tuple[float, float]:
        """(bytes entering, bytes leaving) a group through edges to other groups."""
        incoming = sum(self.edge_bytes(e, batch, length) for e in self.edges if e.dst == group_id)
        outgoing = sum(self.edge_bytes(e, batch, length) for e in self.edges if e.src == group_id)
        return incoming, outgoing

    def total(self, what: str, batch: int | None = None, length: int | None = None) -> float:
        """A cost summed over all groups."""
        return sum(self.cost(g, what, batch, length) for g in self.groups)

    # ---- presentation -----------------------------------------------------------------
    def table(self, batch: int | None = None, length: int | None = None, width: int = 220) -> str:
        """A readable table of the groups with their costs at (batch, length)."""
        from rich.console import Console
        from rich.table import Table

        env = self.env(batch, length)
        shape = ", ".join(f"{info['role']}={env[n]}" for n, info in self.symbols.items()
                          if info["role"] in ("batch", "length")) or "static shapes"
        title = (f"{self.model}: {len(self.groups)} operator groups "
                 f"(granularity {self.granularity}; costs at {shape})")
        table = Table(title=title, title_justify="left")
        for col, justify in (("group", "left"), ("name", "left"), ("classes", "left"),
                             ("resource", "left"), ("MFLOPs", "right"), ("MB moved", "right"),
                             ("FLOP/B", "right"),
                             ("params MB", "right"), ("in MB", "right"), ("out MB", "right"),
                             ("KV B/tok", "right"), ("batching", "left"), ("lowering", "left")):
            table.add_column(col, justify=justify, no_wrap=col in ("group", "name"))
        for g in self.groups:
            incoming, outgoing = self.boundary_bytes(g.id, batch, length)
            moved = self.bytes_moved(g, batch, length)
            kv = self.cost(g, "kv_bytes_per_token", batch, length)
            flops = self.cost(g, "flops", batch, length)
            table.add_row(g.id, g.name, ", ".join(g.classes[:4]), g.resource,
                          f"{flops / 1e6:,.2f}", f"{moved / 1e6:,.3f}",
                          f"{flops / moved:,.1f}" if moved else "", f"{g.param_bytes / 1e6:,.3f}",
                          f"{incoming / 1e6:,.3f}", f"{outgoing / 1e6:,.3f}",
                          f"{kv:,.0f}" if kv else "",
                          "stateful" if g.stateful else ("row-wise" if g.row_wise else "whole"),
                          g.lowering)
        buffer = io.StringIO()
        Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
        return buffer.getvalue()

    def __str__(self) -> str:
        return self.table()

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (run-time callables left out)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "module"}
        data["groups"] = [{k: v for k, v in asdict(g).items() if k != "callable"}
                          for g in self.groups]
        data["edges"] = [asdict(e) for e in self.edges]
        return data

    def to_json(self, path: str | Path | None = None, indent: int | None = 1) -> str:
        """Serialise to JSON text; also write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "<dict>") -> GroupGraph:
        """Rebuild from `to_dict` output, with errors that name the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a GroupGraph must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{where}: field 'version' is {version!r}; this fxscale reads "
                             f"version {SCHEMA_VERSION} (re-run fxscale explain to regenerate)")
        try:
            groups = [Group(**g) for g in data["groups"]]
            edges = [GroupEdge(**e) for e in data["edges"]]
            rest = {k: v for k, v in data.items() if k not in ("groups", "edges")}
            graph = cls(groups=groups, edges=edges, **rest)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: malformed GroupGraph: {err}") from None
        for g in graph.groups:
            for name in COST_FIELDS:
                try:
                    parse_expr(getattr(g, name))
                except (sympy.SympifyError, TypeError):
                    raise ValueError(f"{where}: group {g.id} field {name!r} is not a cost "
                                     f"expression: {getattr(g, name)!r}") from None
        return graph

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> GroupGraph:
        """Load from JSON text or a path to a JSON file, checking every field."""
        return cls.from_dict(*read_json(text_or_path))

