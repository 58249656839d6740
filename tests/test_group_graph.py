"""GroupGraph: JSON round trip, readable table, clear errors on bad files."""
from __future__ import annotations

import json

import pytest

import fxscale
from fxscale import GroupGraph, zoo
from helpers import assert_bad_file_names_the_field


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
    assert data["version"] == 1 and "callable" not in data["groups"][0]


def test_table_lists_every_group(graph):
    text = graph.table(batch=4, length=64)
    for g in graph.groups:
        assert g.id in text
    assert "batch=4" in text and "length=64" in text
    assert "stateful" in text and "row-wise" in text


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("groups"), "malformed GroupGraph"),
    (lambda d: d.update(version=99), "field 'version' is 99"),
    (lambda d: d["groups"][0].update(flops="2*(("), "field 'flops'"),
    (lambda d: d["groups"][0].pop("resource"), "resource"),
])
def test_bad_files_name_the_field(graph, tmp_path, mutate, message):
    assert_bad_file_names_the_field(GroupGraph.from_json, graph.to_dict(), mutate, message,
                                    tmp_path)


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
