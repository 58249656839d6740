"""fxscale.studies: the measurements fxscale reports about itself: the demo's serving
comparison, the runtime model's fidelity, the characterization report, the benchmark matrix.

An application layer: may import any stage."""
