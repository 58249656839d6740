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
    "Backend": "backend", "fxscale_backend": "backend", "explain": "capture",
    "InputError": "errors",
    "Group": "group_graph", "GroupEdge": "group_graph", "GroupGraph": "group_graph",
    "Options": "options", "Grid": "profiling", "profile": "profiling",
    "serve": "serving", "Server": "serving", "OverloadError": "serving",
    "ServerClosedError": "serving",
    "SLO": "runtime.planner", "report": "reporting",
    "export_onnx": "onnx_export", "OnnxExport": "onnx_export",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxscale' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
