"""Cost annotation pass: per node op class, FLOPs, bytes, parameters and KV-cache bytes per token.

Costs are sympy expressions over the graph's shape symbols, so they can be evaluated at any
(batch, length) later without re-tracing. The formulas are documented in docs/costs.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from fxscale.contracts.exprs import evaluate
from fxscale.passes import classify as C
from fxscale.passes.node_facts import (
    COMPUTE_OPS,
    input_nodes,
    is_parameter_placeholder,
    is_weight_placeholder,
    layer_of,
    module_path,
    module_type_name,
    nbytes_expr,
    node_value,
    numel_expr,
    op_name,
    shape_exprs,
    tensors_in,
)
from fxscale.passes.symbols import SymbolTable

ZERO = sympy.Integer(0)
# FLOPs per output element of ops that are more than one arithmetic op per element.
NORM_FLOPS_PER_ELEMENT = 5
SOFTMAX_FLOPS_PER_ELEMENT = 5
LAYOUT_OPS = frozenset({"view", "reshape", "transpose", "permute", "flatten", "unflatten",
                        "unsqueeze", "squeeze", "expand", "contiguous", "to", "type", "float",
                        "half", "bfloat16", "double", "t", "view_as", "reshape_as", "expand_as",
                        "movedim", "swapaxes", "detach", "clone", "type_as", "dropout",
                        "identity", "as_strided"})
ROW_SELECTING_OPS = frozenset({"getitem", "slice", "select", "narrow", "index", "index_select",
                               "gather", "cat", "concat", "stack", "split", "chunk", "unbind",
                               "masked_select", "repeat", "tile", "repeat_interleave", "pad"})


@dataclass
class NodeCost:
    """What one node costs and what kind of operator it is."""

    name: str
    op: str
    op_class: str
    resource: str
    flops: sympy.Expr = ZERO
    bytes_read: sympy.Expr = ZERO
    bytes_written: sympy.Expr = ZERO
    out_bytes: sympy.Expr = ZERO
    kv_bytes_per_token: sympy.Expr = ZERO
    params: frozenset[str] = frozenset()
    layer: str | None = None
    module: str = ""
    is_tensor: bool = True
    is_view: bool = False
    reads_input: bool = False
    weight_like: bool = False
    mixes_tokens: bool = False
    kernel: str = ""  # the kernel a pointwise chain becomes (classify.ROTARY, ...), if told apart

    @property
    def bytes_total(self) -> sympy.Expr:
        """Bytes read plus bytes written."""
        return self.bytes_read + self.bytes_written

    def arithmetic_intensity(self, env: dict[str, int]) -> float:
        """FLOPs per byte moved at the given symbol values."""
        moved = evaluate(self.bytes_total, env)
        return evaluate(self.flops, env) / moved if moved else 0.0


def annotate_costs(gm: fx.GraphModule, symbols: SymbolTable) -> dict[fx.Node, NodeCost]:
    """Annotate every compute node of a Dynamo graph with its class and symbolic costs."""
    weights: dict[fx.Node, frozenset[str]] = {}
    parameters: set[fx.Node] = set()
    reads_input: dict[fx.Node, bool] = {}
    costs: dict[fx.Node, NodeCost] = {}
    tokens = symbols.token_symbols()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            if is_weight_placeholder(node):
                weights[node] = frozenset({node.name})
                if is_parameter_placeholder(node, gm):
                    parameters.add(node)
            else:
                reads_input[node] = isinstance(node_value(node), torch.Tensor)
            continue
        if node.op not in COMPUTE_OPS:
            continue
        inputs = input_nodes(node)
        reads_input[node] = any(reads_input.get(i, False) for i in inputs)
        roots = frozenset().union(*(weights.get(i, frozenset()) for i in inputs))
        tensor_inputs = [i for i in inputs if isinstance(node_value(i), torch.Tensor)]
        if tensor_inputs and all(i in weights for i in tensor_inputs):
            weights[node] = roots  # a view or transform of weights only: still a weight
        cost = _node_cost(gm, node, reads_input, weights, parameters, tokens)
        cost.params = roots
        cost.weight_like = node in weights
        costs[node] = cost
    _mark_kv_cache(costs)
    _mark_pointwise_kernels(costs)
    return costs


def _node_cost(gm, node, reads_input, weights, parameters, tokens) -> NodeCost:
    """Cost of one compute node from its fake-tensor inputs and output."""
    name = op_name(node, gm)
    path = module_path(node)
    out = node_value(node)
    out_tensors = list(tensors_in(out))
    in_values = [(i, node_value(i)) for i in input_nodes(node)]
    in_tensors = [v for _, v in in_values if isinstance(v, torch.Tensor)]
    op_class = C.classify_op(name, module_type_name(node)) if out_tensors else C.SCALAR
    is_view = bool(out_tensors) and all(_is_view(t) for t in out_tensors) and op_class in (
        C.DATA_MOVEMENT, C.POINTWISE)
    cost = NodeCost(name=node.name, op=name, op_class=op_class, resource=C.MEMORY,
                    layer=layer_of(path), module=path, is_tensor=isinstance(out, torch.Tensor),
                    is_view=is_view, reads_input=reads_input.get(node, False))
    out_bytes = sum((nbytes_expr(t) for t in out_tensors), ZERO)
    cost.out_bytes = out_bytes
    if op_class == C.SCALAR:
        return cost
    if op_class == C.GEMM:
        operand_reads = [reads_input.get(i, False) for i, v in in_values
                         if isinstance(v, torch.Tensor)]
        param_names = {p.name for p in parameters}
        param_operand = any(weights.get(i, frozenset()) & param_names for i, _ in in_values)
        if len(operand_reads) >= 2 and all(operand_reads[-2:]):
            op_class = C.ATTENTION  # activation x activation: scores or attention-weighted values
        elif not param_operand or not any(operand_reads):
            op_class = C.POINTWISE  # a product of constants/buffers (e.g. rotary frequencies)
        cost.op_class = op_class
    cost.resource = C.resource_of(op_class)
    if not is_view:
        cost.bytes_written = out_bytes
        cost.bytes_read = _read_bytes(name, in_tensors, out_tensors)
    cost.flops = _flops(node, name, op_class, in_values, out_tensors)
    if op_class == C.ATTENTION:
        cost.kv_bytes_per_token = _kv_bytes_per_token(node, name, in_tensors)
    cost.mixes_tokens = _mixes_tokens(node, name, op_class, in_tensors, out_tensors, tokens)
    return cost


def _is_view(t: torch.Tensor) -> bool:
    """Whether a (fake) tensor aliases another tensor's storage."""
    try:
        return bool(t._is_view())
    except RuntimeError:
        return False


