"""fxscale.compiler: the torch.compile backend. Captures a Dynamo graph, runs the passes
(fxscale.passes) that annotate, group and lower it, and returns the lowered graph with its
GroupGraph; `explain` runs the analysis without compiling.

Imports contracts and passes."""
