"""Ray Compiled Graphs for the steps of a fixed placement: the Ray executor's optional fast
path (`compiled_graph=True`), measured against the plain path of actor calls passing refs.

A step is a list of runs (consecutive group calls in one actor, one `chain` task each) whose
inputs are results of earlier runs. Its shape is which actor each run goes to and which
earlier results it reads. A shape seen COMPILE_AFTER times in the last HISTORY steps is
compiled once into a graph of one node per run; later steps of that shape go through it in
one execute(), with their calls as the graph's input. Every other step takes the plain path,
as do the steps while a graph compiles (on a thread of its own: no step waits for it).

What Ray 2.60 asks of it, found by probing (docs/ray.md):
- an actor takes part in one live graph at a time: a new shape's graph is compiled only
  after the live one is torn down, and only once the live shape has not been seen for
  HISTORY steps, so two shapes that alternate do not rebuild a graph each step;
- a live graph's actor loops poll: an unused graph is torn down after IDLE_S;
- an actor's other calls (weights, scaling) run beside its graph on another thread;
- a dead actor breaks the graph (execute() raises): it is torn down and the step runs again
  on the plain path, whose recovery replaces the actor.

Imports Ray (only the Ray executor imports this)."""
from __future__ import annotations

import collections
import threading
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import ray
from ray.dag import InputNode, MultiOutputNode

COMPILE_AFTER = 3  # a shape seen this often in the last HISTORY steps gets a graph
HISTORY = 8
IDLE_S = 1.0  # an unused graph is torn down after this long (its actors' loops poll)
RESULT_TIMEOUT_S = 600.0  # a graph step longer than this is taken as hung: run plainly
MAX_FAILED_COMPILES = 3  # then the plain path only, with a warning


@dataclass(frozen=True)
class StepShape:
    """What a compiled graph fixes of a step: each run's actor (`homes`, actor ids) and,
    per run, the earlier (run, call) results it reads, in the order its calls name them."""

    homes: tuple[str, ...]
    reads: tuple[tuple[tuple[int, int], ...], ...]

    @cached_property
    def feeds(self) -> tuple[tuple[list[int], list[tuple[int, int]]], ...]:
        """Per run, the runs it reads (in order of first read) and, per input, (which of
        those, index of the object in that run's output: call i's result at 2 i)."""
        out = []
        for reads in self.reads:
            runs = list(dict.fromkeys(run for run, _ in reads))
            out.append((runs, [(runs.index(run), 2 * call) for run, call in reads]))
        return tuple(out)


def step_shape(runs: list[Any], wanted: list[Any]
               ) -> tuple[StepShape, dict[int, tuple[int, int]]] | None:
    """A step's shape and, by the id of each call's Pending result, its (run, call); None
    when a run, or the step's output (`wanted`), reads a result that is not one of the
    step's own (no graph holds it)."""
    where = {id(sub.result): (k, i) for k, run in enumerate(runs)
             for i, sub in enumerate(run.submitted)}
    if any(id(ref) not in where for run in runs for ref in run.refs) or \
            any(id(ref) not in where for ref in wanted):
        return None
    reads = tuple(tuple(where[id(ref)] for ref in run.refs) for run in runs)
    return StepShape(tuple(run.home for run in runs), reads), where


def all_ran(outputs: list[tuple]) -> bool:
    """Whether every call of a step ran: its seconds (every other object of a run's output)
    are a number, where a call that raised has its failure."""
    return all(isinstance(took, float) for out in outputs for took in out[1::2])


