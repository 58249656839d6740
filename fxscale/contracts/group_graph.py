"""The GroupGraph contract: operator groups of a captured graph, their costs and their DAG.

Costs are expressions over the graph's shape symbols (text in the grammar of exprs.py), evaluated at
any (batch, length) with `GroupGraph.cost`. Serialises to JSON (never pickle); the lowered
callables and the split module are run-time attributes that are not serialised.
"""
from __future__ import annotations

import graphlib
import io
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fxscale.contracts.exprs import ExprError, check_symbols, evaluate
from fxscale.contracts.jsonio import Checker, read_json, write_atomic

# 2: groups carry per-class costs (class_costs); 3: their pointwise part split by kernel
# (rotary, activation, residual); 4: a mixture-of-experts group carries its experts, and a
# chain of views moves no bytes in the class costs
SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # a version-1 graph has no class_costs: lumped costs only
COST_FIELDS = ("flops", "bytes_read", "bytes_written", "activation_bytes", "kv_bytes_per_token")


_LAYER_INDEX = re.compile(r"\.\d+(?=[.#]|$)")


def kind_name(group_name: str) -> str:
    """A group's name with its layer index replaced by '*' (model.layers.3#1/x -> ...*#1/x):
    the groups of one kind repeat across layers, and a server scales them by this pattern."""
    return _LAYER_INDEX.sub(".*", group_name)


def submodule_name(index: int) -> str:
    """The attribute name torch's split_module gives the submodule of group g<index>."""
    return f"submod_{index}"


@dataclass(frozen=True)
class Experts:
    """The routed experts of a mixture-of-experts group: how many, how many each token goes
    to, and the bytes of their weights (all of them; a step reads those its tokens reach)."""

    count: int
    per_token: int
    weight_bytes: int


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
    kernels: list[str] = field(default_factory=list)  # fxscale.kernels ops it calls
    # its costs by operator class (pointwise split by kernel), {class: {"flops": expr,
    # "bytes": expr}}: a device model calibrated per kernel class times each with its fit
    class_costs: dict[str, dict[str, str]] = field(default_factory=dict)
    experts: Experts | None = None  # a mixture-of-experts group's routed experts
    callable: Any = field(default=None, repr=False, compare=False)

    @property
    def submodule(self) -> str:
        """Its submodule's name in the split (lowered) graph module."""
        return submodule_name(int(self.id.rpartition("g")[2]))

    @property
    def batchable(self) -> bool:
        """Whether calls of different requests may share one execution: it works row by row
        and holds no per-request state."""
        return self.row_wise and not self.stateful


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
                          g.lowering + (f" + fxscale.kernels: {', '.join(g.kernels)}"
                                        if g.kernels else ""))
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
            write_atomic(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, data: Any, where: str = "<dict>") -> GroupGraph:
        """Rebuild from `to_dict` output, checking every field; an InputError names the file
        and the field (cost expressions are parsed with the whitelist grammar of exprs.py)."""
        check = Checker(where, "a GroupGraph")
        check.object(data, "")
        version = check.get(data, "version")
        if version not in READABLE_VERSIONS:
            check.fail("version", f"is {version!r}; this fxscale reads versions "
                                  f"{', '.join(map(str, READABLE_VERSIONS))} (re-run fxscale "
                                  "explain to regenerate)")
        check.unknown(data, {f.name for f in fields(cls)} - {"module"})
        symbols = _symbols(check, check.get(data, "symbols", default={}))
        groups = [_group(check, g, f"groups[{i}]", symbols)
                  for i, g in enumerate(check.array(check.get(data, "groups"), "groups",
                                                    nonempty=True))]
        ids = [g.id for g in groups]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            check.fail("groups", f"has duplicate group id(s) {duplicates}")
        edges = [_edge(check, e, f"edges[{i}]", set(ids), symbols)
                 for i, e in enumerate(check.array(check.get(data, "edges"), "edges"))]
        _acyclic(check, ids, edges)
        notes = check.array(check.get(data, "notes", default=[]), "notes")
        for i, note in enumerate(notes):
            check.string(note, f"notes[{i}]")
        return cls(model=check.string(check.get(data, "model"), "model"),
                   granularity=check.string(check.get(data, "granularity"), "granularity"),
                   groups=groups, edges=edges, symbols=symbols, notes=notes, version=version)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> GroupGraph:
        """Load from JSON text or a path to a JSON file, checking every field."""
        return cls.from_dict(*read_json(text_or_path))



SYMBOL_ROLES = ("batch", "length", "context", "other")
_GROUP_FIELDS = {f.name for f in fields(Group)} - {"callable"}


def _symbols(check: Checker, data: Any) -> dict[str, dict[str, Any]]:
    """The shape symbols: {name: {role, source, example}}."""
    check.object(data, "symbols")
    for name, info in data.items():
        at = f"symbols.{name}"
        if not name.isidentifier() or name.startswith("_"):
            check.fail(at, "is not a symbol name (letters, digits, underscores)")
        check.object(info, at)
        check.unknown(info, {"role", "source", "example"}, f"{at}.")
        check.string(check.get(info, "role", f"{at}."), f"{at}.role", SYMBOL_ROLES)
        check.string(check.get(info, "source", f"{at}.", ""), f"{at}.source")
        check.number(check.get(info, "example", f"{at}."), f"{at}.example", 0, integer=True)
    return data


