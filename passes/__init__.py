"""fxscale.passes: graph -> graph (or graph -> facts) functions over torch.fx.

Data flows one way: annotate costs -> group -> ensure convexity -> split -> lower.
"""
from .costs import NodeCost, annotate_costs
from .convexity import ensure_convex, is_convex_partition
from .grouping import Grouping, group_nodes
from .lower import lower_groups
from .split import split_groups

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