class CompiledSteps:
    """The executor's one live graph (or none), the recent step shapes, and counts."""

    def __init__(self) -> None:
        self.using = threading.Lock()  # one step in the graph at a time; held to rebuild
        self.graph: Any = None
        self.shape: StepShape | None = None
        self.history: collections.deque[StepShape] = collections.deque(maxlen=HISTORY)
        self.last_used = time.monotonic()
        self.counts = {"compiled": 0, "compile_s": 0.0, "failed_compiles": 0, "steps": 0,
                       "plain_steps": 0, "broken": 0, "torn_down": 0}
        self.disabled: str | None = None  # why compiling stopped (the plain path stays)
        # graphs only among actors on this process's node: Ray 2.60's raylet crashes (a
        # failed check in experimental_mutable_object_provider.cc, "Channel closed") after
        # an actor of a graph across two nodes dies, taking this process with it
        # (examples/ray_cross_node_graph_crash.py)
        self.node = ray.get_runtime_context().get_node_id()
        self.closed = threading.Event()
        self.reaper = threading.Thread(target=self._reap, daemon=True,
                                       name="fxscale-compiled-graph-reaper")
        self.reaper.start()

    def run(self, lane: int, step: int, runs: list[Any], wanted: list[Any]
            ) -> tuple[list[tuple], dict] | None:
        """Per run its output tuple, and (run, call) by Pending id, for a step through the
        graph of its shape; None when it takes the plain path: another shape (whose graph
        may start compiling beside it), the graph in use or compiling, a call in it that
        raised (the graph stays), or the graph failed (torn down). Nothing of a step that
        takes the plain path is kept."""
        got = self._execute(lane, step, runs, wanted)
        self.counts["plain_steps" if got is None else "steps"] += 1
        return got

    def _execute(self, lane: int, step: int, runs: list[Any], wanted: list[Any]
                 ) -> tuple[list[tuple], dict] | None:
        found = step_shape(runs, wanted) if self.disabled is None and \
            all(run.submitted[0].replica.location.get("node") == self.node for run in runs) \
            else None
        if found is None or not self.using.acquire(blocking=False):
            return None
        if self.closed.is_set():
            self.using.release()
            return None
        shape, where = found
        self.history.append(shape)
        if shape != self.shape:
            if self._recurs(shape):
                self._start_compile(shape, runs)
            else:
                self.using.release()
            return None
        try:
            work = [(lane, step, run.calls, picks)
                    for run, (_, picks) in zip(runs, shape.feeds)]
            outputs = ray.get(self.graph.execute(*work), timeout=RESULT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a dead actor, a hang, an input Ray cannot send
            self._teardown()
            self.history.clear()  # compiled again once the shape recurs (an actor may be new)
            self.counts["broken"] += 1
            return None
        finally:
            self.last_used = time.monotonic()
            self.using.release()
        return (outputs, where) if all_ran(outputs) else None

    def _recurs(self, shape: StepShape) -> bool:
        """Whether `shape` has recurred enough, and the live graph's has gone out of use."""
        return self.history.count(shape) >= COMPILE_AFTER and \
            (self.graph is None or self.shape not in self.history)

    def _start_compile(self, shape: StepShape, runs: list[Any]) -> None:
        """Compile on a thread of its own, which `using` (held by the caller) passes to."""
        try:
            threading.Thread(target=self._compile, args=(shape, runs), daemon=True,
                             name="fxscale-compile-graph").start()
        except BaseException:
            self.using.release()
            raise

    def _compile(self, shape: StepShape, runs: list[Any]) -> None:
        """Tear the live graph down and compile one of `shape` (one node per run), while
        steps take the plain path; releases `using`, which the caller handed over."""
        try:
            self._teardown()
            if self.closed.is_set():
                return
            with InputNode() as calls:
                nodes: list[Any] = []
                for k, (run, (feeding, _)) in enumerate(zip(runs, shape.feeds)):
                    nodes.append(run.actor.chain_graph.bind(
                        calls[k], *(nodes[j] for j in feeding)))
                dag = MultiOutputNode(nodes)
            start = time.perf_counter()
            self.graph = dag.experimental_compile()
            self.shape = shape
            self.counts["compiled"] += 1
            self.counts["compile_s"] += time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - any refusal leaves the plain path
            self.history.clear()  # tried again once the shape recurs (an actor may be new)
            self.counts["failed_compiles"] += 1
            if self.counts["failed_compiles"] >= MAX_FAILED_COMPILES:
                self.disabled = f"{type(error).__name__}: {error}"
                warnings.warn(f"fxscale: Ray could not compile a graph of the step "
                              f"{MAX_FAILED_COMPILES} times (last: {self.disabled}); steps take "
                              "the plain path from now on", stacklevel=1)
        finally:
            self.last_used = time.monotonic()
            self.using.release()

    def _teardown(self) -> None:
        """End the live graph (its actor loops stop); the caller holds `using`."""
        graph, self.graph, self.shape = self.graph, None, None
        if graph is None:
            return
        self.counts["torn_down"] += 1
        try:
            graph.teardown()
        except Exception:  # noqa: BLE001 - a graph broken by a dead actor is gone already
            pass

    def _reap(self) -> None:
        """Tear the graph down once unused for IDLE_S (its loops keep cores busy)."""
        while not self.closed.wait(IDLE_S / 4):
            if self.graph is None or time.monotonic() - self.last_used < IDLE_S:
                continue
            if self.using.acquire(blocking=False):
                try:
                    if time.monotonic() - self.last_used >= IDLE_S:
                        self._teardown()
                finally:
                    self.using.release()

    def stats(self) -> dict[str, Any]:
        """Graphs compiled (and the seconds it took) and torn down, steps through a graph
        and plainly, graphs broken under a step, whether one is live, and why compiling
        stopped (if it did)."""
        return {**self.counts, "live": self.graph is not None, "disabled": self.disabled}

    def close(self) -> None:
        """Stop the reaper and tear the graph down (before the actors end)."""
        self.closed.set()
        with self.using:
            self._teardown()
