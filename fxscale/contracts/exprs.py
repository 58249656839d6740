"""Cost expressions over shape symbols: a whitelist parser, a writer and an evaluator.

Expressions are stored as text in files fxscale did not necessarily write (a GroupGraph JSON a
user passes in, the preset cache), so the text is read from Python's syntax tree and only these
forms are accepted: numbers, symbol names, + - * / // % **, and calls of Min, Max, floor and
ceiling. Nothing in the text is evaluated while parsing (never sympify, never eval). Exponents
must be small integer literals and the polynomial degree is bounded, so an expression cannot
grow past what a cost formula needs (attention is quadratic in the length). No torch.
"""
from __future__ import annotations

import ast
import math
from functools import lru_cache
from typing import Iterable, Mapping

import sympy

from fxscale.contracts.errors import InputError

MAX_TEXT = 4000      # characters of one expression (the largest cost seen is well under 100)
MAX_NODES = 1000     # syntax-tree nodes of one expression
MAX_EXPONENT = 8     # |n| in x**n
MAX_DEGREE = 8       # total degree in the symbols (flops of attention: batch*length**2)
MAX_LITERAL = 1e30   # largest number written in an expression
_FUNCTIONS = {"Min": (sympy.Min, 2, None), "Max": (sympy.Max, 2, None),
              "min": (sympy.Min, 2, None), "max": (sympy.Max, 2, None),
              "floor": (sympy.floor, 1, 1), "ceiling": (sympy.ceiling, 1, 1),
              "ceil": (sympy.ceiling, 1, 1), "Mod": (sympy.Mod, 2, 2)}


class ExprError(InputError):
    """Text that is not a cost expression; callers add the file and field."""


