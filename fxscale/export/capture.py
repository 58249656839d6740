"""Capture a model's operator groups for ONNX export: the split module, where every group
input comes from, and the real inputs and outputs of every group on a run."""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten_with_path

from fxscale.compiler.capture import _mark_token_dims
from fxscale.compiler.options import Options
from fxscale.compiler.pipeline import analyse_graph
from fxscale.contracts.group_graph import GroupGraph
from fxscale.passes.node_facts import as_expr, node_value
from fxscale.passes.split import split_groups


@dataclass
class GroupRun:
    """What one run of the captured model fed to and got from every group."""

    args: dict[str, list[Any]]        # group id -> its arguments, in placeholder order
    outputs: dict[str, list[Any]]     # group id -> its outputs
    result: dict[str, Any]            # model output name -> value


@dataclass
class GroupCapture:
    """A model split into groups, with the source of every value between them.

    A source is a dict: {"input": name} (a model input), {"weight": name} (a parameter,
    buffer or lifted constant), {"size": {"input": name, "dim": d}} (a symbolic size) or
    {"group": id, "output": k}.
    """

    model: str
    split: fx.GraphModule
    graph: GroupGraph
    sources: dict[str, dict]          # top-level node name -> source
    outputs: dict[str, dict]          # model output name -> source
    dims: dict[str, str]              # shape symbol -> dim name (batch, length, ...)
    example: GroupRun
    notes: list[str]
    kwargs: dict[str, Any]            # keyword arguments of the example call
    module: torch.nn.Module = field(repr=False)
    top_args: list[Any] = field(repr=False)  # the split module's example arguments (weights)

    def group_args(self, group_id: str) -> list[fx.Node]:
        """The top-level nodes a group is called with (aligned with its placeholders)."""
        return list(self.call_node(group_id).args)

    def call_node(self, group_id: str) -> fx.Node:
        """The top-level node that calls a group's submodule."""
        name = self.graph.group(group_id).submodule
        return next(n for n in self.split.graph.find_nodes(op="call_module") if n.target == name)

    def submodule(self, group_id: str) -> fx.GraphModule:
        """A group's submodule."""
        return getattr(self.split, self.graph.group(group_id).submodule)

    def run(self, *args: Any, **kwargs: Any) -> GroupRun:
        """Run the groups eagerly on new model inputs (any batch and length) and return
        every group's real inputs and outputs. Runs the split module itself, no Dynamo."""
        named = _named_leaves(self.module, args, {**self.kwargs, **kwargs})
        top = []
        for node, example in zip(self.split.graph.find_nodes(op="placeholder"), self.top_args):
            source = self.sources[node.name]
            if "input" in source:
                top.append(named[source["input"]])
            elif "size" in source:
                top.append(named[source["size"]["input"]].shape[source["size"]["dim"]])
            else:
                top.append(example)
        with torch.no_grad():
            self.split(*top)
        return _group_run(self.split.recorded, self.graph, list(self.outputs))


def capture_groups(model: torch.nn.Module, example_inputs: tuple, model_kwargs: dict[str, Any],
                   granularity: str = "operator") -> GroupCapture:
    """Compile `model` with a backend that splits it into groups, run it once, and record
    where every group input comes from."""
    module = getattr(model, "_orig_mod", model)
    name = type(module).__name__
    options = Options(granularity=granularity, lowering="eager")  # checks the granularity now
    graphs: list[tuple[fx.GraphModule, GroupGraph]] = []
    notes = []
    uses_cache = getattr(getattr(module, "config", None), "use_cache", False)
    if uses_cache and "use_cache" not in model_kwargs:
        # A KV cache would add a cache object to the inputs and outputs of the graph.
        model_kwargs = {**model_kwargs, "use_cache": False}
        notes.append("exported with use_cache=False (no KV cache inputs or outputs)")

    def backend(gm: fx.GraphModule, _inputs: list[Any]) -> Callable:
        """Group and split one Dynamo graph, keep it, and run the split module."""
        analysis = analyse_graph(gm, options, model=name)
        split = split_groups(gm, analysis.assignment)
        _record_calls(split)
        graphs.append((split, analysis.group_graph))
        return split

    for value in list(example_inputs) + list(model_kwargs.values()):
        _mark_token_dims(value)
    torch._dynamo.reset()  # a fresh capture: no graph cached by an earlier compile is reused
    compiled = torch.compile(module, backend=backend, dynamic=None)
    with torch.no_grad():
        result = compiled(*example_inputs, **model_kwargs)
    torch._dynamo.reset()  # the split module is all that is needed from here on
    if len(graphs) != 1:
        raise ValueError(f"ONNX export of {name} needs exactly one captured graph, Dynamo "
                         f"captured {len(graphs)}: remove the graph breaks (see "
                         "TORCH_LOGS=graph_breaks) or export the pieces separately")
    split, graph = graphs[0]
    inputs = _named_leaves(module, example_inputs, model_kwargs)
    sources = _sources(split, graph, module, inputs)
    outputs = _output_sources(split, sources, result)
    example = _group_run(split.recorded, graph, list(outputs))
    return GroupCapture(name, split, graph, sources, outputs, _dim_names(graph), example, notes,
                        dict(model_kwargs), module, split.recorded[""][0])


