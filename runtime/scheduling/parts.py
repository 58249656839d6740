"""How a step is spread over a group's replicas, the same in the engine and the simulator:
an attention group by attention replica (the scheduler keeps each replica's requests
contiguous in the step), a row-wise group in contiguous token slices of at least
MIN_PART_TOKENS (one per replica), any other group whole on one replica; and how a step
splits into two micro-batches."""
from __future__ import annotations

from dataclasses import dataclass

from fxscale.contracts.step import Step

MIN_PART_TOKENS = 2  # compiled code never sees a size of 1 (runtime/engine/inputs.py pads)


@dataclass(frozen=True)
class Part:
    """One attention replica's share of a step: its tokens [t0, t1), sequences [s0, s1),
    and the KV tokens its sequences attend over."""

    replica: int
    t0: int
    t1: int
    s0: int
    s1: int
    context: int = 0


@dataclass(frozen=True)
class Layout:
    """A step's sizes and its parts by attention replica."""

    tokens: int
    seqs: int
    parts: tuple[Part, ...]


def layout_of(step: Step, pad: bool = True) -> Layout:
    """The parts of a step by attention replica; with `pad`, the dummy sequence of one token
    the engine appends (inputs.step_tensors) goes with the last part."""
    parts: list[Part] = []
    t = s = 0
    for chunk in step.chunks:
        if parts and parts[-1].replica == chunk.replica:
            last = parts[-1]
            parts[-1] = Part(last.replica, last.t0, last.t1 + chunk.tokens, last.s0,
                             last.s1 + 1, last.context + chunk.end)
        else:
            parts.append(Part(chunk.replica, t, t + chunk.tokens, s, s + 1, chunk.end))
        t += chunk.tokens
        s += 1
    if pad:
        last = parts[-1]
        parts[-1] = Part(last.replica, last.t0, last.t1 + 1, last.s0, last.s1 + 1,
                         last.context + 1)
        t, s = t + 1, s + 1
    return Layout(t, s, tuple(parts))


def token_slices(tokens: int, replicas: int) -> list[tuple[int, int]]:
    """The contiguous, near-equal token slices a row-wise group with `replicas` replicas
    runs a step of `tokens` tokens in (each of at least MIN_PART_TOKENS)."""
    parts = max(1, min(replicas, tokens // MIN_PART_TOKENS))
    edges = [round(i * tokens / parts) for i in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def micro_batches(step: Step) -> list[Step]:
    """A step as two micro-batches of about half its tokens each (whole requests, in order;
    one micro-batch when it has one request): the engine runs them side by side so one's
    attention overlaps the other's dense groups."""
    if len(step.chunks) < 2:
        return [step]
    half, tokens, cut = step.num_tokens / 2, 0, 1
    for i, chunk in enumerate(step.chunks[:-1], start=1):
        tokens += chunk.tokens
        cut = i
        if tokens >= half:
            break
    return [Step(step.chunks[:cut]), Step(step.chunks[cut:])]
