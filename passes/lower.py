"""Lowering: compile each operator group with Inductor, or run it eagerly.

Groups are compiled the way Dynamo's DDPOptimizer compiles the pieces of a split graph: an
Interpreter walks the split module with fake inputs under the tracing fake mode and hands
each submodule to the compiler. A group that fails to compile runs eagerly, with a warning
naming its operators and the reason. Structurally identical groups (the same sub-block in
every layer; parameters arrive as inputs) are compiled once, when that code returns eager's
layout. Inductor may lay a group's output out otherwise (keys as (batch, tokens, heads, dim) in
memory where eager has (batch, heads, tokens, dim)): the graph's outputs are put back in
eager's layout, or a KV cache the graph returns would fail the next graph's stride guards (a
recompile per prompt); docs/grouping.md has the details.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
from torch._dynamo.backends.distributed import (
    SubmodCompiler,
    propagate_dynamo_source,
    propagate_metadata,
)
from torch._dynamo.utils import counters, detect_fake_mode
from torch.utils._pytree import tree_flatten, tree_unflatten


def lower_groups(original: fx.GraphModule, split: fx.GraphModule, example_inputs: list[Any],
                 lowering: str, describe: Mapping[str, str], dedupe: bool = True,
                 warn: bool = True) -> tuple[fx.GraphModule, dict[str, str]]:
    """Compile every group submodule of `split` in place; return it and each group's lowering.
    A group around fxscale's paged attention runs its graph as it is: its work is that op's
    own kernel, and the engine calls it on parts of a step whose sizes compiled code would
    guard against."""
    names = [n.target for n in split.graph.nodes if n.op == "call_module"]
    if lowering == "eager":
        return split, {name: "eager" for name in names}
    paged = {name for name in names if calls_paged_attention(getattr(split, name))}
    from torch._inductor.compile_fx import compile_fx

    propagate_metadata(original, split)
    propagate_dynamo_source(original, split)
    fake_mode = detect_fake_mode(example_inputs) or torch._subclasses.FakeTensorMode()
    # Sharing compiled code between layers is safe for inference graphs; with autograd each
    # piece keeps its own backward bookkeeping, so every group is compiled separately.
    compiler = _GroupCompiler(split, compile_fx, fake_mode, describe,
                              dedupe=dedupe and not torch.is_grad_enabled(), warn=warn,
                              eager=paged)
    with torch._dynamo.utils._disable_saved_tensors_hooks_during_tracing():
        compiler.run(*example_inputs)
    keep_output_layouts(original, split)
    split.recompile()
    return split, {name: compiler.status.get(name, "inductor") for name in names}


def calls_paged_attention(module: Any) -> bool:
    """Whether a group's graph calls fxscale's paged attention (fxscale::attention_step or
    fxscale::paged_attention)."""
    graph = getattr(module, "graph", None)
    return graph is not None and any(
        str(n.target).startswith(("fxscale.attention_step", "fxscale.paged_attention"))
        for n in graph.nodes if n.op == "call_function")


def keep_output_layouts(original: fx.GraphModule, split: fx.GraphModule) -> None:
    """Make each tensor output of `split` leave in the layout it has in `original` (eager's),
    copying at run time only when the compiled code laid it out otherwise."""
    wanted = [node_layout(v) for v in tree_flatten(output_values(original))[0]]
    output = next(n for n in reversed(split.graph.nodes) if n.op == "output")
    values, spec = tree_flatten(output.args[0])
    if len(values) != len(wanted):  # not the same outputs: nothing to compare with
        return
    with split.graph.inserting_before(output):
        kept = [split.graph.call_function(in_layout, (v, order))
                if order is not None and isinstance(v, fx.Node) else v
                for v, order in zip(values, wanted)]
    output.args = (tree_unflatten(kept, spec),)


def output_values(gm: fx.GraphModule) -> Any:
    """The example values (fake tensors) of a graph's outputs."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return fx.node.map_arg(output.args[0], lambda n: n.meta.get("example_value",
                                                                   n.meta.get("val")))


