"""Selective batching: run one row-wise group's calls from several requests as one call.

A row-wise group computes each token row independently, so calls from different requests
can share one execution. The group's graph was captured for one request (its views name
that request's sizes), so the calls are stacked on a new leading dim and the graph runs
under `torch.func.vmap`: a linear layer sees all the requests' tokens at once and reads its
weights once, and every view keeps its per-request meaning. Calls batch together only when
their signatures match: the same captured graph, same activation shapes and dtypes, same
Python values, weights in the same places.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch.utils._pytree import tree_map


def signature(run: Callable[..., Any], args: tuple, weights: tuple[int, ...]
              ) -> Hashable | None:
    """What must match for two calls to batch (None: this call cannot batch). The callable
    is part of it: one group has a different graph per capture (forward, prefill, decode)."""
    key: list[Any] = [id(run)]
    for position, arg in enumerate(args):
        if position in weights:
            key.append("w")
        elif isinstance(arg, torch.Tensor):
            if arg.dim() == 0:  # lifted scalars (eps, scaling) are read with .item()
                key.append(("scalar", arg.dtype, repr(arg.item())))
            else:
                key.append(("tensor", tuple(arg.shape), arg.dtype, arg.device))
        elif _plain(arg):  # by repr: 1, 1.0 and True, or 0.0 and -0.0, must not match
            key.append(("value", repr(arg)))
        else:
            return None
    return tuple(key)


def _plain(value: Any) -> bool:
    """Whether a value is plain data a signature can hold (no tensors inside)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype,
                                                torch.device))


def run_batched(run: Callable[..., Any], calls_args: list[list]) -> list[Any]:
    """Run `run` once over several calls' arguments (matching signatures); one result each."""
    first = calls_args[0]
    dims: list[int | None] = []
    stacked: list[Any] = []
    for position, arg in enumerate(first):
        column = [args[position] for args in calls_args]
        # shared objects (weights, scalars, a tensor every call passes) are not batched
        if not isinstance(arg, torch.Tensor) or arg.dim() == 0 \
                or all(a is arg for a in column):
            dims.append(None)
            stacked.append(arg)
        else:
            dims.append(0)
            stacked.append(torch.stack(column))
    if all(d is None for d in dims):  # every call passes the same objects: one result
        out = run(*stacked)
        return [out] + [tree_map(_own_copy, out) for _ in calls_args[1:]]
    out = torch.func.vmap(run, in_dims=tuple(dims))(*stacked)
    return [tree_map(lambda t, i=i: _part(t, i), out) for i in range(len(calls_args))]


def _part(batched: Any, i: int) -> Any:
    """Call i's slice of a batched output; its own memory when the slices would share it
    (an output vmap broadcast), so one request's in-place update cannot reach another's."""
    if not isinstance(batched, torch.Tensor):
        return batched
    piece = batched[i]
    return piece.clone() if batched.dim() and batched.stride(0) == 0 else piece


def _own_copy(value: Any) -> Any:
    """A tensor's copy (other values as they are)."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def same_results(batched: list[Any], single: list[Any]) -> bool:
    """Whether batched results equal one-by-one results within the dtype's tolerance."""
    try:
        torch.testing.assert_close(batched, single)
    except AssertionError:
        return False
    return True
