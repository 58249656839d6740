"""Cost expressions over shape symbols: parse and evaluate them (sympy only, no torch)."""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import sympy


@lru_cache(maxsize=65536)
def parse_expr(text: str) -> sympy.Expr:
    """Parse a cost expression stored as text (sympy syntax)."""
    return sympy.sympify(text, rational=True)


def evaluate(expr: str | sympy.Expr | int | float, env: Mapping[str, int]) -> float:
    """Evaluate a cost expression at concrete symbol values (symbols matched by name)."""
    if isinstance(expr, (int, float)):
        return float(expr)
    if isinstance(expr, str):
        expr = parse_expr(expr)
    free = expr.free_symbols
    if not free:
        return float(expr)
    missing = sorted(s.name for s in free if s.name not in env)
    if missing:
        raise KeyError(f"no value for shape symbol(s) {missing} in {expr}")
    return float(expr.xreplace({s: env[s.name] for s in free}))
