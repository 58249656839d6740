"""What each group's submodule takes and returns, as an executor needs it to split a call:
per input and output, its name, whether it is a tensor, a size (a symbolic int threaded in
by the split) or another value, and a tensor's sizes as text ("s70", "64")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx


@dataclass(frozen=True)
class Port:
    """One input or output of a group's submodule."""

    name: str                    # the submodule's placeholder (or output node) name
    kind: str                    # "tensor", "size" (a symbolic int) or "value"
    shape: tuple[str, ...] = ()  # a tensor's sizes, a size's symbol, as text


@dataclass(frozen=True)
class GroupIO:
    """A group submodule's inputs (in call order) and outputs (a tuple when `many`)."""

    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    many: bool  # the submodule returns a tuple (else one value)


def port(name: str, value: Any) -> Port:
    """The Port of a fake value (a FakeTensor, a SymInt, or anything else)."""
    if isinstance(value, torch.Tensor):
        return Port(name, "tensor", tuple(str(s) for s in value.shape))
    if isinstance(value, torch.SymInt):
        return Port(name, "size", (str(value),))
    return Port(name, "value")


def _value(node: Any) -> Any:
    meta = getattr(node, "meta", {})
    return meta.get("example_value", meta.get("val"))


def group_io(split: fx.GraphModule) -> dict[str, GroupIO]:
    """The GroupIO of every group submodule of a split graph module, by submodule name."""
    out = {}
    for node in split.graph.nodes:
        if node.op != "call_module":
            continue
        sub = getattr(split, node.target)
        inputs = tuple(port(p.name, _value(p)) for p in sub.graph.find_nodes(op="placeholder"))
        result = next(iter(sub.graph.find_nodes(op="output"))).args[0]
        many = isinstance(result, (tuple, list))
        results = result if many else (result,)
        outputs = tuple(port(getattr(r, "name", str(i)), _value(r)) for i, r in enumerate(results))
        out[node.target] = GroupIO(inputs, outputs, many)
    return out
