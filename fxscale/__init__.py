"""fxscale: make the operator the unit of scaling for large generative models.

    compiled = torch.compile(model, backend="fxscale", options={"granularity": "operator"})
    groups = fxscale.explain(model, *example_inputs)
"""
from .backend import compiled_group_graphs, fxscale_backend
from .explain import explain
from .group_graph import Group, GroupEdge, GroupGraph
from .options import Options
from .profiling import Grid, profile

__version__ = "0.1.0"

__all__ = ["Grid", "Group", "GroupEdge", "GroupGraph", "Options", "compiled_group_graphs",
           "explain", "fxscale_backend", "profile", "__version__"]
