"""fxscale.runtime.pools: the live runtime: replica pools (one per operator group, each
replica with its own weights), selective batching across requests, the execution budget,
and the autoscaler that plans and applies replicas per group.

Imports contracts and runtime.planner."""
