"""fxscale: make the operator the unit of scaling for large generative models.

    compiled = torch.compile(model, backend="fxscale", options={"granularity": "operator"})
    groups = fxscale.explain(model, *example_inputs)

The names below load on first use, so the planner and simulator (fxscale.runtime) import
without torch.
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Backend": "compiler.backend", "fxscale_backend": "compiler.backend",
    "explain": "compiler.capture", "Options": "compiler.options",
    "InputError": "contracts.errors", "Group": "contracts.group_graph",
    "GroupEdge": "contracts.group_graph", "GroupGraph": "contracts.group_graph",
    "SLO": "contracts.plan", "Plan": "contracts.plan", "Sampling": "contracts.sampling",
    "Devices": "contracts.devices", "PlacementError": "contracts.devices",
    "Grid": "profiling.measure", "profile": "profiling.measure",
    "serve": "serving.server", "Server": "serving.server", "OverloadError": "serving.server",
    "ServerClosedError": "serving.server",
    "report": "reporting.report",
    "export_onnx": "export.write", "OnnxExport": "export.write",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxscale' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