def _cost(check: Checker, text: Any, at: str, symbols: dict[str, dict[str, Any]]) -> str:
    """A cost expression over the graph's symbols that is finite and >= 0 at their example
    values."""
    check.string(text, at)
    try:
        expr = check_symbols(text, symbols)
        value = evaluate(expr, {name: info["example"] for name, info in symbols.items()})
    except ExprError as err:
        check.fail(at, f"is not a cost expression: {err}")
    if value < 0:
        check.fail(at, f"is negative ({value:g}) at the symbols' example values")
    return text


def _group(check: Checker, data: Any, at: str, symbols: dict[str, dict[str, Any]]) -> Group:
    """One group, every field checked."""
    check.object(data, at)
    check.unknown(data, _GROUP_FIELDS, f"{at}.")
    get = lambda name, default=...: check.get(data, name, f"{at}.", default)  # noqa: E731
    for name in ("id", "name", "resource", "split_reason", "lowering"):
        check.string(get(name, "" if name in ("split_reason", "lowering") else ...),
                     f"{at}.{name}")
    for name in ("nodes", "classes"):
        for i, item in enumerate(check.array(get(name), f"{at}.{name}")):
            check.string(item, f"{at}.{name}[{i}]")
    costs = {name: _cost(check, get(name), f"{at}.{name}", symbols) for name in COST_FIELDS}
    layer = get("layer", None)
    if layer is not None:
        check.string(layer, f"{at}.layer")
    sensitivity = check.object(get("sensitivity", {}), f"{at}.sensitivity")
    for key, value in sensitivity.items():
        if value is not None:
            check.number(value, f"{at}.sensitivity.{key}")
    kernels = check.array(get("kernels", []), f"{at}.kernels")
    for i, item in enumerate(kernels):
        check.string(item, f"{at}.kernels[{i}]")
    class_costs = check.object(get("class_costs", {}), f"{at}.class_costs")
    for name, entry in class_costs.items():
        where = f"{at}.class_costs.{name}"
        check.object(entry, where)
        check.unknown(entry, {"flops", "bytes"}, f"{where}.")
        for what in ("flops", "bytes"):
            _cost(check, check.get(entry, what, f"{where}."), f"{where}.{what}", symbols)
    param_bytes = int(check.number(get("param_bytes"), f"{at}.param_bytes", 0, integer=True))
    experts = get("experts", None)
    if experts is not None:
        check.object(experts, f"{at}.experts")
        check.unknown(experts, {"count", "per_token", "weight_bytes"}, f"{at}.experts.")
        count, per_token, weight_bytes = (
            int(check.number(check.get(experts, name, f"{at}.experts."),
                             f"{at}.experts.{name}", low, integer=True))
            for name, low in (("count", 1), ("per_token", 1), ("weight_bytes", 0)))
        if per_token > count:
            check.fail(f"{at}.experts.per_token", f"must be at most the count ({count}), got "
                                                  f"{per_token}")
        if weight_bytes > param_bytes:
            check.fail(f"{at}.experts.weight_bytes", f"must be at most the group's "
                                                     f"param_bytes, got {weight_bytes}")
        experts = Experts(count, per_token, weight_bytes)
    return Group(id=get("id"), name=get("name"), nodes=get("nodes"), classes=get("classes"),
                 resource=get("resource"), **costs,
                 param_bytes=param_bytes,
                 row_wise=check.boolean(get("row_wise"), f"{at}.row_wise"),
                 stateful=check.boolean(get("stateful"), f"{at}.stateful"), layer=layer,
                 split_reason=get("split_reason", ""), sensitivity=sensitivity,
                 lowering=get("lowering", "not lowered"), kernels=kernels,
                 class_costs=class_costs, experts=experts,
                 graph=int(check.number(get("graph", 0), f"{at}.graph", 0, integer=True)))


def _edge(check: Checker, data: Any, at: str, ids: set[str],
          symbols: dict[str, dict[str, Any]]) -> GroupEdge:
    """One edge between two groups of the graph."""
    check.object(data, at)
    check.unknown(data, {"src", "dst", "bytes"}, f"{at}.")
    ends = [check.string(check.get(data, name, f"{at}."), f"{at}.{name}")
            for name in ("src", "dst")]
    for name, end in zip(("src", "dst"), ends):
        if end not in ids:
            check.fail(f"{at}.{name}", f"names no group: {end!r}")
    if ends[0] == ends[1]:
        check.fail(at, f"is a loop from group {ends[0]} to itself")
    return GroupEdge(*ends, _cost(check, check.get(data, "bytes", f"{at}."), f"{at}.bytes",
                                  symbols))


def _acyclic(check: Checker, ids: list[str], edges: list[GroupEdge]) -> None:
    """Groups run in an order: their edges must not form a cycle."""
    sorter = graphlib.TopologicalSorter({i: set() for i in ids})
    for edge in edges:
        sorter.add(edge.dst, edge.src)
    try:
        sorter.prepare()
    except graphlib.CycleError as err:
        check.fail("edges", f"form a cycle: {' -> '.join(err.args[1])}")
