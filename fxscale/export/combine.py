"""One ONNX model of all groups, wired as the manifest says, for viewing the grouping in
Netron: node names start with the group id and every node carries its group in metadata."""
from __future__ import annotations

import json
from typing import Iterable

import onnx
from onnx import helper

from fxscale.export.group import GROUP_KEY


def combine(manifest: dict, models: dict[str, onnx.ModelProto]) -> onnx.ModelProto:
    """Merge the group models (all of them must be there) into one model.

    Group values are prefixed with the group id (`g3/linear`); group inputs are renamed to
    the values that feed them; weights keep their parameter names and are stored once.
    """
    wiring = _Wiring()
    nodes, initializers, infos, functions = [], {}, [], []
    opsets: dict[str, int] = {}
    for group in manifest["groups"]:
        model = onnx.compose.add_prefix(models[group["id"]], f"{group['id']}/")
        fed = [e for e in group["inputs"] if e["kind"] == "input"]
        rename = {inp.name: wiring.value(e["from"], nodes, inp)
                  for e, inp in zip(fed, model.graph.input)}
        for entry in group["inputs"]:
            if entry["kind"] == "initializer":  # shared weights (tied embeddings) are stored once
                rename[f"{group['id']}/{entry['initializer']}"] = entry["initializer"]
        _rename_inputs(model.graph.node, rename)
        nodes.extend(model.graph.node)
        for tensor in model.graph.initializer:
            tensor.name = rename.get(tensor.name, tensor.name)
            initializers.setdefault(tensor.name, tensor)
        infos.extend([*model.graph.value_info, *model.graph.output])  # shapes for Netron
        for k, out in enumerate(model.graph.output):
            wiring.outputs[(group["id"], k)] = out
        functions.extend(model.functions)
        for opset in model.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    outputs = []
    for out in manifest["outputs"]:
        source = wiring.value(out["from"], nodes)
        nodes.append(helper.make_node("Identity", [source], [out["name"]],
                                      name=f"output/{out['name']}"))
        outputs.append(_renamed(wiring.types[source], out["name"]))
    graph = helper.make_graph(nodes, manifest["model"], wiring.inputs, outputs,
                              list(initializers.values()), value_info=infos)
    combined = helper.make_model(
        graph, functions=functions, producer_name="fxscale",
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    combined.ir_version = max(m.ir_version for m in models.values())
    combined.metadata_props.add(key=f"{GROUP_KEY}s", value=json.dumps(
        [{"id": g["id"], "name": g["name"]} for g in manifest["groups"]]))
    return combined


class _Wiring:
    """The combined model's values: model inputs, group outputs, sizes read from inputs."""

    def __init__(self) -> None:
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: dict[tuple[str, int], onnx.ValueInfoProto] = {}
        self.types: dict[str, onnx.ValueInfoProto] = {}

    def value(self, source: dict, nodes: list, consumer: onnx.ValueInfoProto | None = None) -> str:
        """The name of the value a source names, adding model inputs and size nodes on first use."""
        if "group" in source:
            info = self.outputs[(source["group"], source["output"])]
            self.types[info.name] = info
            return info.name
        if "input" in source:
            name = source["input"]
            if name not in self.types:
                self.types[name] = _renamed(consumer, name)
                self.inputs.append(self.types[name])
            return name
        name, dim = source["size"]["input"], source["size"]["dim"]
        value = f"size/{name}/{dim}"
        if value not in self.types:  # an int64 scalar: dim `dim` of model input `name`
            self.types[value] = helper.make_tensor_value_info(value, onnx.TensorProto.INT64, [])
            nodes.extend([
                helper.make_node("Shape", [name], [f"{value}/1d"], name=f"{value}/shape",
                                 start=dim, end=dim + 1),
                helper.make_node("Squeeze", [f"{value}/1d"], [value], name=f"{value}/squeeze")])
        return value


def _renamed(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """A copy of a value's type information under another name."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = name
    return copy


def _rename_inputs(nodes: Iterable[onnx.NodeProto], rename: dict[str, str]) -> None:
    """Rename node inputs, in subgraphs (If, Loop, Scan bodies) too."""
    for node in nodes:
        node.input[:] = [rename.get(name, name) for name in node.input]
        for attr in node.attribute:
            for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_inputs(graph.node, rename)
