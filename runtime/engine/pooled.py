"""Steps of a model compiled into operator groups, each group's calls run by its pool.

The step function (the model's forward over a flat batch, attention routed to the paged
cache) is compiled once, as one whole graph with symbolic sizes, through the fxscale backend
at the requested granularity and lowering; every group call of the lowered graph then goes
to its group's pool (runtime/executors), bound by group name, so every compiled graph shares
one pool per group. Within a step a pool splits the call (runtime/engine/split.py): a
row-wise group by token slices over its replicas, an attention group by attention replica
(each holds the KV blocks of its requests), any other group runs whole. Steps are padded
(runtime/engine/inputs.py) so that no size is 0 or 1: one graph serves every step.

Granularity "operator" is the operator-level engine (one runner, a pool per group);
granularity "model" makes the whole model one stateful group, and each model replica an
attention replica of it, driven by its own engine (the model-level deployment)."""
from __future__ import annotations

import functools
import threading
import types
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.fx.experimental._config as fx_config

from fxscale.compiler.backend import fxscale_backend
from fxscale.contracts.group_graph import GroupGraph
from fxscale.contracts.placement import Placement
from fxscale.contracts.step import Step
from fxscale.runtime.engine.attention import AttentionLayer
from fxscale.runtime.engine.inputs import StepTensors, step_tensors
from fxscale.runtime.engine.norms import route_norms
from fxscale.runtime.engine.runner import forward_step, keeps_rows, route_attention
from fxscale.runtime.engine.split import CACHE, STATE, merge, part_args, roles, splittable
from fxscale.runtime.executors import LocalPool, LocalReplica
from fxscale.runtime.executors.local import StateSlots
from fxscale.runtime.scheduling.parts import Layout, Part, layout_of, token_slices


def _step_entry(model: torch.nn.Module, input_ids, positions, sample_rows, slot_mapping,
                cu_seqlens_q, seq_lens, block_tables, keep_rows: bool) -> torch.Tensor:
    """The function a runner compiles (a private copy each, see _own_entry)."""
    meta = {"fxscale_slot_mapping": slot_mapping, "fxscale_cu_seqlens_q": cu_seqlens_q,
            "fxscale_seq_lens": seq_lens, "fxscale_block_tables": block_tables}
    return forward_step(model, input_ids, positions, sample_rows, meta, keep_rows)


def _own_entry() -> types.FunctionType:
    """A copy of _step_entry with its own code object: Dynamo keys compiled code and its
    recompile limit by code object, so each runner's graphs are its own."""
    return types.FunctionType(_step_entry.__code__.replace(), _step_entry.__globals__,
                              _step_entry.__name__)


