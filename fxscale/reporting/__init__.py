"""fxscale.reporting: `fxscale.report`, one self-contained HTML page of a model's operator
groups (with a plan, a profile and runs), or the grouped graph as Graphviz DOT / SVG.

Imports contracts, compiler (to capture a model)."""
