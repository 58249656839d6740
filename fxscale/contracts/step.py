"""The Step: what the engine runs at once, as the scheduler composed it (torch-free).

One step is a flat batch of tokens from many requests: for each request a chunk of
consecutive positions (one token for a decode, up to the token budget for a prompt), with
the KV blocks that hold its earlier tokens. The live engine turns a Step into tensors and
runs it; the simulator prices the same Step."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """One request's share of a step."""

    request: int               # the request's id
    replica: int               # the attention replica that holds its KV blocks
    start: int                 # position of its first token here (earlier ones are cached)
    tokens: int                # tokens it computes in this step
    blocks: tuple[int, ...]    # its block table, in its replica's block space
    samples: bool              # the chunk ends at its last known token: a token is sampled

    @property
    def end(self) -> int:
        """Its KV length once the step has run."""
        return self.start + self.tokens


@dataclass(frozen=True)
class Step:
    """The chunks of one step, grouped by attention replica (each replica's chunks are
    contiguous, in replica order), and the requests preempted to make room for it."""

    chunks: tuple[Chunk, ...]
    preempted: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Tokens in the step (its flat batch)."""
        return sum(c.tokens for c in self.chunks)

    @property
    def num_decodes(self) -> int:
        """Chunks of one token that sample (decodes)."""
        return sum(1 for c in self.chunks if c.tokens == 1 and c.samples)

    @property
    def num_samples(self) -> int:
        """Tokens the step samples (one per chunk that ends at its last known token)."""
        return sum(1 for c in self.chunks if c.samples)
