"""How one group call of a step is split over a pool's replicas, and its outputs merged.

Each input of a group's submodule gets a role from its GroupIO port (compiler/io.py) and the
step's symbols (T tokens, S sequences):
- state: a weight or buffer (each replica passes its own copy) or a KV cache (each attention
  replica passes its own blocks);
- a tensor with a token dim (sliced by tokens) or a sequence dim (sliced by sequences);
- cu_seqlens (sliced and rebased to start at 0); a size equal to T or S (the part's own);
- anything else is passed as it is.
A row-wise group splits the step's tokens into contiguous slices, one per replica; an
attention group splits by attention replica (the scheduler keeps each replica's requests
contiguous in the step); any other group runs whole on one replica. Outputs are concatenated
along their token dims, in order."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from fxscale.compiler.io import GroupIO

STATE, CACHE, TOKENS, SEQS, CU, SIZE_T, SIZE_S, SHARED = (
    "state", "cache", "tokens", "seqs", "cu", "size_t", "size_s", "shared")
CACHE_SUFFIXES = ("_buffers_fxscale_k_cache_", "_buffers_fxscale_v_cache_")


@dataclass(frozen=True)
class Role:
    """What one input is to the splitting: a kind and, for sliced tensors, the dim."""

    kind: str
    dim: int = 0


def roles(io: GroupIO, tokens: set[str], seqs: set[str],
          cu_name: str) -> tuple[tuple[Role, ...], tuple[int | None, ...]]:
    """Roles of a group's inputs, and the token dim of each output (None: no token dim);
    `tokens` and `seqs` are the symbols that stand for the step's tokens and sequences."""
    out = []
    for p in io.inputs:
        if p.name.endswith(CACHE_SUFFIXES):
            out.append(Role(CACHE))
        elif "_parameters_" in p.name or "_buffers_" in p.name:
            out.append(Role(STATE))
        elif p.kind == "size":
            out.append(Role(SIZE_T if p.shape[0] in tokens else
                            SIZE_S if p.shape[0] in seqs else SHARED))
        elif p.kind == "tensor" and p.name == cu_name:
            out.append(Role(CU))
        elif p.kind == "tensor" and _dim(p.shape, tokens) is not None:
            out.append(Role(TOKENS, _dim(p.shape, tokens)))
        elif p.kind == "tensor" and _dim(p.shape, seqs) is not None:
            out.append(Role(SEQS, _dim(p.shape, seqs)))
        else:
            out.append(Role(SHARED))
    return tuple(out), tuple(_dim(p.shape, tokens) for p in io.outputs)


def _dim(shape: tuple[str, ...], symbols: set[str]) -> int | None:
    """The first dim whose size is one of `symbols`."""
    return next((d for d, size in enumerate(shape) if size in symbols), None)


def splittable(io: GroupIO, tokens: set[str]) -> bool:
    """Whether every size of the group that depends on the tokens is their count itself (a
    dim of 2*T or T+1 could not be sliced with the tokens)."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(tokens))) + r")\b")
    return all(dim in tokens or not pattern.search(dim)
               for p in (*io.inputs, *io.outputs) if p.kind == "tensor" for dim in p.shape)


def part_args(args: tuple, roles_: tuple[Role, ...], t0: int, t1: int,
              s0: int | None = None, s1: int | None = None) -> list[Any]:
    """The arguments of one part: tokens [t0, t1) (and sequences [s0, s1) when given)."""
    out = []
    for value, role in zip(args, roles_):
        if role.kind == TOKENS:
            value = value.narrow(role.dim, t0, t1 - t0)
        elif role.kind == SIZE_T:
            value = t1 - t0
        elif s0 is not None and role.kind == SEQS:
            value = value.narrow(role.dim, s0, s1 - s0)
        elif s0 is not None and role.kind == SIZE_S:
            value = s1 - s0
        elif s0 is not None and role.kind == CU:
            value = value[s0:s1 + 1] - value[s0]
        out.append(value)
    return out


def merge(results: list[Any], token_dims: tuple[int | None, ...], many: bool) -> Any:
    """The outputs of the parts as one call's: token-dim outputs concatenated in order."""
    if len(results) == 1:
        return results[0]
    columns = [tuple(r[i] for r in results) for i in range(len(token_dims))] if many \
        else [tuple(results)]
    merged = [col[0] if d is None else torch.cat(col, dim=d) if isinstance(col[0], torch.Tensor)
              else type(col[0]).joined(col, d)  # results still where they ran (Ray handles)
              for col, d in zip(columns, token_dims)]
    return tuple(merged) if many else merged[0]
