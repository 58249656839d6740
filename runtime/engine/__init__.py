"""fxscale.runtime.engine: the serving engine: iteration-level continuous batching (the
scheduler of runtime.scheduling) over a paged KV cache, with attention routed to one custom
op (fxscale.kernels), steps run as flat token batches, tokens delivered to futures and
streams.

Imports contracts, kernels, runtime.scheduling; torch and transformers."""
from .engine import Engine, EngineRequest

__all__ = ["Engine", "EngineRequest"]
