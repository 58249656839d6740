"""Prefix caching: the KV blocks of prompts already prefilled, reused by later prompts that
start the same way (vLLM's automatic prefix caching, SGLang's radix cache).

A holder of KV caches (a model replica, an attention device, a co-located replica) keeps the
hashes of the prefix blocks it has computed, least recently used first out, in as many blocks
as its KV memory holds. A prompt reuses its longest run of leading blocks found there: those
tokens are not prefilled again (they are still attended to). Requests are routed by where
their prefix is cached, as cache-aware routers do (`prefill_left`). Every policy gets the
same rules.
"""
from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    """The prefix blocks one KV holder keeps, least recently used evicted first."""

    def __init__(self, capacity_blocks: int) -> None:
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.capacity = 0
        self.resize(capacity_blocks)

    def resize(self, capacity_blocks: int) -> None:
        """Hold at most `capacity_blocks` blocks from now on."""
        self.capacity = max(0, int(capacity_blocks))
        self._evict()

    def reuse(self, hashes: tuple[int, ...]) -> int:
        """How many leading blocks of a prompt are cached here (and mark them used)."""
        hit = self.cached(hashes)
        for h in hashes[:hit]:
            self.blocks.move_to_end(h)
        return hit

    def cached(self, hashes: tuple[int, ...]) -> int:
        """How many leading blocks of a prompt are cached here (nothing marked used)."""
        hit = 0
        for h in hashes:
            if h not in self.blocks:
                break
            hit += 1
        return hit

    def store(self, hashes: tuple[int, ...]) -> None:
        """Keep a prefilled prompt's blocks, evicting the least recently used."""
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        self._evict()

    def _evict(self) -> None:
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


def reused_tokens(hit_blocks: int, block_tokens: int, prompt_tokens: int) -> int:
    """Prompt tokens a prefix hit saves: whole blocks, leaving at least one token to prefill
    (the first output token needs a forward pass)."""
    return min(hit_blocks * block_tokens, prompt_tokens - 1)


def prefill_left(backlog: float, cache: PrefixCache, hashes: tuple[int, ...],
                 block_tokens: int, prompt_tokens: int) -> float:
    """The routing key of cache-aware routing: a KV holder's queued prompt tokens less those
    its prefix cache would save this prompt (the prefill left there once the prompt joined,
    but for the prompt's own length, the same everywhere). A cached prefix draws a prompt
    to a holder unless that holder's queue is longer than another's by more than the
    saving."""
    return backlog - reused_tokens(cache.cached(hashes), block_tokens, prompt_tokens)
