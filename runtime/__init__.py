"""fxscale.runtime: where operator groups live (executors, replica pools, autoscaler, simulator)."""
