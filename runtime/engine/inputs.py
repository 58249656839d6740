"""A Step as tensors: the flat token batch, positions, KV slots, per-sequence offsets,
lengths and block tables, and which rows are sampled."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxscale.contracts.step import Step


@dataclass
class StepTensors:
    """What one step's forward pass takes (T tokens, S sequences)."""

    input_ids: torch.Tensor      # [1, T] int64
    positions: torch.Tensor      # [1, T] int64
    slot_mapping: torch.Tensor   # [T] int64: flat KV slot of each token
    cu_seqlens_q: torch.Tensor   # [S + 1] int32
    seq_lens: torch.Tensor       # [S] int32: KV length after the step
    block_tables: torch.Tensor   # [S, max blocks] int32 (rows padded with 0)
    sample_rows: torch.Tensor    # [n] int64: the token rows whose logits are sampled
    max_seqlen_q: int
    max_seqlen_k: int
    samples: int                 # real sampled rows (the first `samples` of sample_rows)

    def meta(self) -> dict[str, torch.Tensor]:
        """The attention metadata as the model's keyword arguments."""
        return {"fxscale_slot_mapping": self.slot_mapping,
                "fxscale_cu_seqlens_q": self.cu_seqlens_q,
                "fxscale_seq_lens": self.seq_lens, "fxscale_block_tables": self.block_tables}


def step_tensors(step: Step, tokens: dict[int, list[int]], block_size: int,
                 device: torch.device | str = "cpu", pad: bool = False,
                 all_rows: frozenset[int] | set[int] = frozenset()) -> StepTensors:
    """The tensors of a step; `tokens` holds each request's known tokens (prompt and
    generated). The sampled rows are each sampling chunk's last token, and every token of
    the requests in `all_rows` (whose logits are wanted whole). `pad` appends a dummy
    sequence of one token (its KV not stored, its output unused) and pads the table width and
    the sampled rows to at least 2, so that no size is 0 or 1 and a graph compiled for
    symbolic sizes serves every step."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu, lens, samples = [0], [], []
    width = max(len(c.blocks) for c in step.chunks)
    tables = []
    for c in step.chunks:
        ids.extend(tokens[c.request][c.start:c.end])
        positions.extend(range(c.start, c.end))
        slots.extend(c.blocks[p // block_size] * block_size + p % block_size
                     for p in range(c.start, c.end))
        cu.append(cu[-1] + c.tokens)
        lens.append(c.end)
        tables.append(list(c.blocks) + [0] * (width - len(c.blocks)))
        if c.request in all_rows:
            samples.extend(range(cu[-2], cu[-1]))
        elif c.samples:
            samples.append(cu[-1] - 1)
    real = len(samples)
    if pad:
        ids.append(0)
        positions.append(0)
        slots.append(-1)
        cu.append(cu[-1] + 1)
        lens.append(1)
        width = max(width, 2)
        tables = [row + [0] * (width - len(row)) for row in tables] + [[0] * width]
        samples += [cu[-1] - 1] * max(0, 2 - len(samples))
    as_long = dict(dtype=torch.long, device=device)
    as_int = dict(dtype=torch.int32, device=device)
    return StepTensors(
        input_ids=torch.tensor([ids], **as_long), positions=torch.tensor([positions], **as_long),
        slot_mapping=torch.tensor(slots, **as_long), cu_seqlens_q=torch.tensor(cu, **as_int),
        seq_lens=torch.tensor(lens, **as_int), block_tables=torch.tensor(tables, **as_int),
        sample_rows=torch.tensor(samples, **as_long),
        max_seqlen_q=max(c.tokens for c in step.chunks), max_seqlen_k=max(lens), samples=real)
