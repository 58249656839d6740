"""fxscale.runtime.executors: where operator groups run. The protocol (protocol.py) is what
the engine asks of a pool of replicas; the local executor (local.py) runs replicas as threads
of this process, each placed on one of the deployment's devices (contracts/placement.py:
memory and compute slots per device).

Imports contracts; torch."""
from .local import LocalPool, LocalReplica
from .protocol import Pool, Replica

__all__ = ["LocalPool", "LocalReplica", "Pool", "Replica"]
