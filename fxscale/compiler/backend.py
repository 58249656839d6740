"""The torch.compile backend: `torch.compile(model, backend="fxscale", options={...})`."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch.fx as fx
from torch._dynamo.exc import ShortenTraceback

from fxscale.compiler.analysis import analyse_graph, describe_groups
from fxscale.compiler.options import Options
from fxscale.contracts.errors import InputError
from fxscale.contracts.group_graph import GroupGraph
from fxscale.passes.lower import lower_groups
from fxscale.passes.split import split_groups, submodule_name


class OptionsError(InputError, ShortenTraceback):
    """Bad backend options: a ValueError that Dynamo hands to the caller as it is (it wraps
    any other backend error in BackendCompilerFailed, a RuntimeError)."""

    def __init__(self, message: str) -> None:
        ShortenTraceback.__init__(self, message, first_useful_frame=None)


class Backend:
    """The fxscale backend as an object that keeps the GroupGraphs it compiled, newest last:

        backend = fxscale.Backend({"lowering": "eager"})
        compiled = torch.compile(model, backend=backend)
        compiled(input_ids); backend.group_graphs[-1]

    (`backend="fxscale"` keeps nothing: each compiled graph module carries its own
    `group_graph`.) Bad options raise a ValueError here, before anything compiles."""

    def __init__(self, options: Options | dict | None = None) -> None:
        self.options = Options.from_user(options)
        self.group_graphs: list[GroupGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        lowered = fxscale_backend(gm, example_inputs, self.options)
        graph = getattr(lowered, "group_graph", None)
        if graph is not None:
            self.group_graphs.append(graph)
        return lowered


def fxscale_backend(gm: fx.GraphModule, example_inputs: list[Any],
                    options: Options | dict | None = None) -> Callable:
    """Group the operators of a Dynamo graph and lower each group; return the callable to run.

    Bad options raise a ValueError naming the option. If grouping fails the graph runs
    eagerly as a whole, with a warning; if lowering a group fails that group runs eagerly.
    """
    try:
        opts = Options.from_user(options)
    except (ValueError, TypeError) as err:
        raise OptionsError(str(err)) from None
    try:
        analysis = analyse_graph(gm, opts, model=_model_name(gm))
        split = split_groups(gm, analysis.assignment)
    except Exception as err:  # noqa: BLE001 - analysis must never break the user's model
        if opts.warn_on_fallback:
            warnings.warn(f"fxscale: could not group this graph ({type(err).__name__}: {err}); "
                          "it runs eagerly as one piece", stacklevel=2)
        return gm.forward
    graph = analysis.group_graph
    try:
        lowered, status = lower_groups(gm, split, example_inputs, opts.lowering,
                                       describe_groups(graph), dedupe=opts.dedupe,
                                       warn=opts.warn_on_fallback)
    except Exception as err:  # noqa: BLE001 - a failed lowering falls back to eager groups
        reason = f"{type(err).__name__}: {err}"
        if opts.warn_on_fallback:
            warnings.warn(f"fxscale: lowering failed ({reason}); all groups run eagerly",
                          stacklevel=2)
        lowered = split_groups(gm, analysis.assignment)
        status = {submodule_name(int(g.id[1:])): f"eager (fallback: {reason})"
                  for g in graph.groups}
    for group in graph.groups:
        name = submodule_name(int(group.id[1:]))
        group.lowering = status.get(name, "eager")
        group.callable = _submodule(lowered, name)
    graph.module = lowered
    lowered.group_graph = graph
    return lowered


def _submodule(module: fx.GraphModule, name: str) -> Any:
    """The (possibly compiled) submodule of a group; Inductor's are renamed compiled_<name>."""
    return getattr(module, name, None) or getattr(module, f"compiled_{name}", None)


def _model_name(gm: fx.GraphModule) -> str:
    """The class name of the module Dynamo traced, when it recorded one."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            return getattr(list(stack.values())[0][1], "__name__", "model")
    return "model"
