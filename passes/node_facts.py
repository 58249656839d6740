"""Facts about single FX nodes: tensor metadata, symbolic sizes, weights, layer membership."""
from __future__ import annotations

import re
from typing import Any, Iterator

import sympy
import torch
import torch.fx as fx

COMPUTE_OPS = ("call_function", "call_method", "call_module")


def node_value(node: Any) -> Any:
    """The example value (usually a FakeTensor) Dynamo recorded for a node, or the constant itself."""
    if isinstance(node, fx.Node):
        meta = node.meta
        return meta["example_value"] if "example_value" in meta else meta.get("val")
    return node


def as_expr(size: Any) -> sympy.Expr:
    """A dimension (int or SymInt) as a sympy expression, without adding shape guards."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def shape_exprs(t: torch.Tensor) -> list[sympy.Expr]:
    """The tensor's sizes as sympy expressions."""
    return [as_expr(s) for s in t.shape]


def numel_expr(t: torch.Tensor) -> sympy.Expr:
    """Number of elements as a sympy expression."""
    return sympy.Mul(*shape_exprs(t)) if t.dim() else sympy.Integer(1)


def nbytes_expr(t: torch.Tensor) -> sympy.Expr:
    """Bytes of a tensor's elements as a sympy expression."""
    return numel_expr(t) * t.dtype.itemsize


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a (possibly nested) value."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)


def input_nodes(node: fx.Node) -> list[fx.Node]:
    """The distinct nodes a node reads, in argument order."""
    return list(dict.fromkeys(node.all_input_nodes))


def _placeholder_source(node: fx.Node) -> str:
    """Where Dynamo says a placeholder comes from (its source, else its name)."""
    source = getattr(node, "_dynamo_source", None)
    return repr(source) if source is not None else node.name


def is_weight_placeholder(node: fx.Node) -> bool:
    """Whether a placeholder/get_attr is a module parameter or buffer rather than a user input."""
    if node.op == "get_attr" or is_parameter_placeholder(node):
        return True
    text = _placeholder_source(node) if node.op == "placeholder" else ""
    return "_buffers" in text or "ParamBuffer" in text


def is_parameter_placeholder(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """Whether a placeholder/get_attr holds an nn.Parameter (not a buffer): weights of GEMMs."""
    if node.op == "get_attr" and gm is not None:
        try:
            return isinstance(gm.get_parameter(str(node.target)), torch.nn.Parameter)
        except AttributeError:
            return False
    if node.op != "placeholder":
        return False
    return isinstance(node_value(node), torch.nn.Parameter) or \
        "_parameters" in _placeholder_source(node)


_INDEX = re.compile(r"\[(\d+)\]")


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module a node was traced in ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _INDEX.sub(r".\1", path)
    # Drop Dynamo's root ("L['self']", "L['args'][0]", ...): keep what follows the root's first dot.
    if path.startswith("L["):
        root_end = path.find("].")
        path = path[root_end + 2 :] if root_end >= 0 else ""
        path = re.sub(r"^\d+\.", "", path)
    return path


def module_type_name(node: fx.Node) -> str:
    """Class name of the innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    mod_type = list(stack.values())[-1][1]
    return getattr(mod_type, "__name__", str(mod_type))


def layer_of(path: str) -> str | None:
    """The repeated block (e.g. 'model.layers.3') a module path lies in, if any."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def op_name(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A short, normalised name of the operation a node performs (in-place suffix removed)."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_module" and gm is not None:
        name = type(gm.get_submodule(str(node.target))).__name__.lower()
    elif isinstance(node.target, torch._ops.OpOverload):
        name = node.target._opname
    elif isinstance(node.target, torch._ops.OpOverloadPacket):
        name = node.target._qualified_op_name.split("::")[-1]
    else:
        name = getattr(node.target, "__name__", str(node.target))
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name
