"""`fxscale.report`: one self-contained HTML page of a model's operator groups (or the grouped
graph as Graphviz DOT or SVG), with a plan, a profile and a run's timelines when given."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fxscale.contracts.errors import InputError
from fxscale.contracts.group_graph import GroupGraph
from fxscale.contracts.jsonio import output_file, read_json, write_atomic
from fxscale.contracts.plan import Plan
from fxscale.reporting.details import Facts
from fxscale.reporting.dot import dot_svg, to_dot
from fxscale.reporting.html import page
from fxscale.reporting.layout import layout
from fxscale.reporting.run import load_runs

FORMATS = ("html", "dot", "svg")


def report(model_or_graph: Any, path: str | Path, *example_inputs: Any, plan: Any = None,
           run: Any = None, profile: Any = None, format: str = "html",
           batch: int | None = None, length: int | None = None) -> Path:
    """Write the report of a model's operator groups to `path` and return the path.

    `model_or_graph`: a GroupGraph, a path to its JSON, or a model (plain, torch.compile'd or
    on the meta device) captured with `example_inputs` through `fxscale.explain`. `plan`: a
    runtime.planner.Plan, its dict or JSON path; `profile`: a Profile (`fxscale.profile`), its
    dict or JSON path; `run`: a simulator Result, a run dict or JSON path (schema in
    docs/report.md). Costs are shown at (batch, length), the capture's example shape by default.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    for name, value in (("batch", batch), ("length", length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    out = output_file(path, "report")
    graph = load_graph(model_or_graph, example_inputs)
    if format == "html":
        plan_obj, profile_obj = _plan(plan), _profile(profile)
        _same_groups(graph, plan_obj, profile_obj)
        runs = load_runs(*_read(run, "run")) if run is not None else []
        facts = Facts(graph, plan_obj, profile_obj, runs, batch, length)
        text = page(graph, layout(graph), facts, plan_obj, runs, shape_text(graph, batch, length))
    else:
        given = [name for name, v in (("plan", plan), ("run", run), ("profile", profile))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: shown in format 'html' only, not {format!r}")
        text = to_dot(graph, batch, length)
        text = dot_svg(text) if format == "svg" else text
    write_atomic(out, text)
    return out


def load_graph(model_or_graph: Any, example_inputs: tuple = ()) -> GroupGraph:
    """A GroupGraph as given, read from its JSON file, or captured from a model."""
    if isinstance(model_or_graph, (GroupGraph, str, Path)):
        if example_inputs:
            raise ValueError("example inputs are for capturing a model; a GroupGraph (or its "
                             "JSON) needs none")
        if isinstance(model_or_graph, GroupGraph):
            return model_or_graph
        return GroupGraph.from_dict(*_read(model_or_graph, "graph"))
    if not callable(model_or_graph):
        raise ValueError("pass a GroupGraph, a path to its JSON (fxscale explain --json) or a "
                         f"model with example inputs, not a {type(model_or_graph).__name__}")
    if not example_inputs:
        raise ValueError("a model needs example inputs to be captured: "
                         "fxscale.report(model, path, *example_inputs)")
    from fxscale.compiler.capture import explain

    return explain(model_or_graph, *example_inputs)


def shape_text(graph: GroupGraph, batch: int | None, length: int | None) -> str:
    """The shape costs are shown at, e.g. 'batch=2, length=128 (the capture's example)'."""
    env = graph.env(batch, length)
    parts = [f"{info['role']}={env[name]}" for name, info in graph.symbols.items()
             if info.get("role") in ("batch", "length", "context")]
    default = " (the capture's example shape)" if batch is None and length is None else ""
    return (", ".join(parts) or "static shapes") + default


def _same_groups(graph: GroupGraph, plan: Any, profile: Any) -> None:
    """A plan or profile must describe this graph's groups (a plan of another model would
    draw numbers on the wrong blocks)."""
    ids, names = {g.id for g in graph.groups}, {g.name for g in graph.groups}
    shown = (f"(it has {len(ids)} groups, {graph.groups[0].id} to {graph.groups[-1].id}); "
             "was it made for another model?")
    for i, row in enumerate(plan.groups if plan is not None else []):
        if row.group not in ids:
            raise InputError(f"plan: field 'groups[{i}].group' is {row.group!r}, a group "
                             f"this graph does not have {shown}")
    for i, group in enumerate(profile.groups if profile is not None else []):
        if group.group not in ids and group.name not in names:
            raise InputError(f"profile: field 'groups[{i}]' ({group.group} {group.name!r}) "
                             f"matches no group of this graph by id or name {shown}")


def _read(value: Any, name: str) -> tuple[Any, str]:
    """(data, where) of an input given as a JSON file path, or as an object already."""
    if not isinstance(value, (str, Path)):
        return value, name
    if not Path(value).exists():
        raise FileNotFoundError(f"{name}: no such file {str(value)!r}")
    return read_json(Path(value))


def _plan(value: Any):
    """A Plan from a Plan, its dict or its JSON file (None stays None)."""
    return value if value is None or isinstance(value, Plan) else Plan.from_dict(
        *_read(value, "plan"))


def _profile(value: Any):
    """A runtime.profile.Profile from a Profile, its dict or its JSON file."""
    from fxscale.contracts.profile import Profile

    return value if value is None or isinstance(value, Profile) else Profile.from_dict(
        *_read(value, "profile"))
