"""The architecture holds: stages import one way, no module imports itself back through others,
the planning and simulation stages never touch torch, and no folder grows past 16 modules.

The graph is read from the source (imports inside functions included), so it covers what an
import at run time would only show on the path that runs."""
from __future__ import annotations

import ast
import pathlib

import networkx as nx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# folder -> the package it is installed as (pyproject's package-dir)
ROOTS = {"fxscale": "fxscale", "passes": "fxscale.passes", "runtime": "fxscale.runtime"}
# Stages, lowest first: a module may import its own stage and lower ones, never a higher one.
LAYERS = {
    "fxscale.contracts": 0,
    "fxscale.passes": 1, "fxscale.kernels": 1, "fxscale.runtime.devices": 1,
    "fxscale.runtime.traces": 1, "fxscale.runtime.scheduling": 1,
    "fxscale.runtime.executors": 1,
    "fxscale.compiler": 2, "fxscale.runtime.planner": 2,
    "fxscale.runtime.autoscaling": 3, "fxscale.export": 3, "fxscale.runtime.engine": 3,
    # the simulator drives the live autoscaler in simulated time
    "fxscale.profiling": 4, "fxscale.serving": 4, "fxscale.runtime.simulator": 4,
    "fxscale.models": 5, "fxscale.reporting": 5,
    "fxscale.studies": 6,
    "fxscale.cli": 7,
}
TORCH_FREE = ("fxscale.contracts", "fxscale.runtime.devices", "fxscale.runtime.traces",
              "fxscale.runtime.planner", "fxscale.runtime.simulator",
              "fxscale.runtime.scheduling", "fxscale.runtime.autoscaling")
MAX_MODULES = 16
# the package roots: their __init__ files load public names lazily (by string), above all stages
TOPS = {"fxscale", "fxscale.__main__", "fxscale.runtime"}


def modules_of(root: pathlib.Path, roots: dict[str, str]) -> dict[str, pathlib.Path]:
    """Module name -> file, for every .py file under the given roots."""
    out = {}
    for folder, package in roots.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def import_graph(root: pathlib.Path, roots: dict[str, str]) -> tuple[nx.DiGraph, dict]:
    """Project module -> project modules it imports (anywhere in the file), and per module
    the external top-level packages it imports."""
    modules = modules_of(root, roots)
    graph, external = nx.DiGraph(), {}
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        external[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]  # a module, or a name in one
            else:
                continue
            for target in targets:
                found = target
                while found and found not in modules:
                    found = found.rpartition(".")[0]
                if found and found != name:
                    graph.add_edge(name, found)
                elif not found:
                    external[name].add(target.split(".")[0])
    return graph, external


def stage(module: str, layers: dict[str, int]) -> str | None:
    """The stage a module belongs to (the longest matching prefix)."""
    matches = [p for p in layers if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def violations(graph: nx.DiGraph, external: dict, layers: dict[str, int],
               torch_free: tuple[str, ...], tops: set[str]) -> list[str]:
    """Every broken rule, one line each."""
    problems = [f"import cycle: {' -> '.join(c + c[:1])}" for c in nx.simple_cycles(graph)]
    for src, dst in graph.edges:
        if src in tops or dst in tops:
            continue
        a, b = stage(src, layers), stage(dst, layers)
        if a is None or b is None:
            problems.append(f"{src if a is None else dst} is in no stage")
        elif a != b and layers[b] >= layers[a]:
            problems.append(f"{src} ({a}, layer {layers[a]}) imports {dst} "
                            f"({b}, layer {layers[b]})")
    for module, packages in external.items():
        if "torch" in packages and any(stage(module, layers) == s for s in torch_free):
            problems.append(f"{module} imports torch, but {stage(module, layers)} is torch-free")
    return problems


def test_stages_import_one_way_without_cycles_and_planning_stays_torch_free():
    graph, external = import_graph(REPO, ROOTS)
    assert graph.number_of_nodes() > 60  # the whole project was read
    assert violations(graph, external, LAYERS, TORCH_FREE, TOPS) == []


def test_only_the_ray_executor_imports_ray():
    """Ray is an optional extra: the Ray executor and its compiled-graph path import it,
    nothing but the executor imports the second, and nothing imports the executor but the
    server (lazily, for backend="ray"), the Ray benchmark (lazily) and the tests."""
    graph, external = import_graph(REPO, ROOTS)
    executor, compiled = ("fxscale.runtime.executors.ray_executor",
                          "fxscale.runtime.executors.compiled_graph")
    assert {m for m, packages in external.items() if "ray" in packages} == {executor, compiled}
    assert set(graph.predecessors(compiled)) == {executor}
    assert set(graph.predecessors(executor)) == \
        {"fxscale.serving.server", "fxscale.studies.ray_bench", "fxscale.studies.bench_families"}


def test_torch_free_stages_import_without_torch():
    """The same rule by a real import, which also follows what their imports import."""
    import subprocess
    import sys

    modules = [m for m in modules_of(REPO, ROOTS) if stage(m, LAYERS) in TORCH_FREE]
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_folder_holds_more_than_sixteen_modules():
    counts: dict[pathlib.Path, int] = {}
    for path in modules_of(REPO, ROOTS).values():
        if path.name != "__init__.py":
            counts[path.parent] = counts.get(path.parent, 0) + 1
    assert {str(p.relative_to(REPO)): n for p, n in counts.items() if n > MAX_MODULES} == {}


@pytest.mark.parametrize("bad,message", [
    ("from pkg.high import thing", "pkg.low.a (pkg.low, layer 0) imports pkg.high"),
    ("def later():\n    from pkg.low import b", "import cycle"),  # inside a function: found too
    ("import torch", "pkg.low.a imports torch"),
])
def test_the_checker_finds_a_bad_import(tmp_path, bad, message):
    """A synthetic two-stage package, once clean and once with one bad import added."""
    for name, text in {"pkg/__init__.py": "", "pkg/low/__init__.py": "",
                       "pkg/low/a.py": "X = 1\n", "pkg/low/b.py": "from pkg.low import a\n",
                       "pkg/high/__init__.py": "", "pkg/high/thing.py": "from pkg.low import a\n"
                       }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    layers, roots = {"pkg.low": 0, "pkg.high": 1}, {"pkg": "pkg"}
    assert violations(*import_graph(tmp_path, roots), layers, ("pkg.low",), {"pkg"}) == []
    (tmp_path / "pkg/low/a.py").write_text(f"X = 1\n{bad}\n")
    found = violations(*import_graph(tmp_path, roots), layers, ("pkg.low",), {"pkg"})
    assert any(message in line for line in found), found
