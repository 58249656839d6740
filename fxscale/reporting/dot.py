"""The grouped graph in Graphviz: DOT text (no binary needed) and SVG through the `dot` tool."""
from __future__ import annotations

import shutil
import subprocess

from fxscale.contracts.group_graph import GroupGraph
from fxscale.reporting.svg import OTHER_COLOURS, RESOURCE_COLOURS, si


def to_dot(graph: GroupGraph, batch: int | None = None, length: int | None = None) -> str:
    """DOT text: one node per group coloured by resource, one cluster per layer, edges
    labelled with the bytes they carry at (batch, length)."""
    lines = [f"digraph {_quote(graph.model)} {{", "  rankdir=TB; node [shape=box, style="
             '"rounded,filled", fontname="Helvetica", fontsize=10]; edge [fontsize=8];']
    clusters: dict[str | None, list[str]] = {}
    for g in graph.groups:
        flops = graph.cost(g, "flops", batch, length)
        label = (f"{g.id}: {g.name}\n{g.resource}, {si(flops, 'FLOP')}, "
                 f"params {si(g.param_bytes, 'B')}")
        fill, outline = RESOURCE_COLOURS.get(g.resource, OTHER_COLOURS)
        clusters.setdefault(g.layer, []).append(
            f"{_quote(g.id)} [label={_quote(label)}, fillcolor={_quote(fill)}, "
            f"color={_quote(outline)}];")
    for i, (layer, nodes) in enumerate(clusters.items()):
        if layer is None:
            lines += [f"  {n}" for n in nodes]
        else:
            lines += [f"  subgraph cluster_{i} {{ label={_quote(layer)}; style=dashed;"]
            lines += [f"    {n}" for n in nodes] + ["  }"]
    lines += [f"  {_quote(e.src)} -> {_quote(e.dst)} "
              f"[label={_quote(si(graph.edge_bytes(e, batch, length), 'B'))}];"
              for e in graph.edges]
    return "\n".join(lines + ["}"]) + "\n"


def dot_svg(dot_text: str, timeout_s: float = 120.0) -> str:
    """Lay DOT text out with Graphviz's `dot` and return the SVG."""
    binary = shutil.which("dot")
    if binary is None:
        raise FileNotFoundError("format 'svg' needs Graphviz's `dot` program, which is not "
                                "on PATH: install Graphviz (Debian/Ubuntu: apt-get install "
                                "graphviz; macOS: brew install graphviz), or use format "
                                "'dot' or 'html'")
    done = subprocess.run([binary, "-Tsvg"], input=dot_text, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dot -Tsvg failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _quote(text: str) -> str:
    """A DOT string literal (a newline becomes DOT's centred line break)."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
