"""fxscale.runtime.traces: request traces: the shipped Azure and Mooncake traces, trace files
in their formats, ServeGen's distributions sampled into requests, Poisson resampling.

Imports contracts only; no torch."""
from fxscale.contracts.trace import Request, Trace, TraceError

from .loaders import load_trace, poisson_resample

__all__ = ["Request", "Trace", "TraceError", "load_trace", "poisson_resample"]
