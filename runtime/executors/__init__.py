"""fxscale.runtime.executors: where operator groups run. The protocol (protocol.py) is what
the engine asks of a pool of replicas; the local executor (local.py) runs replicas as threads
of this process, a bounded number of executions at once.

Imports contracts; torch."""
from .local import LocalPool, LocalReplica
from .protocol import Pool, Replica

__all__ = ["LocalPool", "LocalReplica", "Pool", "Replica"]
