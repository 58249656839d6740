"""What the engine asks of the places its operator groups run (a second executor, such as
Ray actors, implements the same methods; the engine and scheduler do not change)."""
from __future__ import annotations

from typing import Any, Callable, Protocol


class Replica(Protocol):
    """One worker of a group: it holds its own copy of the group's state (weights, KV
    blocks) and runs calls of the group's function with that state."""

    key: int

    def take(self, known: dict[int, tuple[Any, bool]]) -> None:
        """Hold its own copy of these model state tensors (id -> (tensor, is a KV cache)):
        a weight as it is, a KV cache zeroed; called again with tensors first seen later."""

    def run(self, fn: Callable[..., Any], args: list[Any]) -> Any:
        """Run fn on args with its own state in place of the state arguments; returns a
        future-like object with result()."""

    def stop(self) -> None:
        """Finish what it runs, then release its state."""

    # A replica elsewhere may set `defers` and offer `submit(fn, args, state, at_least_s,
    # pool, tokens, context)`: the call is sent, not waited for, and returns a handle the
    # next calls take as an argument (its data moves between the places that run them).
    # Its executor's `settle(output)` then waits once per step for the step's output,
    # records each call's time in its pool and raises the step's failure (the runner's
    # `settle`).
    defers: bool


class Pool(Protocol):
    """The replicas of one group."""

    name: str
    stateful: bool

    def scale(self, replicas: int) -> None:
        """Have this many replicas (dense groups; attention replicas follow the scheduler)."""

    def add(self, key: int) -> None:
        """Start a replica with this key (an attention replica: the scheduler's replica id)."""

    def remove(self, key: int) -> None:
        """Stop the replica with this key."""

    def run(self, fn: Callable[..., Any], parts: list[tuple[int | None, list[Any]]]) -> list:
        """Run fn on each part's arguments, on the replica with the part's key (None: the
        pool's choice); the results in order."""

    def stats(self) -> dict[str, Any]:
        """Replicas, executions, busy time, weight bytes."""

    def stop(self) -> None:
        """Stop every replica."""
