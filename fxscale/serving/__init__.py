"""fxscale.serving: `fxscale.serve`, the server that hosts a model's operator groups in
replica pools on this machine, its Prometheus endpoint, and the replay of a trace against it.

Imports contracts, runtime (engine, executors, autoscaling)."""