def node_layout(value: Any) -> tuple[int, ...] | None:
    """The order of a tensor's dims from outermost to innermost in memory when its layout is
    dense, else None (views with gaps stay as they are). Read from the example sizes, so no
    shape guard is added."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    sizes = [_hint(v) for v in value.shape]
    strides = [_hint(v) for v in value.stride()]
    if None in sizes or None in strides:  # data-dependent sizes: no example to read
        return None
    probe = torch.empty_strided(sizes, strides, device="meta")
    if not torch._prims_common.is_non_overlapping_and_dense_or_false(probe):
        return None
    return tuple(sorted(range(value.dim()), key=lambda d: (-strides[d], -sizes[d])))


def in_layout(out: Any, order: tuple[int, ...]) -> Any:
    """A tensor in the dense layout `order` (a copy only when it is laid out otherwise)."""
    if not isinstance(out, torch.Tensor) or out.dim() != len(order):
        return out
    permuted = out.permute(order)
    if permuted.is_contiguous():
        return out
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return permuted.contiguous().permute(inverse)


def _hint(value: Any) -> int | None:
    """A size or stride as a number: its example value when symbolic (None if it has none)."""
    return value.node.hint if isinstance(value, torch.SymInt) else int(value)


class _GroupCompiler(SubmodCompiler):
    """DDPOptimizer's submodule compiler plus per-group fallback and reuse of identical groups."""

    def __init__(self, module: fx.GraphModule, compiler: Callable, fake_mode, describe,
                 dedupe: bool, warn: bool, eager: set[str] = frozenset()) -> None:
        super().__init__(module, compiler, fake_mode)
        self.describe = describe
        self.eager = eager  # groups kept as they are
        self.dedupe = dedupe
        self.warn = warn
        self.cache: dict[str, Any] = {}
        self.status: dict[str, str] = {}
        self.current = ""
        self.compiled_now: tuple[str, list] | None = None  # (dedupe key, eager layouts)

    def run_node(self, n: fx.Node) -> Any:
        """Remember which group is being compiled, then compile and run it on fake inputs.
        DDPOptimizer runs freshly compiled code once on fake inputs, so the next group is
        compiled for the layout this one really returns; a group that shares compiled code
        is run uncompiled instead, in eager's layout. So code is shared only when it returns
        eager's layout; otherwise each identical group compiles its own."""
        self.current = str(n.target)
        self.compiled_now = None
        out = super().run_node(n)
        if self.compiled_now is not None:
            key, eager = self.compiled_now
            if [node_layout(v) for v in tree_flatten(out)[0]] != eager:
                self.cache.pop(key, None)
        return out

    def compile_submod(self, input_mod: fx.GraphModule, args: list, kwargs: Any) -> Any:
        """Compile one group, reusing an identical group's code, or fall back to eager."""
        if self.current in self.eager:
            self.status[self.current] = "eager (paged attention: fxscale.kernels)"
            return input_mod
        key = structural_key(input_mod, args) if self.dedupe else None
        if key is not None and key in self.cache:
            source, compiled = self.cache[key]
            self.status[self.current] = f"inductor (shares code with {source})"
            return _GroupModule(compiled)
        pristine = copy.deepcopy(input_mod)
        aot_count = counters["aot_autograd"]["total"]
        try:
            compiled = super().compile_submod(input_mod, args, kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run this part eagerly
            counters["aot_autograd"]["total"] = aot_count  # no AOT metadata to book for this part
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            self.status[self.current] = f"eager (fallback: {reason})"
            if self.warn:
                warnings.warn(f"fxscale: group {self.current} [{self.describe.get(self.current, '')}]"
                              f" runs eagerly because Inductor failed on it: {reason}",
                              stacklevel=2)
            return pristine
        if key is not None:
            self.cache[key] = (self.current, compiled)
            eager = [node_layout(v) for v in tree_flatten(output_values(pristine))[0]]
            self.compiled_now = (key, eager)
        return _GroupModule(compiled)


class _GroupModule(torch.nn.Module):
    """One group's module around (possibly shared) compiled code: every group has its own,
    so per-group hooks (profiling, metrics) see exactly which group ran."""

    def __init__(self, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any) -> Any:
        return self.compiled(*args)


def structural_key(gm: fx.GraphModule, args: list) -> str:
    """A key equal for graphs that differ only in node names (and so compile to the same code)."""
    index: dict[fx.Node, int] = {}
    lines = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op in ("get_attr", "call_module"):
            target: Any = id(getattr(gm, str(node.target).split(".")[0], None))
        else:
            target = node.target if node.op != "placeholder" else ""
        mapped = fx.node.map_arg((node.args, node.kwargs), lambda x: f"%{index[x]}")
        lines.append(f"{node.op}|{target!r}|{mapped!r}")
    lines.extend(_arg_signature(a) for a in args)
    return "\n".join(lines)


def _arg_signature(value: Any) -> str:
    """Shape, stride, dtype, device and grad flag of an example input (symbolic where dynamic)."""
    if isinstance(value, torch.Tensor):
        return (f"T{tuple(map(str, value.shape))}{tuple(map(str, value.stride()))}"
                f"{value.dtype}{value.device}{value.requires_grad}")
    if isinstance(value, torch.SymInt):
        return f"S{value.node.expr}"
    return repr(value)
