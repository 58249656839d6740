"""Cost annotation on hand-built graphs: FLOPs and bytes match closed forms at fresh shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxscale.contracts.exprs import evaluate
from fxscale.passes import classify as C
from fxscale.passes.costs import annotate_costs
from fxscale.passes.symbols import symbols_of_graph


def capture(fn, *inputs, dynamic_dims=((0, 0), (0, 1))):
    """Dynamo-capture fn(*inputs) with the given (input, dim) pairs symbolic; return costs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for index, dim in dynamic_dims:
        torch._dynamo.mark_dynamic(inputs[index], dim)
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    gm = graphs[0]
    symbols = symbols_of_graph(gm)
    costs = annotate_costs(gm, symbols)
    return symbols, {n.name: c for n, c in costs.items()}, costs


def the(costs, op):
    """The single cost entry of an op name."""
    found = [c for c in costs.values() if c.op == op]
    assert len(found) == 1, [c.op for c in costs.values()]
    return found[0]


def at(symbols, batch, length):
    return symbols.env(batch=batch, length=length)


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 17), (8, 512)])
def test_linear_flops_bytes_params(batch, length):
    lin = torch.nn.Linear(32, 48)
    symbols, costs, _ = capture(lin, torch.randn(2, 5, 32))
    c = the(costs, "linear")
    env = at(symbols, batch, length)
    tokens = batch * length
    assert c.op_class == C.GEMM and c.resource == C.COMPUTE
    assert evaluate(c.flops, env) == 2 * tokens * 32 * 48 + tokens * 48
    assert evaluate(c.bytes_read, env) == 4 * (tokens * 32 + 32 * 48 + 48)
    assert evaluate(c.bytes_written, env) == 4 * tokens * 48
    assert len(c.params) == 2 and not c.mixes_tokens


@pytest.mark.parametrize("batch,length", [(1, 9), (4, 128)])
def test_manual_attention_flops_and_kv_bytes(batch, length):
    heads, dim = 4, 16

    def attention(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) / 4.0
        return torch.matmul(scores.softmax(-1), v)

    q, k, v = (torch.randn(2, heads, 6, dim) for _ in range(3))
    symbols, costs, _ = capture(attention, q, k, v,
                                dynamic_dims=((0, 0), (0, 2), (1, 0), (1, 2), (2, 0), (2, 2)))
    env = {name: (batch if info == "batch" else length) for name, info in symbols.roles.items()}
    matmuls = [c for c in costs.values() if c.op == "matmul"]
    assert [c.op_class for c in matmuls] == [C.ATTENTION, C.ATTENTION]
    for c in matmuls:
        assert evaluate(c.flops, env) == 2 * batch * heads * length * length * dim
        # K for the scores, V for the weighted sum: heads * dim * 4 bytes per token each
        assert evaluate(c.kv_bytes_per_token, env) == heads * dim * 4
    assert the(costs, "softmax").mixes_tokens


@pytest.mark.parametrize("batch,length", [(2, 33), (5, 64)])
def test_sdpa_flops_and_kv_bytes_per_token(batch, length):
    heads, kv_heads, dim = 8, 2, 32

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q = torch.randn(2, heads, 7, dim)
    k, v = torch.randn(2, kv_heads, 7, dim), torch.randn(2, kv_heads, 7, dim)
    symbols, costs, _ = capture(sdpa, q, k, v,
                                dynamic_dims=((0, 0), (0, 2), (1, 0), (1, 2), (2, 0), (2, 2)))
    c = the(costs, "scaled_dot_product_attention")
    env = {name: (batch if role == "batch" else length) for name, role in symbols.roles.items()}
    assert c.op_class == C.ATTENTION and c.resource == C.STATEFUL
    assert evaluate(c.flops, env) == 4 * batch * heads * length * length * dim
    assert evaluate(c.kv_bytes_per_token, env) == 2 * kv_heads * dim * 4


def test_bmm_addmm_einsum_conv_closed_forms():
    w = torch.nn.Parameter(torch.randn(24, 40))
    conv = torch.nn.Conv2d(3, 6, kernel_size=3, padding=1)

    def fn(x, y, img):
        a = torch.bmm(x, y)                       # activations: attention-like
        b = torch.addmm(torch.zeros(40), x[0], w)  # parameter operand: gemm
        e = torch.einsum("bsk,kn->bsn", x, w)
        return a, b, e, conv(img)

    x, y, img = torch.randn(3, 10, 24), torch.randn(3, 24, 10), torch.randn(2, 3, 8, 8)
    symbols, costs, _ = capture(fn, x, y, img, dynamic_dims=())
    env = {}
    assert evaluate(the(costs, "bmm").flops, env) == 2 * 3 * 10 * 10 * 24
    assert the(costs, "bmm").op_class == C.ATTENTION
    addmm = the(costs, "addmm")
    assert addmm.op_class == C.GEMM
    assert evaluate(addmm.flops, env) == 2 * 10 * 40 * 24 + 10 * 40
    assert evaluate(the(costs, "einsum").flops, env) == 2 * 3 * 10 * 24 * 40
    assert the(costs, "einsum").op_class == C.GEMM
    conv_cost = next(c for c in costs.values() if c.op_class == C.CONV)
    assert evaluate(conv_cost.flops, env) == 2 * (2 * 6 * 8 * 8) * 3 * 9 + 2 * 6 * 8 * 8


