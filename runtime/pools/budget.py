"""The execution budget: how many group calls run at once, and which replica runs next.

A freed slot goes to the waiting replica whose turn serves the most: a row-wise replica
serves every queued call that batches (up to its max batch), any other replica one call;
waiting adds one call's worth per mean execution time of its pool, so nothing starves.
Handing slots to the longest batchable queue lets calls of many requests gather at a group
instead of trickling through it one at a time, which is what makes selective batching pay.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Protocol


class Waiter(Protocol):
    """What the budget asks of a replica waiting for a slot."""

    def priority(self, now: float) -> float:
        """How much a slot given now would serve."""


class Budget:
    """`slots` concurrent executions, granted by priority (see the module docstring)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"an execution budget needs >= 1 slot, got {slots}")
        self.slots = slots
        self.free = slots
        self.lock = threading.Lock()
        self.waiting: dict[Waiter, threading.Event] = {}

    @contextlib.contextmanager
    def slot(self, waiter: Waiter) -> Iterator[None]:
        """Hold one slot while the block runs."""
        with self.lock:
            granted = self.free > 0
            if granted:
                self.free -= 1
            else:
                event = self.waiting[waiter] = threading.Event()
        if not granted:
            event.wait()  # release() hands its slot over directly
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """Give the slot to the best waiter, or back to the free count."""
        with self.lock:
            if not self.waiting:
                self.free += 1
                return
            now = time.perf_counter()
            best = max(self.waiting, key=lambda w: w.priority(now))
            self.waiting.pop(best).set()
