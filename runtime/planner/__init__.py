"""fxscale.runtime.planner: how many devices, engines and replicas meet an SLO: queueing
(Erlang C), the service model of a model's GroupGraphs on a device, serving engines, the
plan search per policy, and the live autoscaler's pool planning.

Imports contracts and runtime.devices; no torch."""
from fxscale.contracts.plan import POLICIES, SLO, Plan

from .search import Workload, default_slo, plan

__all__ = ["POLICIES", "Plan", "SLO", "Workload", "default_slo", "plan"]
