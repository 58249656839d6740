"""How long a batchable queue gathers calls before it asks for an execution slot: one rule for
the live replica pools and for the runtime model that predicts them. No torch."""
from __future__ import annotations

# At most one mean execution after the oldest call (a late call would cost about one more
# execution), and no longer once arrivals pause for a quarter of that (0.5 ms at least).
QUIET_FRACTION = 0.25
MIN_QUIET_S = 0.0005


def gather_until(first_queued: float, last_queued: float, mean_execution_s: float,
                 batch_wait_s: float) -> float:
    """When a queue whose oldest call arrived at `first_queued` and newest at `last_queued`
    stops gathering (clock of the arrivals)."""
    return min(first_queued + min(batch_wait_s, mean_execution_s),
               last_queued + max(MIN_QUIET_S, QUIET_FRACTION * mean_execution_s))
