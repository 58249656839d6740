"""fxscale.runtime.simulator: the trace-driven simulator (replay a trace on a policy's
engines, autoscaled), the comparison of policies against the fluid bound, and the serving
engine in simulated time (engine.py: its own scheduler, the groups' times) that
`fxscale fidelity` checks against live runs.

Imports contracts, runtime.devices, runtime.traces, runtime.planner, runtime.scheduling;
no torch."""
from .replay import Result, ScalingConfig, Simulation, simulate

__all__ = ["Result", "ScalingConfig", "Simulation", "simulate"]