class PooledRunner:
    """A compiled step function whose group calls run on per-group pools (module docstring)."""

    def __init__(self, model: torch.nn.Module, layers: list[AttentionLayer], num_blocks: int,
                 block_size: int, options: dict[str, Any], placement: Placement,
                 backend: str = "auto",
                 service: Callable[[str, int, int], float] | None = None,
                 norms: bool | None = None,
                 replica: Callable[..., LocalReplica] = LocalReplica,
                 settle: Callable[[Any], Any] | None = None) -> None:
        self.model, self.block_size, self.placement = model, block_size, placement
        self.new_replica = replica  # the executor's replicas: threads here, or Ray actors
        # an executor whose calls return handles (Ray's) waits once per step, for the output
        self.settle = settle
        # service-time injection: (group, tokens, context tokens) -> seconds a call takes
        self.service = service
        self.options = options
        self.device = next(model.parameters()).device
        self.cache_bytes = route_attention(model, layers, num_blocks, block_size, backend)
        # RMSNorm as fxscale's fused kernel where the kernels run as Triton (or when asked)
        on_gpu = self.device.type == "cuda" and backend in ("auto", "triton")
        self.norms = route_norms(model, backend) if (on_gpu if norms is None else norms) else 0
        self.keep_rows = keeps_rows(model)
        self.pools: dict[str, LocalPool] = {}
        self.pools_lock = threading.Lock()
        self.group_graphs: list[GroupGraph] = []
        self.calls: list[GroupCall] = []
        self.local = threading.local()  # the layout of the step this thread runs
        self.entry = _own_entry()
        self.compiled = torch.compile(self.entry, backend=_WeakBackend(self), dynamic=True,
                                      fullgraph=True)

    # ---- compilation -------------------------------------------------------------------------
    def _backend(self, gm: fx.GraphModule, example_inputs: list) -> Any:
        """Compile with fxscale, then route each group call through its pool."""
        lowered = fxscale_backend(gm, example_inputs, self.options)
        graph = getattr(lowered, "group_graph", None)
        if graph is None:  # grouping failed (warned): the graph runs eagerly, unpooled
            raise RuntimeError("fxscale could not group the step's graph; the engine needs "
                               "its groups (see the warning above)")
        self.group_graphs.append(graph)
        tokens, seqs = step_symbols(gm)
        groups = {g.submodule: g for g in graph.groups}
        for node in lowered.graph.nodes:
            name = str(node.target).removeprefix("compiled_")  # Inductor renames what it compiles
            if node.op != "call_module" or name not in groups:
                continue
            group, io = groups[name], lowered.group_io[name]
            arg_roles, out_dims = roles(io, tokens, seqs, "l_cu_seqlens_q_")
            kind = "attention" if group.stateful else \
                "rows" if group.batchable and splittable(io, tokens) else "whole"
            with self.pools_lock:
                pool = self.pools.setdefault(group.name, LocalPool(
                    group.name, group.stateful, self.placement,
                    None if self.service is None else functools.partial(self.service,
                                                                        group.name),
                    self.new_replica))
            state = StateSlots(tuple(i for i, r in enumerate(arg_roles)
                                     if r.kind in (STATE, CACHE)),
                               frozenset(i for i, r in enumerate(arg_roles) if r.kind == CACHE))
            call = GroupCall(self, pool, getattr(lowered, node.target), arg_roles, out_dims,
                             kind, io.many, state)
            self.calls.append(call)
            lowered._modules[node.target] = call
        return lowered

    # ---- steps ---------------------------------------------------------------------------------
    def run(self, step: Step, tokens: dict[int, list[int]],
            all_rows: frozenset[int] = frozenset()) -> torch.Tensor:
        """Logits [rows, vocab] of the step's sampled rows, in chunk order."""
        t = step_tensors(step, tokens, self.block_size, self.device, pad=True,
                         all_rows=all_rows)
        return self._forward(t, layout_of(step))[:t.samples]

    def warm_up(self) -> None:
        """Compile the step graph before traffic, on a synthetic step (7 tokens of 3
        sequences; its keys and values are not stored)."""
        as_long = dict(dtype=torch.long, device=self.device)
        as_int = dict(dtype=torch.int32, device=self.device)
        t = StepTensors(
            input_ids=torch.zeros(1, 7, **as_long),
            positions=torch.tensor([[0, 1, 2, 1, 2, 3, 0]], **as_long),
            slot_mapping=torch.full((7,), -1, **as_long),
            cu_seqlens_q=torch.tensor([0, 3, 6, 7], **as_int),
            seq_lens=torch.tensor([3, 4, 1], **as_int),
            block_tables=torch.zeros(3, 5, **as_int),
            sample_rows=torch.tensor([2, 5], **as_long),
            max_seqlen_q=3, max_seqlen_k=4, samples=2)
        self._forward(t, Layout(7, 3, (Part(0, 0, 7, 0, 3, 8),)))

    def _forward(self, t: StepTensors, layout: Layout) -> torch.Tensor:
        """The compiled forward pass of a step's tensors."""
        self.local.layout = layout
        # a symbol per input size (equal sizes need not mean the same) and the model's
        # float constants as constants, whenever Dynamo traces (again, after a reset)
        with torch.no_grad(), torch._dynamo.config.patch(specialize_float=True), \
                fx_config.patch(use_duck_shape=False):
            try:
                out = self.compiled(self.model, t.input_ids, t.positions, t.sample_rows,
                                    t.slot_mapping, t.cu_seqlens_q, t.seq_lens,
                                    t.block_tables, self.keep_rows)
            except BaseException:
                if self.settle is not None:
                    self.settle(None)  # what was submitted finishes; nothing carries over
                raise
        return out if self.settle is None else self.settle(out)

    def add_attention(self, key: int) -> None:
        """Start attention replica `key` in every stateful pool now (its KV caches
        allocated, and for a model replica its weights copied), not at its first step."""
        for pool in self.stateful_pools():
            if key not in pool.replicas and pool.known:
                pool.add(key)

    def drain_attention(self, key: int) -> None:
        """Attention replica `key` admits no more requests: it no longer counts as serving."""
        for pool in self.stateful_pools():
            pool.draining.add(key)

    def remove_attention(self, key: int) -> None:
        """Stop attention replica `key` in every stateful pool (its requests are gone)."""
        for pool in self.stateful_pools():
            if key in pool.replicas:
                pool.remove(key)

    def stateful_pools(self) -> list[LocalPool]:
        """The attention groups' pools."""
        return [p for p in self.pools.values() if p.stateful]

    def stop(self) -> None:
        """Stop every pool and drop the compiled code and the model (graphs Dynamo may still
        hold keep none of it)."""
        for pool in self.pools.values():
            pool.stop()
        for call in self.calls:
            call.runner = call.pool = call.inner = None
        self.calls.clear()
        self.compiled = self.model = None


