"""The shape symbols of a captured graph: which is batch, which is length, and their example values."""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from fxscale.passes.node_facts import is_weight_placeholder, node_value

BATCH = "batch"
LENGTH = "length"
CONTEXT = "context"  # tokens already in a KV cache (dim 2 of a (batch, heads, tokens, dim) input)
OTHER = "other"


@dataclass
class SymbolTable:
    """Shape symbols of one graph: role (batch/length/other), where they come from, example value."""

    roles: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    hints: dict[str, int] = field(default_factory=dict)

    def symbol_of(self, role: str) -> str | None:
        """The first symbol with this role, if any."""
        return next((name for name, r in self.roles.items() if r == role), None)

    def token_symbols(self) -> set[str]:
        """Names of all shape symbols: a dim of symbolic size counts requests or tokens
        (batch, length, context), never features, so ops reducing over it mix tokens."""
        return set(self.roles)

    def env(self, batch: int | None = None, length: int | None = None,
            context: int | None = None, **overrides: int) -> dict[str, int]:
        """Values for every symbol: batch/length/context where given, else the example values."""
        values = dict(self.hints)
        for role, value in ((BATCH, batch), (LENGTH, length), (CONTEXT, context)):
            if value is not None:
                for name, r in self.roles.items():
                    if r == role:
                        values[name] = value
        values.update(overrides)
        return values


def symbols_of_graph(gm: fx.GraphModule) -> SymbolTable:
    """Find the shape symbols of a Dynamo graph from its user-input placeholders."""
    table = SymbolTable()
    shape_env = None
    input_rank = 0
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node_value(node)
        if isinstance(value, torch.SymInt):
            shape_env = shape_env or value.node.shape_env
        if not isinstance(value, torch.Tensor) or is_weight_placeholder(node):
            continue
        input_rank += 1
        for dim, size in enumerate(value.shape):
            if not isinstance(size, torch.SymInt) or not isinstance(size.node.expr, sympy.Symbol):
                continue
            shape_env = shape_env or size.node.shape_env
            name = str(size.node.expr)
            if name in table.roles:
                continue
            # Convention (documented in docs/costs.md): dim 0 of a user input is the batch,
            # dim 1 of the first input that has one is the sequence length.
            if dim == 0:
                role = BATCH
            elif dim == 1 and table.symbol_of(LENGTH) is None and value.dim() in (2, 3):
                role = LENGTH
            elif dim == 2 and value.dim() == 4:
                role = CONTEXT
            else:
                role = OTHER
            table.roles[name] = role
            table.sources[name] = f"{node.name}.size({dim})"
    if shape_env is not None:
        hints = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
        for sym, val in hints.items():
            table.hints[str(sym)] = int(val)
            if str(sym) not in table.roles:
                table.roles[str(sym)] = OTHER
                sources = shape_env.var_to_sources.get(sym)
                table.sources[str(sym)] = sources[0].name if sources else "derived"
    return table

