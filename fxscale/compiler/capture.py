"""Capture a model and return its GroupGraph without compiling anything (`fxscale.explain`)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxscale.compiler.options import Options
from fxscale.compiler.pipeline import analyse_graph
from fxscale.contracts.exprs import parse_expr, to_text
from fxscale.contracts.group_graph import COST_FIELDS, GroupGraph


def explain(model: torch.nn.Module | Callable, *example_inputs: Any, granularity: str = "operator",
            dynamic: bool = True, **model_kwargs: Any) -> GroupGraph:
    """Capture `model(*example_inputs, **model_kwargs)` and return its operator groups.

    Works on a plain module, on the result of torch.compile, and on a model built on the
    `meta` device (nothing is allocated: the forward runs on meta tensors). With
    `dynamic=True` the batch dim of every tensor input and the length dim of token inputs
    are symbolic, so costs are functions of (batch, length). Graph breaks give one group
    graph per captured graph, merged in order (groups carry their graph index).
    """
    options = Options(granularity=granularity, lowering="eager")
    module = getattr(model, "_orig_mod", model)
    name = type(module).__name__ if isinstance(module, torch.nn.Module) else \
        getattr(module, "__name__", "function")
    graphs: list[GroupGraph] = []

    def capture(gm: torch.fx.GraphModule, inputs: list[Any]):
        graphs.append(analyse_graph(gm, options, model=name).group_graph)
        return gm.forward

    notes = []
    if _on_meta(module) and getattr(getattr(module, "config", None), "use_cache", False) \
            and "use_cache" not in model_kwargs:
        # Hugging Face caches start from a real empty tensor, which Dynamo cannot fake on
        # the meta device; attention and its KV bytes per token are analysed all the same.
        model_kwargs["use_cache"] = False
        notes.append("meta device: analysed with use_cache=False (KV-cache update ops omitted)")
    if dynamic:
        for value in list(example_inputs) + list(model_kwargs.values()):
            _mark_token_dims(value)
    torch._dynamo.reset()  # a fresh capture: no cached graph of an earlier explain is reused
    with torch.no_grad():
        torch.compile(module, backend=capture, dynamic=None)(*example_inputs, **model_kwargs)
    torch._dynamo.reset()
    if not graphs:
        raise RuntimeError(f"Dynamo captured no graph of {name}: the forward "
                           "ran eagerly (see TORCH_LOGS=graph_breaks)")
    merged = merge_graphs(graphs)
    merged.notes.extend(notes)
    return merged


def _on_meta(module: torch.nn.Module) -> bool:
    """Whether the module's parameters live on the meta device."""
    if not isinstance(module, torch.nn.Module):
        return False
    first = next(module.parameters(), None)
    return first is not None and first.is_meta


def _mark_token_dims(value: Any) -> None:
    """Mark batch (dim 0) and, for token-shaped inputs, length (dim 1) as dynamic if possible;
    in a Hugging Face KV cache, batch and cached tokens (dim 2) of every layer's K and V."""
    for layer in getattr(value, "layers", None) or []:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
                torch._dynamo.maybe_mark_dynamic(tensor, 2)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return
    torch._dynamo.maybe_mark_dynamic(value, 0)
    if value.dim() in (2, 3) and (not value.is_floating_point() or value.dim() == 3):
        torch._dynamo.maybe_mark_dynamic(value, 1)


def merge_graphs(graphs: list[GroupGraph]) -> GroupGraph:
    """One GroupGraph from the graphs of several Dynamo captures (graph breaks), in order."""
    if len(graphs) == 1:
        return graphs[0]
    first = graphs[0]
    merged = GroupGraph(model=first.model, granularity=first.granularity, groups=[], edges=[],
                        notes=[f"{len(graphs)} graphs (graph breaks): group ids carry the "
                               "graph index, symbols of graph k carry the suffix _k"])
    for k, graph in enumerate(graphs):
        rename = {name: f"{name}_{k}" for name in graph.symbols}
        for name, info in graph.symbols.items():
            merged.symbols[rename[name]] = info
        for group in graph.groups:
            group.id = f"{k}.{group.id}"
            group.graph = k
            for field_name in COST_FIELDS:
                setattr(group, field_name, _rename(getattr(group, field_name), rename))
            merged.groups.append(group)
        for edge in graph.edges:
            edge.src, edge.dst = f"{k}.{edge.src}", f"{k}.{edge.dst}"
            edge.bytes = _rename(edge.bytes, rename)
            merged.edges.append(edge)
        merged.notes.extend(graph.notes)
    return merged


def _rename(expr: str, rename: dict[str, str]) -> str:
    """Rename the symbols of a stored expression."""
    parsed = parse_expr(expr)
    return to_text(parsed.xreplace({s: type(s)(rename.get(s.name, s.name))
                                    for s in parsed.free_symbols}))
