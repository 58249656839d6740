"""GroupGraph: JSON round trip, readable table, clear errors on bad files."""
from __future__ import annotations

import json

import pytest
from helpers import assert_bad_file_names_the_field

import fxscale
from fxscale import GroupGraph
from fxscale.contracts.errors import InputError
from fxscale.contracts.exprs import evaluate
from fxscale.contracts.group_graph import SCHEMA_VERSION, Experts
from fxscale.models import zoo


@pytest.fixture(scope="module")
def graph():
    entry = zoo.build("llama")
    return fxscale.explain(entry.model, *entry.args)


def test_json_round_trip(graph, tmp_path):
    path = tmp_path / "groups.json"
    graph.to_json(path)
    loaded = GroupGraph.from_json(path)
    assert loaded == graph
    assert GroupGraph.from_json(graph.to_json()) == graph
    for g in graph.groups:
        assert loaded.cost(g.id, "flops", batch=7, length=300) == graph.cost(g, "flops", 7, 300)
    data = json.loads(path.read_text())
    assert data["version"] == SCHEMA_VERSION and "callable" not in data["groups"][0]


def test_groups_carry_costs_per_class_and_a_version_1_file_still_reads(graph, tmp_path):
    gemm = next(g for g in graph.groups if g.classes[0] == "gemm")
    assert set(gemm.class_costs) >= {"gemm", "norm"}
    env = graph.env(4, 64)
    parts = sum(evaluate(c["flops"], env) for c in gemm.class_costs.values())
    assert parts == pytest.approx(graph.cost(gemm, "flops", 4, 64))  # split by class, none lost
    moved = graph.bytes_moved(gemm, 4, 64)
    fused = sum(evaluate(c["bytes"], env) for c in gemm.class_costs.values())
    assert 0 < fused < moved  # a fused norm or pointwise chain moves less than its ops add up
    data = graph.to_dict()
    data["version"] = 1
    for g in data["groups"]:
        del g["class_costs"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    old = GroupGraph.from_json(path)
    assert old.version == 1 and all(g.class_costs == {} for g in old.groups)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_fused_classes_never_move_more_than_their_ops(name):
    """Per group, the class costs (fused chains moving their boundary tensors once) move at
    most what the group's ops read and write, at one token and at many; a chain of views
    launches no kernel, so Mixtral's expert weights, transposed for the grouped GEMM, are
    read once (by the GEMM), not again by the views."""
    entry = zoo.build(name)
    graph = fxscale.explain(entry.model, *entry.args)
    for batch, length in ((1, 1), (4, 64)):
        env = graph.env(batch, length)
        for g in graph.groups:
            fused = sum(evaluate(c["bytes"], env) for c in g.class_costs.values())
            assert fused <= graph.bytes_moved(g, batch, length) * (1 + 1e-9), g.name
    experts = [g for g in graph.groups if "moe-expert" in g.classes]
    assert len(experts) == (len(entry.model.model.layers) if name == "mixtral" else 0)
    assert GroupGraph.from_json(graph.to_json()) == graph
    for g in experts:  # 4 experts, 2 per token (the zoo's Mixtral), their weights told
        layer = entry.model.model.layers[int(g.layer.rsplit(".", 1)[1])].mlp.experts
        weights = sum(p.numel() * p.element_size() for p in layer.parameters())
        assert g.experts == Experts(4, 2, weights) and g.param_bytes == weights
        env = graph.env(1, 1)
        assert evaluate(g.class_costs["moe-expert"]["bytes"], env) > g.param_bytes
        views = g.class_costs.get("data-movement", {"bytes": "0"})
        assert evaluate(views["bytes"], env) < g.param_bytes / 10


def test_table_lists_every_group(graph):
    text = graph.table(batch=4, length=64)
    for g in graph.groups:
        assert g.id in text
    assert "batch=4" in text and "length=64" in text
    assert "stateful" in text and "row-wise" in text


def _first(d):
    return d["groups"][0]


def _symbol(d):
    return next(iter(d["symbols"]))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("groups"), "missing field 'groups'"),
    (lambda d: d.update(groups=[]), "field 'groups' must not be empty"),
    (lambda d: d.update(version=99), "field 'version' is 99"),
    (lambda d: _first(d)["class_costs"].update(gemm={"flops": "1"}),
     r"missing field 'groups\[0\].class_costs.gemm.bytes'"),
    (lambda d: _first(d)["class_costs"].update(gemm={"flops": "-1", "bytes": "1"}),
     r"'groups\[0\].class_costs.gemm.flops' is negative"),
    (lambda d: _first(d).update(flops="2*(("), r"field 'groups\[0\].flops' is not a cost"),
    (lambda d: _first(d).update(flops=None), r"'groups\[0\].flops' must be a string, got null"),
    (lambda d: _first(d).update(flops=f"{_symbol(d)}*zz"), r"unknown shape symbol\(s\) \['zz'\]"),
    (lambda d: _first(d).update(flops=f"-5*{_symbol(d)}"), r"'groups\[0\].flops' is negative"),
    (lambda d: _first(d).pop("resource"), r"missing field 'groups\[0\].resource'"),
    (lambda d: _first(d).update(name=7), r"'groups\[0\].name' must be a string"),
    (lambda d: _first(d).update(param_bytes=-1), r"'groups\[0\].param_bytes' must be >= 0"),
    (lambda d: _first(d).update(colour="red"), r"unknown field\(s\) \['groups\[0\].colour'\]"),
    (lambda d: _first(d).update(experts={"count": 4, "per_token": 8, "weight_bytes": 1}),
     r"'groups\[0\].experts.per_token' must be at most the count \(4\), got 8"),
    (lambda d: _first(d).update(experts={"count": 0, "per_token": 1, "weight_bytes": 1}),
     r"'groups\[0\].experts.count' must be >= 1"),
    (lambda d: _first(d).update(param_bytes=10,
                                experts={"count": 2, "per_token": 1, "weight_bytes": 11}),
     r"'groups\[0\].experts.weight_bytes' must be at most the group's param_bytes"),
    (lambda d: d["groups"][1].update(id=d["groups"][0]["id"]), r"duplicate group id\(s\) \['g0'\]"),
    (lambda d: d["edges"][0].update(dst="g999"), r"'edges\[0\].dst' names no group: 'g999'"),
    (lambda d: d["edges"].append({"src": d["edges"][0]["dst"], "dst": d["edges"][0]["src"],
                                  "bytes": "1"}), "form a cycle"),
    (lambda d: d.update(symbols=[_symbol(d)]),
     "field 'symbols' must be a JSON object, got an array"),
    (lambda d: d["symbols"][_symbol(d)].update(role="width"),
     r"'symbols\.\w+\.role' must be one of"),
])
def test_bad_files_name_the_field(graph, tmp_path, mutate, message):
    assert_bad_file_names_the_field(GroupGraph.from_json, graph.to_dict(), mutate, message,
                                    tmp_path)


def test_nan_is_not_a_json_number(graph, tmp_path):
    path = tmp_path / "nan.json"
    path.write_text(graph.to_json().replace('"param_bytes": 0', '"param_bytes": NaN', 1))
    with pytest.raises(InputError, match="NaN is not a JSON number"):
        GroupGraph.from_json(path)


def test_not_json_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"version": 1,\n  "groups": [}')
    with pytest.raises(ValueError, match=r"line 2, column"):
        GroupGraph.from_json(path)


def test_unknown_cost_and_group_are_clear_errors(graph):
    with pytest.raises(ValueError, match="unknown cost 'watts'"):
        graph.cost("g0", "watts")
    with pytest.raises(KeyError, match="no group 'g999'"):
        graph.cost("g999", "flops")