def _read_bytes(name: str, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> sympy.Expr:
    """Bytes a node reads: every input once; an embedding reads only the rows it gathers;
    paged attention reads the blocks its sequences' tables name, not the whole cache."""
    if name in C.PAGED_ATTENTION_OPS:
        q, new, cache, tables, meta = _paged_operands(name, ins)
        return sum((nbytes_expr(t) for t in [q, *new, *meta]), ZERO) + \
            2 * _kv_slot_bytes(cache) * _paged_context(cache, tables) * shape_exprs(tables)[0]
    if name in C.EMBEDDING_OPS and len(ins) >= 2:
        indices = ins[0]
        gathered = sum((nbytes_expr(t) for t in outs), ZERO)
        return nbytes_expr(indices) + gathered
    return sum((nbytes_expr(t) for t in ins), ZERO)


def _flops(node, name, op_class, in_values, outs) -> sympy.Expr:
    """Closed-form FLOPs of a node (documented in docs/costs.md)."""
    ins = [v for _, v in in_values if isinstance(v, torch.Tensor)]
    out_numel = sum((numel_expr(t) for t in outs), ZERO)
    if op_class in (C.GEMM, C.ATTENTION) and name in C.MATMUL_OPS:
        return _matmul_flops(node, name, ins, out_numel)
    if op_class == C.MOE_EXPERT and ins:
        return 2 * out_numel * shape_exprs(ins[0])[-1]  # every token meets its expert's weight
    if name in C.PAGED_ATTENTION_OPS:
        q, _, cache, tables, _ = _paged_operands(name, ins)
        tokens, heads, dim = shape_exprs(q)
        # every query token against at most the table's blocks: QK^T and PV, 2 + 2 FLOPs each
        return 4 * tokens * heads * dim * _paged_context(cache, tables)
    if name in C.ATTENTION_OPS and len(ins) >= 3:
        q, k, v = (shape_exprs(t) for t in ins[:3])
        heads = sympy.Mul(*q[:-2])
        # QK^T and PV: 2*L*S*E + 2*L*S*Ev multiply-adds per (batch, head); mask/softmax ignored.
        return 2 * heads * q[-2] * k[-2] * (q[-1] + v[-1])
    if op_class == C.CONV and len(ins) >= 2:
        weight = shape_exprs(ins[1])
        per_output = weight[1] * sympy.Mul(*weight[2:])
        if name.startswith("conv_transpose"):
            return 2 * numel_expr(ins[0]) * per_output
        return 2 * out_numel * per_output + (out_numel if len(ins) >= 3 else 0)
    if op_class in (C.EMBEDDING, C.DATA_MOVEMENT, C.KV_CACHE, C.SCALAR):
        return ZERO
    if op_class == C.NORM and name in C.NORM_OPS:
        return NORM_FLOPS_PER_ELEMENT * out_numel
    if op_class == C.SOFTMAX:
        return SOFTMAX_FLOPS_PER_ELEMENT * out_numel
    if name in C.REDUCTION_OPS and ins:
        return numel_expr(ins[0])
    return out_numel


def _matmul_flops(node, name, ins, out_numel) -> sympy.Expr:
    """FLOPs of matmul-like ops: 2 * output elements * contracted size (+ bias adds)."""
    if name == "einsum":
        equation = node.args[0] if isinstance(node.args[0], str) else ""
        operands = ins
        sizes: dict[str, sympy.Expr] = {}
        inputs_spec = equation.split("->")[0].split(",")
        for spec, t in zip(inputs_spec, operands):
            for letter, size in zip(spec.replace("...", ""), shape_exprs(t)[-len(
                    spec.replace("...", "")) or len(t.shape):]):
                sizes[letter] = size
        return 2 * sympy.Mul(*sizes.values()) if sizes else out_numel
    if name == "linear":
        k = shape_exprs(ins[1])[-1]
        return 2 * out_numel * k + (out_numel if len(ins) >= 3 else 0)
    if name in ("addmm", "baddbmm", "addbmm", "addmv"):
        k = shape_exprs(ins[1])[-1]
        return 2 * out_numel * k + out_numel
    k = shape_exprs(ins[0])[-1]
    return 2 * out_numel * k


def _paged_operands(name: str, ins: list[torch.Tensor]):
    """(q, the step's new K/V, the K cache, block tables, other metadata) of a paged op:
    attention_step(q, k, v, k_cache, v_cache, slots, cu_seqlens, seq_lens, tables) or
    paged_attention(q, k_cache, v_cache, cu_seqlens, seq_lens, tables)."""
    if name == "attention_step":
        return ins[0], ins[1:3], ins[3], ins[8], ins[5:8]
    return ins[0], [], ins[1], ins[5], ins[3:5]


def _kv_slot_bytes(cache: torch.Tensor) -> sympy.Expr:
    """Bytes of one token's keys (or values) in a paged cache [blocks, block size, heads, dim]."""
    _, _, heads, dim = shape_exprs(cache)
    return heads * dim * cache.element_size()


def _paged_context(cache: torch.Tensor, tables: torch.Tensor) -> sympy.Expr:
    """The longest KV length a step's tables can name: table width x block size."""
    return shape_exprs(tables)[1] * shape_exprs(cache)[1]


def _kv_bytes_per_token(node, name, ins) -> sympy.Expr:
    """KV-cache bytes one cached token costs this attention op (K and V of its heads)."""
    if name in C.PAGED_ATTENTION_OPS:
        return 2 * _kv_slot_bytes(_paged_operands(name, ins)[2])
    if name in C.ATTENTION_OPS and len(ins) >= 3:
        total = ZERO
        for t in ins[1:3]:
            s = shape_exprs(t)
            total += nbytes_expr(t) / (s[0] * s[-2])
        return total
    if len(ins) < 2:
        return ZERO
    state = ins[1]
    s = shape_exprs(state)
    if len(s) < 2:
        return ZERO
    # Scores (q @ k^T) hold tokens on the last axis of k^T; PV (p @ v) on v's second-to-last.
    token_axis = s[-1] if _feeds_softmax(node) else s[-2]
    rows = s[0] if len(s) > 2 else sympy.Integer(1)
    return nbytes_expr(state) / (rows * token_axis)


def _feeds_softmax(node: fx.Node, depth: int = 4) -> bool:
    """Whether a node's output reaches a softmax within a few elementwise steps."""
    frontier = [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        if any(op_name(u) in C.SOFTMAX_OPS for u in frontier):
            return True
    return False


def _token_dims(t: torch.Tensor, tokens: set[str]) -> list[int]:
    """Dims of a tensor that index tokens (carry a batch/length symbol; all but the last if static)."""
    if tokens:
        return [d for d, e in enumerate(shape_exprs(t))
                if {s.name for s in e.free_symbols} & tokens]
    return list(range(t.dim() - 1)) if t.dim() >= 2 else []


def _rows(t: torch.Tensor, tokens: set[str]) -> sympy.Expr:
    """How many token rows a tensor holds (product of its token dims)."""
    sizes = shape_exprs(t)
    return sympy.expand(sympy.Mul(*(sizes[d] for d in _token_dims(t, tokens))))


def _mixes_tokens(node, name, op_class, ins, outs, tokens) -> bool:
    """Whether an op combines or reorders tokens (so requests cannot be concatenated through it)."""
    if op_class in (C.ATTENTION, C.KV_CACHE) or name in C.TOKEN_MIXING_OPS:
        return True
    if not ins or not outs:
        return False
    main = ins[0]
    if op_class == C.CONV:
        return bool(set(_token_dims(main, tokens)) - {0}) or not tokens
    if name in LAYOUT_OPS or op_class == C.GEMM and name == "linear":
        return False
    reduced = _reduced_dims(node, name, main)
    if reduced is not None and set(reduced) & set(_token_dims(main, tokens)):
        return True
    if name in C.REDUCTION_OPS or name in ROW_SELECTING_OPS or op_class == C.REDUCTION:
        return any(_rows(o, tokens) != _rows(main, tokens) for o in outs)
    return False


def _reduced_dims(node: fx.Node, name: str, main: torch.Tensor) -> list[int] | None:
    """The dims a reduction, softmax or norm works over, normalised to non-negative indices."""
    rank = main.dim()
    if name in ("layer_norm", "rms_norm", "native_layer_norm"):
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape", ())
        k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
        return list(range(rank - k, rank))
    if name not in C.REDUCTION_OPS and name not in C.SOFTMAX_OPS:
        return None
    dim = node.kwargs.get("dim")
    if dim is None and len(node.args) > 1 and not isinstance(node.args[1], fx.Node):
        dim = node.args[1]
    if dim is None:
        return list(range(rank)) if name in C.REDUCTION_OPS else [rank - 1]
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return [d % rank for d in dims if isinstance(d, int)] if rank else []


def _mark_kv_cache(costs: dict[fx.Node, NodeCost]) -> None:
    """Mark the cache updates (cat/copy into past K/V) feeding an attention op as kv-cache ops.

    Walks back from each attention op's key/value operands through layout ops; the first
    concatenation or copy found there is the KV-cache update and belongs with the stateful
    attention, not with the projections that produce the new K/V.
    """
    for node, cost in costs.items():
        if cost.op_class != C.ATTENTION:
            continue
        operands = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
        for operand in operands:
            current = operand
            while current in costs:
                c = costs[current]
                if c.op in ("cat", "concat", "index_copy", "copy", "index_put", "scatter",
                            "slice_scatter"):
                    c.op_class, c.resource = C.KV_CACHE, C.STATEFUL
                    c.mixes_tokens = True
                    break
                if c.op not in LAYOUT_OPS and c.op not in ("repeat_interleave", "getitem"):
                    break
                args = [a for a in current.args if isinstance(a, fx.Node)]
                if not args:
                    break
                current = args[0]


def _mark_pointwise_kernels(costs: dict[fx.Node, NodeCost]) -> None:
    """Name the kernel each chain of pointwise and layout ops becomes: ROTARY when the chain
    computes or reads cos/sin, ACTIVATION when it holds a nonlinearity; outside such chains, an
    add traced in a repeated block's own forward (not a submodule's) is the block's RESIDUAL."""
    linkable = {n for n, c in costs.items()
                if c.op_class in (C.POINTWISE, C.DATA_MOVEMENT) and not c.weight_like}
    seen: set[fx.Node] = set()
    for start in costs:
        if start not in linkable or start in seen:
            continue
        chain, frontier = {start}, [start]
        while frontier:  # the connected chain, through producers and consumers
            node = frontier.pop()
            for other in (*node.all_input_nodes, *node.users):
                if other in linkable and other not in chain:
                    chain.add(other)
                    frontier.append(other)
        seen |= chain
        ops = {costs[n].op for n in chain}
        kernel = C.ROTARY if ops & C.ROTARY_OPS else C.ACTIVATION if ops & C.ACTIVATION_OPS \
            else ""
        for node in chain:
            c = costs[node]
            if kernel:
                c.kernel = kernel
            elif c.op == "add" and c.op_class == C.POINTWISE and c.layer and c.module == c.layer:
                c.kernel = C.RESIDUAL
