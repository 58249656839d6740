"""fxscale.runtime.scheduling: the rules that compose a step, shared by the live engine and
the simulator: continuous batching with chunked prefill within a token budget, admission by
free KV blocks on an attention replica, preemption (recompute) when blocks run out, FCFS
order, cancellation; the block allocator of each attention replica.

Imports contracts only; no torch."""
from .blocks import BlockPool, OutOfBlocks
from .scheduler import Scheduler, SchedulerConfig, SequenceState

__all__ = ["BlockPool", "OutOfBlocks", "Scheduler", "SchedulerConfig", "SequenceState"]
