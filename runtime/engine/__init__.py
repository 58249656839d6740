"""fxscale.runtime.engine: the serving engine: iteration-level continuous batching (the
scheduler of runtime.scheduling) over a paged KV cache, with attention routed to one custom
op (fxscale.kernels), each step compiled once (the fxscale backend) and run group by group
on per-group pools (runtime.executors), tokens delivered to futures and streams.

Imports contracts, kernels, compiler, runtime.scheduling, runtime.executors; torch and
transformers."""
from .engine import Engine, EngineRequest

__all__ = ["Engine", "EngineRequest"]