@lru_cache(maxsize=65536)
def parse_expr(text: str) -> sympy.Expr:
    """Parse a cost expression stored as text (see the module docstring for the grammar)."""
    if not isinstance(text, str):
        raise ExprError(f"a cost expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise ExprError(f"expression of {len(text)} characters (at most {MAX_TEXT})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        reason = err.msg if isinstance(err, SyntaxError) else type(err).__name__
        raise ExprError(f"not an arithmetic expression ({reason}): {text[:80]!r}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ExprError(f"expression has more than {MAX_NODES} terms: {text[:80]!r}")
    try:
        expr, degree = _build(tree.body)
    except RecursionError:
        raise ExprError(f"expression nested too deeply: {text[:80]!r}") from None
    if degree > MAX_DEGREE:
        raise ExprError(f"expression of degree {degree} in the shape symbols (at most "
                        f"{MAX_DEGREE}): {text[:80]!r}")
    return expr


def check_symbols(text: str, known: Iterable[str]) -> sympy.Expr:
    """Parse an expression and check that it uses only the given symbol names."""
    expr = parse_expr(text)
    unknown = sorted(s.name for s in expr.free_symbols if s.name not in set(known))
    if unknown:
        raise ExprError(f"unknown shape symbol(s) {unknown} in {text[:80]!r}; the graph's "
                        f"symbols are {sorted(known)}")
    return expr


def to_text(expr: sympy.Expr) -> str:
    """The stored text of an expression, in the grammar `parse_expr` reads (torch's own
    size functions, such as FloorDiv, are rewritten as floor/ceiling/Mod first)."""
    return str(_plain(sympy.sympify(expr)))


def evaluate(expr: str | sympy.Expr | int | float, env: Mapping[str, int]) -> float:
    """Evaluate a cost expression at concrete symbol values (symbols matched by name)."""
    if isinstance(expr, (int, float)):
        return float(expr)
    if isinstance(expr, str):
        expr = parse_expr(expr)
    free = expr.free_symbols
    if not free:
        return _finite(expr)
    missing = sorted(s.name for s in free if s.name not in env)
    if missing:
        raise KeyError(f"no value for shape symbol(s) {missing} in {expr}")
    return _finite(expr.xreplace({s: env[s.name] for s in free}))


def _finite(value: sympy.Expr) -> float:
    """A concrete expression as a float, or an ExprError when it has no finite value."""
    try:
        number = float(value)
    except (OverflowError, TypeError):
        raise ExprError(f"expression has no finite value: {str(value)[:80]}") from None
    if not math.isfinite(number):
        raise ExprError(f"expression has no finite value: {str(value)[:80]}")
    return number


def _build(node: ast.AST) -> tuple[sympy.Expr, int]:
    """The sympy expression of a syntax-tree node and its degree, or an ExprError."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or abs(value) > MAX_LITERAL:
            raise ExprError(f"constant {value!r} is not a finite number up to {MAX_LITERAL:g}")
        return (sympy.Integer(value) if isinstance(value, int) else sympy.Rational(repr(value))), 0
    if isinstance(node, ast.Name):
        if node.id in _FUNCTIONS or node.id.startswith("_"):
            raise ExprError(f"name {node.id!r} cannot stand alone in a cost expression")
        return sympy.Symbol(node.id), 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner, degree = _build(node.operand)
        return (-inner if isinstance(node.op, ast.USub) else inner), degree
    if isinstance(node, ast.BinOp):
        return _binary(node)
    if isinstance(node, ast.Call):
        return _call(node)
    raise ExprError(f"{type(node).__name__} is not allowed in a cost expression (numbers, "
                    "shape symbols, + - * / // % **, Min, Max, floor and ceiling are)")


def _binary(node: ast.BinOp) -> tuple[sympy.Expr, int]:
    """An arithmetic operation; the exponent of ** must be a small integer literal."""
    if isinstance(node.op, ast.Pow):
        exponent = _integer_literal(node.right)
        base, degree = _build(node.left)
        return base ** exponent, degree * abs(exponent)
    if isinstance(node.op, (ast.Add, ast.Sub)):
        terms = _chain(node, (ast.Add, ast.Sub))
        parts = [(_build(n), sign) for n, sign in terms]
        return sympy.Add(*(e if sign > 0 else -e for (e, _), sign in parts)), \
            max(d for (_, d), _ in parts)
    if isinstance(node.op, ast.Mult):
        parts = [_build(n) for n, _ in _chain(node, (ast.Mult,))]
        return sympy.Mul(*(e for e, _ in parts)), sum(d for _, d in parts)
    operations = {ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: sympy.floor(a / b),
                  ast.Mod: sympy.Mod}
    operation = operations.get(type(node.op))
    if operation is None:
        raise ExprError(f"operator {type(node.op).__name__} is not allowed in a cost expression")
    (left, dl), (right, dr) = _build(node.left), _build(node.right)
    if right == 0:
        raise ExprError("division by zero in a cost expression")
    return operation(left, right), dl + dr


def _chain(node: ast.AST, ops: tuple[type, ...], sign: int = 1) -> list[tuple[ast.AST, int]]:
    """The operands of a left-nested chain of one kind of operator (a + b - c: a, b, -c), so
    a long sum is built at once rather than term by term."""
    out: list[tuple[ast.AST, int]] = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ops):
        out.append((node.right, -sign if isinstance(node.op, ast.Sub) else sign))
        node = node.left
    out.append((node, sign))
    return out[::-1]


def _integer_literal(node: ast.AST) -> int:
    """An exponent: an integer literal (optionally negated) of at most MAX_EXPONENT."""
    negate = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    inner = node.operand if negate else node
    if not (isinstance(inner, ast.Constant) and type(inner.value) is int
            and inner.value <= MAX_EXPONENT):
        raise ExprError(f"an exponent must be an integer literal up to {MAX_EXPONENT}, got "
                        f"{ast.unparse(node)[:40]!r}")
    return -inner.value if negate else inner.value


def _call(node: ast.Call) -> tuple[sympy.Expr, int]:
    """Min, Max, floor, ceiling or Mod of expressions (no keywords)."""
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in _FUNCTIONS or node.keywords:
        raise ExprError(f"call of {ast.unparse(node.func)[:40]!r} is not allowed in a cost "
                        f"expression (only {sorted(set(_FUNCTIONS))})")
    function, least, most = _FUNCTIONS[name]
    if len(node.args) < least or (most is not None and len(node.args) > most):
        raise ExprError(f"{name} takes {least if least == most else f'{least} or more'} "
                        f"argument(s), got {len(node.args)}")
    parts = [_build(arg) for arg in node.args]
    return function(*(e for e, _ in parts)), max(d for _, d in parts)


def _plain(expr: sympy.Expr) -> sympy.Expr:
    """An expression with torch's size functions replaced by the sympy ones they mean."""
    rewrites = {"FloorDiv": lambda a, b: sympy.floor(a / b),
                "CeilDiv": lambda a, b: sympy.ceiling(a / b),
                "CleanDiv": lambda a, b: a / b, "IntTrueDiv": lambda a, b: a / b,
                "FloatTrueDiv": lambda a, b: a / b, "PythonMod": sympy.Mod, "Mod": sympy.Mod,
                "TruncToInt": sympy.floor, "FloorToInt": sympy.floor,
                "CeilToInt": sympy.ceiling}
    if not expr.args:
        return expr
    args = [_plain(a) for a in expr.args]
    rewrite = rewrites.get(type(expr).__name__)
    return rewrite(*args) if rewrite else expr.func(*args)
