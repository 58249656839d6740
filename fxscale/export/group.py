"""Export one operator group to ONNX: weights become initializers, symbolic sizes are read
from input shapes, batch and length stay dynamic, and the group's costs go in the metadata."""
from __future__ import annotations

import copy
import json
import warnings
from typing import Any

import onnx
import sympy
import torch
import torch.fx as fx
from torch.export import Dim

from fxscale.contracts.exprs import parse_expr, to_text
from fxscale.contracts.group_graph import COST_FIELDS, Group
from fxscale.export.capture import GroupCapture
from fxscale.passes.node_facts import as_expr, node_value

GROUP_KEY = "fxscale.group"  # node metadata key (and model metadata prefix) naming the group


def group_inputs(capture: GroupCapture, group_id: str) -> list[dict]:
    """One manifest entry per group argument: its name, source, and how it reaches the
    ONNX group: an ONNX `input`, an `initializer` stored in the file (export_group turns it
    into `constant` when the ONNX optimizer folds it away), or read from the `shape` of
    another input."""
    sub = capture.submodule(group_id)
    args = capture.example.args[group_id]
    entries = []
    for node, top, value in zip(_placeholders(sub), capture.group_args(group_id), args):
        source = capture.sources[top.name]
        entry = {"name": node.name, "from": source}
        if "weight" in source:
            entry.update(kind="initializer", initializer=source["weight"])
        elif isinstance(value, torch.Tensor):
            entry.update(kind="input", dtype=dtype_name(value.dtype),
                         shape=shape_names(node_value(node).shape, capture.dims))
        entries.append(entry)
    for entry, node in zip(entries, _placeholders(sub)):
        if "kind" not in entry:  # a symbolic size: read it from a tensor input when one has it
            entry.update(_size_entry(as_expr(node_value(node)), entries, sub))
    return entries


def _size_entry(symbol: Any, entries: list[dict], sub: fx.GraphModule) -> dict:
    """Where a group reads a symbolic size: a dim of one of its tensor inputs, else an
    int64 scalar input of its own."""
    for entry, node in zip(entries, _placeholders(sub)):
        if entry.get("kind") == "input" and isinstance(node_value(node), torch.Tensor):
            for dim, size in enumerate(node_value(node).shape):
                if as_expr(size) == symbol:
                    return {"kind": "shape", "of": entry["name"], "dim": dim}
    return {"kind": "input", "dtype": "int64", "shape": []}


def shape_names(shape: Any, dims: dict[str, str]) -> list[int | str]:
    """A shape with ints where static and dim names (or expressions over them) where symbolic."""
    out: list[int | str] = []
    for size in shape:
        expr = as_expr(size)
        out.append(int(expr) if expr.is_Integer else rename_symbols(expr, dims))
    return out


def rename_symbols(expr: str | sympy.Expr, dims: dict[str, str]) -> str:
    """An expression over shape symbols (text or sympy) rewritten over dim names (s33 -> batch)."""
    parsed = parse_expr(expr) if isinstance(expr, str) else expr
    return to_text(parsed.xreplace({s: sympy.Symbol(dims.get(s.name, s.name))
                                    for s in parsed.free_symbols}))


def export_group(capture: GroupCapture, group: Group, entries: list[dict], opset: int
                 ) -> onnx.ModelProto:
    """The ONNX model of one group, with its metadata; updates `entries` to the ONNX input
    names and marks the weights the ONNX optimizer folded."""
    sub = capture.submodule(group.id)
    args = capture.example.args[group.id]
    module, example = exportable(sub, entries, args)
    # ONNX names follow the FX names; renaming the outputs could clash with inner values
    with warnings.catch_warnings():  # a Dim shared by several inputs is the intent, not a problem
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(
            module, tuple(example), dynamic_shapes=_dynamic_shapes(sub, entries, capture.dims),
            opset_version=opset, verbose=False)
    model = program.model_proto
    fed = [e for e in entries if e["kind"] == "input"]
    if len(fed) != len(model.graph.input):
        raise ValueError(f"the ONNX model has inputs {[i.name for i in model.graph.input]}, "
                         f"the group {[e['name'] for e in fed]}")
    renamed = {e["name"]: i.name for e, i in zip(fed, model.graph.input)}
    for entry in entries:  # the exporter renames an input it also returns (x -> x_orig)
        for key in ("name", "of"):
            if entry.get(key) in renamed:
                entry[key] = renamed[entry[key]]
    stored = {t.name for t in model.graph.initializer}
    for entry in entries:
        if entry["kind"] == "initializer" and entry["initializer"] not in stored:
            # the ONNX optimizer folded it into other constants (an all-zero bias vanishes)
            entry.update(kind="constant", initializer=None)
    annotate(model, group, capture.dims)
    return model