def _record_calls(split: fx.GraphModule) -> None:
    """Keep the arguments and outputs of the latest call of every group and of the whole."""
    split.recorded = {}
    for name, sub in split.named_children():
        sub.register_forward_hook(
            lambda _m, args, out, name=name: split.recorded.__setitem__(name, (list(args), out)))
    split.register_forward_hook(
        lambda _m, args, out: split.recorded.__setitem__("", (list(args), out)))


def _group_run(recorded: dict[str, tuple], graph: GroupGraph, output_names: list[str]) -> GroupRun:
    """The recorded calls by group id (outputs always as a list) and the model outputs by name."""
    args, outputs = {}, {}
    for group in graph.groups:
        call_args, out = recorded[group.submodule]
        args[group.id] = call_args
        outputs[group.id] = list(out) if isinstance(out, (tuple, list)) else [out]
    return GroupRun(args, outputs, dict(zip(output_names, recorded[""][1])))


def _named_leaves(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Every tensor the model was called with, named after its forward parameter
    (`input_ids`; `past.0.key` inside structures)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):  # no usable signature: positional names
        bound = {**{f"input{i}": a for i, a in enumerate(args)}, **kwargs}
    named = {}
    for name, value in bound.items():
        for path, leaf in tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                named[".".join([name, *(_key(k) for k in path)])] = leaf
    return named


def _key(entry: Any) -> str:
    """One step of a pytree path as text (a dict key, an index or an attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _dim_names(graph: GroupGraph) -> dict[str, str]:
    """A readable ONNX dim name per shape symbol: its role (batch, length, context) when
    no other symbol has that role, else the symbol itself."""
    roles = [info["role"] for info in graph.symbols.values()]
    return {sym: info["role"] if info["role"] != "other" and roles.count(info["role"]) == 1
            else sym for sym, info in graph.symbols.items()}


def _sources(split: fx.GraphModule, graph: GroupGraph, module: torch.nn.Module,
             inputs: dict[str, Any]) -> dict[str, dict]:
    """Where every top-level value comes from (see GroupCapture)."""
    top_args, _ = split.recorded[""]
    by_id = {id(t): n for n, t in inputs.items()}
    weights = {id(t): n for n, t in [*module.named_parameters(), *module.named_buffers()]}
    placeholders = [n for n in split.graph.nodes if n.op == "placeholder"]
    sources: dict[str, dict] = {}
    for node, value in zip(placeholders, top_args):
        if isinstance(value, torch.Tensor):
            sources[node.name] = ({"input": by_id[id(value)]} if id(value) in by_id
                                  else {"weight": weights.get(id(value), node.name)})
    for node, value in zip(placeholders, top_args):
        if not isinstance(value, torch.Tensor):
            sources[node.name] = {"size": _size_source(node, placeholders, sources)}
    group_of = {g.submodule: g.id for g in graph.groups}
    for node in split.graph.nodes:
        if node.op == "call_module":
            sources[node.name] = {"group": group_of[str(node.target)], "output": 0}
        elif node.target is operator.getitem and node.args[0].op == "call_module":
            group = group_of[str(node.args[0].target)]
            sources[node.name] = {"group": group, "output": node.args[1]}
    return sources


def _size_source(node: fx.Node, placeholders: list[fx.Node], sources: dict[str, dict]) -> dict:
    """The model input and dim a top-level symbolic size is read from."""
    symbol = as_expr(node_value(node))
    for other in placeholders:
        value = node_value(other)
        if "input" in sources.get(other.name, {}) and isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if as_expr(size) == symbol:
                    return {"input": sources[other.name]["input"], "dim": dim}
    raise ValueError(f"graph input {node.name} is a symbolic size ({symbol}) that is no dim of "
                     "a tensor input; pass Python numbers as constants (they are static unless "
                     "marked dynamic)")


def _output_sources(split: fx.GraphModule, sources: dict[str, dict], result: Any
                    ) -> dict[str, dict]:
    """The model's outputs, named after the field of the result they are (`logits`) where
    the model returns a structure, with their sources."""
    _, top_out = split.recorded[""]
    names = {id(leaf): ".".join(_key(k) for k in path) or "output"
             for path, leaf in tree_flatten_with_path(result)[0] if isinstance(leaf, torch.Tensor)}
    output_node = next(n for n in split.graph.nodes if n.op == "output")
    outputs = {}
    for k, (node, value) in enumerate(zip(output_node.args[0], top_out)):
        if not isinstance(node, fx.Node) or "group" not in sources.get(node.name, {}):
            raise ValueError(f"model output {k} ({node}) is a model input, weight or constant, "
                             "not computed by a group; return only computed tensors")
        outputs[names.get(id(value), f"output{k}")] = sources[node.name]
    return outputs
