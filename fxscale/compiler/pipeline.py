"""The order of the passes, in one place: each step reads what earlier steps found about one
Dynamo graph and adds its own result to the Compilation record.

    ANALYSIS  symbols -> costs -> groups -> convex groups -> GroupGraph   (fxscale.explain)
    PIPELINE  ANALYSIS -> split into one submodule per group -> describe each group's
              inputs and outputs -> lower each group (the backend)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from fxscale.compiler.analysis import build_group_graph, describe_groups, group_reasons
from fxscale.compiler.io import GroupIO, group_io
from fxscale.compiler.options import Options
from fxscale.contracts.group_graph import GroupGraph
from fxscale.passes.convexity import ensure_convex, graph_dag
from fxscale.passes.costs import NodeCost, annotate_costs
from fxscale.passes.grouping import Grouping, group_nodes
from fxscale.passes.lower import lower_groups
from fxscale.passes.node_facts import COMPUTE_OPS
from fxscale.passes.split import number_groups, split_groups
from fxscale.passes.symbols import SymbolTable, symbols_of_graph


@dataclass
class Compilation:
    """What the passes have found about one Dynamo graph so far (each step fills a field)."""

    gm: fx.GraphModule
    options: Options
    model: str = "model"
    example_inputs: list[Any] = field(default_factory=list)   # real inputs, for lowering
    symbols: SymbolTable | None = None                       # shape symbols and their roles
    costs: dict[fx.Node, NodeCost] | None = None             # per node: class and costs
    grouping: Grouping | None = None                         # heterogeneity-aware groups
    assignment: dict[fx.Node, int] | None = None             # node -> group, convex, numbered
    group_graph: GroupGraph | None = None                    # the contract of the groups
    split: fx.GraphModule | None = None                      # one submodule per group
    io: dict[str, GroupIO] = field(default_factory=dict)      # submodule -> inputs, outputs
    lowering: dict[str, str] = field(default_factory=dict)   # submodule -> how it was lowered
    steps: list[str] = field(default_factory=list)           # the steps run, in order


def find_symbols(c: Compilation) -> None:
    """Which shape symbols are batch, length and context."""
    c.symbols = symbols_of_graph(c.gm)


def annotate(c: Compilation) -> None:
    """Every compute node's class and symbolic costs."""
    c.costs = annotate_costs(c.gm, c.symbols)


def group(c: Compilation) -> None:
    """Heterogeneity-aware operator groups at the requested granularity."""
    c.grouping = group_nodes(c.gm, c.costs, c.symbols, c.options.granularity)


def make_convex(c: Compilation) -> None:
    """Split groups until the group graph is acyclic; number them in graph order."""
    order = [n for n in c.gm.graph.nodes if n.op in COMPUTE_OPS]
    part, notes = ensure_convex(graph_dag(c.gm), c.grouping.assignment)
    c.assignment = number_groups(order, part)
    reasons = group_reasons(order, c.assignment, c.grouping)
    c.group_graph = build_group_graph(c.gm, c.costs, c.symbols, c.assignment, reasons,
                                      c.options.granularity, c.model)
    c.group_graph.notes.extend(notes)


def split(c: Compilation) -> None:
    """One submodule per group (symbolic sizes threaded in as inputs)."""
    c.split = split_groups(c.gm, c.assignment)


def describe_io(c: Compilation) -> None:
    """Each group submodule's inputs and outputs (what an executor splits a call by)."""
    c.io = group_io(c.split)


def lower(c: Compilation) -> None:
    """Compile each group (Inductor) or keep its FX graph (eager), in place in `split`."""
    c.split, c.lowering = lower_groups(c.gm, c.split, c.example_inputs, c.options.lowering,
                                       describe_groups(c.group_graph), dedupe=c.options.dedupe,
                                       warn=c.options.warn_on_fallback)


ANALYSIS: tuple[Callable[[Compilation], None], ...] = (find_symbols, annotate, group,
                                                       make_convex)
PIPELINE: tuple[Callable[[Compilation], None], ...] = (*ANALYSIS, split, describe_io, lower)


def analyse_graph(gm: fx.GraphModule, options: Options, model: str = "model") -> Compilation:
    """The ANALYSIS of one Dynamo graph (its group_graph and assignment), nothing compiled."""
    return run(Compilation(gm, options, model), ANALYSIS)


def run(c: Compilation, steps: tuple[Callable[[Compilation], None], ...]) -> Compilation:
    """Run steps in order, recording each."""
    for step in steps:
        step(c)
        c.steps.append(step.__name__)
    return c