def exportable(sub: fx.GraphModule, entries: list[dict], args: list[Any]
               ) -> tuple[fx.GraphModule, list[Any]]:
    """A copy of a group's submodule whose arguments are only its ONNX inputs: weights are
    buffers (ONNX initializers named like the model's parameters), sizes come from shapes."""
    graph = copy.deepcopy(sub.graph)
    module = fx.GraphModule(sub, graph)
    placeholders = _placeholders(module)
    by_name = {p.name: p for p in placeholders}
    first = next(n for n in graph.nodes if n.op != "placeholder")
    example = []
    for node, entry, value in zip(placeholders, entries, args):
        with graph.inserting_before(first):
            if entry["kind"] == "initializer":
                _set_buffer(module, entry["initializer"], value.detach())
                node.replace_all_uses_with(graph.get_attr(entry["initializer"]))
                graph.erase_node(node)
            elif entry["kind"] == "shape":
                size = graph.call_function(torch.ops.aten.sym_size.int,
                                           (by_name[entry["of"]], entry["dim"]))
                node.replace_all_uses_with(size)
                graph.erase_node(node)
            elif isinstance(value, torch.Tensor):
                # ONNX has no strides: a contiguous example keeps stride checks out of the graph
                example.append(value.detach().contiguous())
            else:
                node.type = None
                size = graph.call_function(_scalar_to_size, (node,))
                node.replace_all_uses_with(size, delete_user_cb=lambda user: user is not size)
                example.append(torch.tensor(int(value), dtype=torch.int64))
    module.recompile()
    return module.eval(), example


def _scalar_to_size(scalar: torch.Tensor) -> int:
    """A size passed as an int64 scalar tensor, as a (data-dependent) size for export."""
    size = scalar.item()
    torch._check(size >= 0)
    return size


def _set_buffer(module: torch.nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    """Register a buffer under a dotted name, creating the submodules on the way."""
    *path, leaf = dotted.split(".")
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    module.register_buffer(leaf, tensor)


def _dynamic_shapes(sub: fx.GraphModule, entries: list[dict], dims: dict[str, str]) -> tuple:
    """torch.export dynamic shapes of the ONNX inputs: one named Dim per shape symbol (so
    equal sizes stay equal), AUTO for derived sizes (batch*length), static otherwise."""
    named: dict[str, Dim] = {}
    shapes = []
    for node, entry in zip(_placeholders(sub), entries):
        if entry["kind"] != "input":
            continue
        value = node_value(node)
        if not isinstance(value, torch.Tensor):
            shapes.append(None)
            continue
        spec = {}
        for dim, size in enumerate(value.shape):
            expr = as_expr(size)
            if expr.is_Symbol:
                spec[dim] = named.setdefault(expr.name, Dim(dims.get(expr.name, expr.name)))
            else:
                spec[dim] = Dim.STATIC if expr.is_Integer else Dim.AUTO
        shapes.append(spec)
    return tuple(shapes)


def annotate(model: onnx.ModelProto, group: Group, dims: dict[str, str]) -> None:
    """Group metadata on the model (id, name, classes, resource, costs over dim names) and
    the group id on every node, for Netron."""
    props = {"id": group.id, "name": group.name, "classes": json.dumps(group.classes),
             "resource": group.resource, "param_bytes": str(group.param_bytes),
             **{field: rename_symbols(getattr(group, field), dims) for field in COST_FIELDS}}
    for key, value in props.items():
        model.metadata_props.add(key=f"{GROUP_KEY}.{key}", value=value)
    model.graph.name = f"{group.id} {group.name}"
    model.graph.doc_string = f"fxscale operator group {group.id}: {group.name}"
    for node in model.graph.node:
        node.metadata_props.add(key=GROUP_KEY, value=group.id)
        node.doc_string = f"{GROUP_KEY}={group.id}"


def output_nodes(module: fx.GraphModule) -> list[fx.Node]:
    """The nodes a group's submodule returns, in order (one, or a tuple of them)."""
    out = next(n for n in module.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _placeholders(module: fx.GraphModule) -> list[fx.Node]:
    """A module's placeholders, in order."""
    return [n for n in module.graph.nodes if n.op == "placeholder"]


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as a short name (float32, int64, bool)."""
    return str(dtype).removeprefix("torch.")
