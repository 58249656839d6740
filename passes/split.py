"""Split a graph into one submodule per operator group (torch.fx split_module)."""
from __future__ import annotations

from typing import Hashable, Mapping

import torch.fx as fx
from torch.fx.passes.split_module import split_module


def number_groups(order: list[fx.Node], part: Mapping[fx.Node, Hashable]) -> dict[fx.Node, int]:
    """Renumber arbitrary part labels 0, 1, ... in order of first appearance."""
    numbers: dict[Hashable, int] = {}
    return {n: numbers.setdefault(part[n], len(numbers)) for n in order}


def split_groups(gm: fx.GraphModule, assignment: Mapping[fx.Node, int]) -> fx.GraphModule:
    """A GraphModule whose top level calls one submodule per group, in the original order.

    Does not mutate `gm`. Symbolic sizes a group needs are threaded in as inputs by
    split_module, so groups stay shape-generic.
    """
    split = split_module(gm, None, lambda node: assignment[node], keep_original_order=True)
    split.meta.update(gm.meta)
    return split
