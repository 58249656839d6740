"""fxscale.export: `fxscale.export_onnx`, every operator group as its own ONNX model with a
manifest that wires them into the whole model, and a runner for that manifest.

Imports contracts, compiler, passes."""
