"""Convexity of partitions: property tests on random DAGs, and repair before split_module."""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from fxscale.passes.convexity import ensure_convex, graph_dag, is_convex_partition
from fxscale.passes.split import number_groups, split_groups


@st.composite
def dag_and_partition(draw):
    """A random DAG (edges only from lower to higher index) and a random labelling of its nodes."""
    n = draw(st.integers(min_value=1, max_value=24))
    edges = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n))
    dag = nx.DiGraph()
    dag.add_nodes_from(range(n))
    dag.add_edges_from((a, b) for a, b in edges if a < b)
    parts = draw(st.integers(min_value=1, max_value=max(1, n // 2)))
    labels = draw(st.lists(st.integers(0, parts - 1), min_size=n, max_size=n))
    return dag, dict(enumerate(labels))


@settings(max_examples=300, deadline=None)
@given(dag_and_partition())
def test_repair_gives_acyclic_refinement(case):
    dag, part = case
    repaired, notes = ensure_convex(dag, part)
    assert is_convex_partition(dag, repaired)
    # a refinement: nodes that share a repaired part shared an original part
    for a in dag.nodes:
        for b in dag.nodes:
            if repaired[a] == repaired[b]:
                assert part[a] == part[b]
    if is_convex_partition(dag, part):
        assert repaired == part and notes == []
    else:
        assert notes


@settings(max_examples=100, deadline=None)
@given(dag_and_partition())
def test_every_part_is_convex_after_repair(case):
    dag, part = case
    repaired, _ = ensure_convex(dag, part)
    for label in set(repaired.values()):
        members = {n for n in dag.nodes if repaired[n] == label}
        for a in members:
            for b in members:
                for path in nx.all_simple_paths(dag, a, b, cutoff=6):
                    assert all(repaired[p] == label for p in path)


def test_non_convex_request_is_repaired_before_split_module():
    def fn(x):
        a = x.sin()
        b = a.cos()   # in another group: a -> b -> c leaves group 0 and comes back
        c = b + a
        return c.relu()

    gm = fx.symbolic_trace(fn)
    order = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    request = {order[0]: 0, order[1]: 1, order[2]: 0, order[3]: 0}
    dag = graph_dag(gm)
    assert not is_convex_partition(dag, request)
    repaired, notes = ensure_convex(dag, request)
    assert is_convex_partition(dag, repaired) and notes
    split = split_groups(gm, number_groups(order, repaired))
    x = torch.randn(5)
    torch.testing.assert_close(split(x), fn(x))
    assert len([n for n in split.graph.nodes if n.op == "call_module"]) == 3
