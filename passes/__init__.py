"""fxscale.passes: graph -> graph (or graph -> facts) functions over torch.fx.

Data flows one way: annotate costs -> group -> ensure convexity -> split -> lower.
"""
from fxscale.passes.convexity import ensure_convex, is_convex_partition
from fxscale.passes.costs import NodeCost, annotate_costs
from fxscale.passes.grouping import Grouping, group_nodes
from fxscale.passes.lower import lower_groups
from fxscale.passes.split import split_groups

__all__ = [
    "NodeCost",
    "annotate_costs",
    "ensure_convex",
    "is_convex_partition",
    "Grouping",
    "group_nodes",
    "lower_groups",
    "split_groups",
]
