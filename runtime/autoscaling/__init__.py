"""fxscale.runtime.autoscaling: the engine's autoscaler: every interval it measures each
group's pool, plans replicas with the step model of runtime.planner.pools, and applies the
plan with hysteresis, recording every Decision with its reason.

Imports contracts and runtime.planner; no torch."""
from .autoscaler import Autoscaler

__all__ = ["Autoscaler"]