def test_norm_embedding_and_views():
    emb = torch.nn.Embedding(100, 16)
    norm = torch.nn.LayerNorm(16)

    def fn(ids):
        h = norm(emb(ids))
        return h.view(h.shape[0], -1).transpose(0, 1)

    symbols, costs, _ = capture(fn, torch.randint(0, 100, (2, 5)))
    env = at(symbols, 4, 11)
    e = the(costs, "embedding")
    assert e.op_class == C.EMBEDDING and e.resource == C.MEMORY
    # reads the indices and only the gathered rows, not the whole table
    assert evaluate(e.bytes_read, env) == 4 * 11 * 8 + 4 * 11 * 16 * 4
    n = the(costs, "layer_norm")
    assert n.op_class == C.NORM and evaluate(n.flops, env) == 5 * 4 * 11 * 16
    assert not n.mixes_tokens
    for op in ("view", "transpose"):
        v = the(costs, op)
        assert v.is_view and evaluate(v.bytes_read, env) == 0 and evaluate(v.flops, env) == 0


def test_arithmetic_intensity_grows_with_batch_for_gemm_only():
    def fn(x, w):
        return F.gelu(x @ w)

    w = torch.nn.Parameter(torch.randn(256, 256))
    mod = torch.nn.Module()
    mod.w = w
    symbols, costs, _ = capture(lambda x: fn(x, mod.w), torch.randn(2, 4, 256))
    gemm, act = the(costs, "matmul"), the(costs, "gelu")
    small, large = at(symbols, 1, 1), at(symbols, 64, 64)
    assert gemm.arithmetic_intensity(large) > 20 * gemm.arithmetic_intensity(small)
    assert act.arithmetic_intensity(large) == pytest.approx(act.arithmetic_intensity(small))


class _RotaryBlock(torch.nn.Module):
    """A transformer block in plain PyTorch: rotary queries and keys, a tanh-GELU MLP and
    two residual adds in the block's own forward."""

    def __init__(self, width: int):
        super().__init__()
        self.qk = torch.nn.Linear(width, 2 * width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    @staticmethod
    def rotate(t, cos, sin):
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    def forward(self, x, cos, sin):
        q, k = self.qk(x).chunk(2, -1)
        x = x + F.scaled_dot_product_attention(self.rotate(q, cos, sin),
                                               self.rotate(k, cos, sin), x)
        h = self.up(x)
        h = 0.5 * h * (1 + torch.tanh(0.7978845608 * (h + 0.044715 * h ** 3)))
        return x + self.down(h)


class _RotaryNet(torch.nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_RotaryBlock(width)])
        self.register_buffer("inv_freq", torch.arange(1, width // 2 + 1) / width)

    def forward(self, x, positions):
        angles = positions[..., None].float() * self.inv_freq
        angles = torch.cat((angles, angles), -1)
        x = x * 2.0  # a pointwise op no rule names
        for block in self.blocks:
            x = block(x, angles.cos(), angles.sin())
        return x


def test_pointwise_chains_are_told_apart_by_the_kernel_they_become():
    """Rotary, activation and residual-add kernels run at 2x different speeds on a GPU
    (docs/devices.md): the costs name which one each pointwise op belongs to, and a group's
    class costs move each fused chain's boundary tensors once."""
    from fxscale.compiler.analysis import class_costs

    x, positions = torch.randn(2, 5, 16), torch.arange(5).repeat(2, 1)
    symbols, by_name, costs = capture(_RotaryNet(), x, positions,
                                      dynamic_dims=((0, 0), (0, 1), (1, 0), (1, 1)))
    kernels = {}
    for c in by_name.values():
        if c.op_class == C.POINTWISE:
            kernels.setdefault(c.kernel, set()).add((c.op, c.module))
    assert {op for op, _ in kernels[C.ROTARY]} >= {"cos", "sin", "neg", "mul", "add"}
    assert {op for op, _ in kernels[C.ACTIVATION]} == {"mul", "add", "pow", "tanh"}
    assert kernels[C.RESIDUAL] == {("add", "blocks.0")}  # both adds of the block
    assert [c.op for c in by_name.values() if c.op == "add" and c.kernel == C.RESIDUAL] \
        == ["add", "add"]
    assert kernels[""] == {("mul", "")}  # x * 2.0 at the top: plain pointwise
    parts = class_costs(list(costs), costs)
    assert set(parts) >= {C.ROTARY, C.ACTIVATION, C.RESIDUAL, C.GEMM, C.ATTENTION}
    env = symbols.env(batch=3, length=7)
    tokens = 3 * 7
    # the GELU chain reads the up projection once and writes its result once (fp32)
    assert evaluate(parts[C.ACTIVATION]["bytes"], env) == 2 * tokens * 64 * 4
    # each residual add reads two tensors and writes one: not fused with the other
    assert evaluate(parts[C.RESIDUAL]["bytes"], env) == 2 * 3 * tokens * 16 * 4