TOKEN_DIMS = {"l_input_ids_": 1, "l_positions_": 1, "l_slot_mapping_": 0}
SEQ_DIMS = {"l_seq_lens_": 0, "l_block_tables_": 0}


def step_symbols(gm: fx.GraphModule) -> tuple[set[str], set[str]]:
    """The size symbols of a traced step that count its tokens, and its sequences (read
    from the step's inputs: equal sizes are not assumed to mean the same)."""
    values = {n.name: n.meta.get("example_value") for n in gm.graph.nodes
              if n.op == "placeholder"}
    tokens = {str(values[name].shape[d]) for name, d in TOKEN_DIMS.items()}
    seqs = {str(values[name].shape[d]) for name, d in SEQ_DIMS.items()}
    if tokens & seqs or not all(s.startswith("s") for s in tokens | seqs):
        raise RuntimeError(f"the step graph was traced with token sizes {sorted(tokens)} and "
                           f"sequence sizes {sorted(seqs)}; the split needs them symbolic "
                           "and apart")
    return tokens, seqs


class _WeakBackend:
    """The runner's backend, as Dynamo keeps it (for as long as the process lives): it holds
    the runner weakly, so a closed server's runner and model can be freed."""

    def __init__(self, runner: PooledRunner) -> None:
        self.runner = weakref.ref(runner)

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Any:
        runner = self.runner()
        if runner is None:
            raise RuntimeError("this fxscale engine was closed")
        return runner._backend(gm, example_inputs)


class GroupCall(torch.nn.Module):
    """Stands in for a group's submodule in the lowered graph: splits the call over the
    group's pool and merges the results."""

    def __init__(self, runner: PooledRunner, pool: LocalPool, inner: Any, arg_roles,
                 out_dims, kind: str, many: bool, state: StateSlots) -> None:
        super().__init__()
        self.runner, self.pool, self.inner = runner, pool, inner
        self.arg_roles, self.out_dims, self.kind, self.many = arg_roles, out_dims, kind, many
        self.state = state

    def forward(self, *args: Any) -> Any:
        if self.runner is None:
            raise RuntimeError("this graph belongs to a closed fxscale engine")
        layout: Layout = self.runner.local.layout
        self.pool.learn(list(args), self.state)
        if self.kind == "attention":
            for part in layout.parts:
                if part.replica not in self.pool.replicas:
                    self.pool.add(part.replica)
            parts = [(p.replica, part_args(args, self.arg_roles, p.t0, p.t1, p.s0, p.s1),
                      (p.t0, p.t1), p.context) for p in layout.parts]
        elif self.kind == "rows":
            parts = [(None, part_args(args, self.arg_roles, a, b), (a, b), 0)
                     for a, b in token_slices(layout.tokens, len(self.pool.replicas))]
        else:
            parts = [(None, list(args), (0, layout.tokens), 0)]
        return merge(self.pool.run(self.inner, parts, self.state), self.out_dims, self.many)
