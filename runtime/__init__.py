"""fxscale.runtime: where operator groups live and how their deployment is planned.

- devices: device models (catalogue, roofline) and latency fits of profiles; no torch.
- traces: request traces (shipped, files, sampled); no torch.
- scheduling: the rules that compose a step (continuous batching, chunked prefill, KV
  blocks, preemption), shared by the engine and the simulators; no torch.
- planner: queueing, the service model of a GroupGraph on a device, plan search, the
  engine's pool planning; no torch.
- simulator: the trace-driven cluster simulator and the engine's simulator; no torch.
- engine: the serving engine (steps over a paged KV cache, attention routed to one op).
- executors: where groups run (the local executor's replica threads).
- autoscaling: the engine's autoscaler; no torch.
"""
