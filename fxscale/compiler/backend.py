"""The torch.compile backend: `torch.compile(model, backend="fxscale", options={...})`."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch.fx as fx
from torch._dynamo.exc import ShortenTraceback

from fxscale.compiler.options import Options
from fxscale.compiler.pipeline import ANALYSIS, Compilation, describe_io, lower, run, split
from fxscale.contracts.errors import InputError
from fxscale.contracts.group_graph import GroupGraph


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
    """Group the operators of a Dynamo graph and lower each group; return the callable to run
    (a graph module carrying `group_graph` and `group_io`).

    Bad options raise a ValueError naming the option. If grouping fails the graph runs
    eagerly as a whole, with a warning; if lowering a group fails that group runs eagerly.
    """
    try:
        opts = Options.from_user(options)
    except (ValueError, TypeError) as err:
        raise OptionsError(str(err)) from None
    c = Compilation(gm, opts, _model_name(gm), list(example_inputs))
    try:
        run(c, (*ANALYSIS, split, describe_io))
    except Exception as err:  # noqa: BLE001 - analysis must never break the user's model
        if opts.warn_on_fallback:
            warnings.warn(f"fxscale: could not group this graph ({type(err).__name__}: {err}); "
                          "it runs eagerly as one piece", stacklevel=2)
        return gm.forward
    graph = c.group_graph
    try:
        run(c, (lower,))
    except Exception as err:  # noqa: BLE001 - a failed lowering falls back to eager groups
        reason = f"{type(err).__name__}: {err}"
        if opts.warn_on_fallback:
            warnings.warn(f"fxscale: lowering failed ({reason}); all groups run eagerly",
                          stacklevel=2)
        run(c, (split,))  # afresh: the failed lowering may have changed the old split
        c.lowering = {g.submodule: f"eager (fallback: {reason})" for g in graph.groups}
    lowered = c.split
    for group in graph.groups:
        group.lowering = c.lowering.get(group.submodule, "eager")
        group.callable = _submodule(lowered, group.submodule)
    graph.module = lowered
    lowered.group_graph = graph
    lowered.group_io = c.io  # what executors split each group's calls by
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
