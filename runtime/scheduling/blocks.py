"""The KV blocks of one attention replica: a free list and each request's block table."""
from __future__ import annotations


class OutOfBlocks(Exception):
    """The replica has fewer free blocks than asked for."""


class BlockPool:
    """`num_blocks` blocks of `block_size` token slots; blocks are handed out lowest first
    (reused most recently freed first, so a small cache stays compact)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs blocks and slots, got {num_blocks} blocks "
                             f"of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest
        self.tables: dict[int, list[int]] = {}
        self.draining = False  # no new requests (the replica is being removed)

    @property
    def num_free(self) -> int:
        """Blocks not held by any request."""
        return len(self.free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` token slots."""
        return -(-tokens // self.block_size)

    def missing(self, request: int, tokens: int) -> int:
        """Blocks the request would need beyond those it holds to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(request, ())))

    def grow(self, request: int, tokens: int) -> list[int]:
        """Make the request's table hold `tokens` tokens; its table (OutOfBlocks: unchanged)."""
        need = self.missing(request, tokens)
        if need > len(self.free):
            raise OutOfBlocks(f"{need} blocks wanted, {len(self.free)} free")
        table = self.tables.setdefault(request, [])
        table.extend(self.free.pop() for _ in range(need))
        return table

    def release(self, request: int) -> int:
        """Free every block of a request (none held: nothing); how many were freed."""
        table = self.tables.pop(request, [])
        self.free.extend(reversed(table))
        return len(table)

    def slot(self, request: int, position: int) -> int:
        """The flat cache slot (block * block_size + offset) of a request's token position."""
        return self.tables[request][position // self.block_size] * self.block_size + \
            position % self.block_size
