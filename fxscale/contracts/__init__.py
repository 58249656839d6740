"""fxscale.contracts: what passes between the stages, as dataclasses with JSON readers and
writers (never pickle): the GroupGraph, Profile, Trace/Request, SLO, the policy registry and
the Plan of a deployment, scaling Decisions and the one hysteresis rule, the devices of a
deployment and the one placement rule, metrics definitions,
the cost expression grammar, the error type for bad input, and the project's file helpers.

The bottom layer: imports nothing else of fxscale, and no torch."""
