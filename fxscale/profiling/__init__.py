"""fxscale.profiling: measured and analytic latency profiles of operator groups (Profile),
the workloads they are measured on, and this machine's CPU device model.

Imports contracts, compiler, runtime (devices, pools for batched timing)."""
