"""fxscale.models: models to try and test things on: the zoo of small Hugging Face models
with random weights, and published configurations analysed on the meta device (presets).

Imports contracts, compiler, profiling (workloads, device models), runtime.planner."""
