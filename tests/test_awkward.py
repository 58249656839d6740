"""Awkward graphs: correct results (with a warning where a part falls back), never a crash."""
from __future__ import annotations

import warnings

import pytest
import torch

import fxscale

EAGER = {"lowering": "eager"}


def compile_fx(model, options=None, compiler=None):
    """torch.compile with the fxscale backend (its handle, when given, keeps the graphs)."""
    return torch.compile(model, backend=compiler or fxscale.Backend(options or EAGER))


class Branchy(torch.nn.Module):
    """Data-dependent control flow: Dynamo breaks the graph at the `if`."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x).relu()
        if y.sum() > 0:
            return self.b(y) * 2
        return self.b(y) - 1


class InplaceOnInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        x.add_(1.0)
        return self.lin(x).softmax(-1)


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class WithAutogradFunction(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(Square.apply(self.lin(x)))


@torch.library.custom_op("fxscale_test::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _(x, scale):
    return torch.empty_like(x)


class WithCustomOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(scaled_tanh(self.lin(x), 0.5))


class TwoIndependentBranches(torch.nn.Module):
    """No tensor crosses a group boundary: two heads that share nothing but the input."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, ids, x):
        return self.emb(ids).sum(-1), self.lin(x)


class SingleOp(torch.nn.Module):
    def forward(self, x):
        return x.relu()


CASES = [
    (Branchy, lambda: (torch.randn(4, 8),)),
    (InplaceOnInput, lambda: (torch.randn(4, 8),)),
    (WithAutogradFunction, lambda: (torch.randn(4, 8),)),
    (WithCustomOp, lambda: (torch.randn(4, 8),)),
    (TwoIndependentBranches, lambda: (torch.randint(0, 32, (4, 6)), torch.randn(4, 8))),
    (SingleOp, lambda: (torch.randn(4, 8),)),
]


def assert_matches_eager(make, inputs, options, tol):
    """Fresh inputs, twice: the compiled model's outputs equal the eager model's."""
    model = make().eval()
    compiled = compile_fx(model, options)
    for _ in range(2):
        args = inputs()
        expected = model(*[a.clone() for a in args])
        actual = compiled(*[a.clone() for a in args])
        for e, a in zip(torch.utils._pytree.tree_leaves(expected),
                        torch.utils._pytree.tree_leaves(actual)):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("granularity", ["operator", "node"])
@pytest.mark.parametrize("make,inputs", CASES, ids=[c[0].__name__ for c in CASES])
def test_awkward_graph_matches_eager(make, inputs, granularity):
    assert_matches_eager(make, inputs, {"lowering": "eager", "granularity": granularity}, 1e-6)


@pytest.mark.inductor
@pytest.mark.parametrize("make,inputs", CASES, ids=[c[0].__name__ for c in CASES])
def test_awkward_graph_with_inductor_lowering(make, inputs):
    """Inductor compiles the groups (or a group falls back with a warning): never wrong."""
    assert_matches_eager(make, inputs, {"lowering": "inductor"}, 1e-5)


def test_inplace_on_input_mutates_like_eager():
    model = InplaceOnInput().eval()
    x = torch.randn(4, 8)
    x_eager, x_compiled = x.clone(), x.clone()
    model(x_eager)
    compile_fx(model)(x_compiled)
    torch.testing.assert_close(x_compiled, x_eager)


def test_graph_break_gives_one_group_graph_per_graph():
    compiler = fxscale.Backend(EAGER)
    compile_fx(Branchy().eval(), compiler=compiler)(torch.randn(4, 8))
    assert len(compiler.group_graphs) >= 2


@pytest.mark.inductor
def test_inductor_failure_falls_back_to_eager_with_warning(monkeypatch):
    """A group Inductor cannot compile runs eagerly, named in a warning; results stay exact."""
    import torch._inductor.compile_fx as inductor

    real = inductor.compile_fx

    def failing_on_softmax(gm, example_inputs, **kwargs):
        if any("softmax" in str(n.target) for n in gm.graph.nodes):
            raise RuntimeError("no kernel for softmax (simulated)")
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", failing_on_softmax)
    model = InplaceOnInput().eval()
    x = torch.randn(4, 8)
    expected = model(x.clone())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiler = fxscale.Backend({"granularity": "node"})
        actual = compile_fx(model, compiler=compiler)(x.clone())
    messages = [str(w.message) for w in caught if "fxscale" in str(w.message)]
    assert any("runs eagerly" in m and "softmax" in m for m in messages), messages
    graph = compiler.group_graphs[-1]
    assert any(g.lowering.startswith("eager (fallback") for g in graph.groups)
    assert any(g.lowering == "inductor" for g in graph.groups)
    torch.testing.assert_close(actual, expected)


def test_analysis_failure_runs_whole_graph_eagerly(monkeypatch):
    import fxscale.compiler.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("simulated analysis bug")

    monkeypatch.setattr(pipeline, "group_nodes", broken)  # what the grouping step calls
    model = SingleOp()
    x = torch.randn(3, 3)
    with pytest.warns(UserWarning, match="could not group this graph.*simulated analysis bug"):
        out = compile_fx(model)(x)
    torch.testing.assert_close(out, x.relu())
