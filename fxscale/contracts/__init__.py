"""fxscale.contracts: what passes between the stages, as dataclasses with JSON readers and
writers (never pickle): the GroupGraph, Profile, Trace, SLO and metrics definitions, the cost
expression grammar, the error type for bad input, and the project's file helpers.

The bottom layer: imports nothing else of fxscale, and no torch."""
