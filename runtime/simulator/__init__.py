"""fxscale.runtime.simulator: the trace-driven simulator (replay a trace on a policy's
engines, autoscaled), the comparison of policies against the fluid bound, and the model of
the local runtime that `fxscale fidelity` checks against live runs.

Imports contracts, runtime.devices, runtime.traces, runtime.planner; no torch."""
from .replay import Result, ScalingConfig, Simulation, simulate

__all__ = ["Result", "ScalingConfig", "Simulation", "simulate"]
