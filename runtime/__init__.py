"""fxscale.runtime: where operator groups live and how their deployment is planned.

- devices: device models (catalogue, roofline) and latency fits of profiles; no torch.
- traces: request traces (shipped, files, sampled); no torch.
- planner: queueing, the service model of a GroupGraph on a device, plan search; no torch.
- simulator: the trace-driven cluster simulator and the local runtime's model; no torch.
- pools: the live runtime: replica pools, batching, the execution budget, the autoscaler.
"""
