"""fxscale.profile: measure every operator group's latency over a (phase, batch, length) grid.

The model is compiled with the fxscale backend and run at every grid point; a forward
pre-hook on each group records the inputs the group really receives there (prefill: the
concatenated tokens of the batch; decode: one new token per request against a KV cache of
the stated context length). Each group is then timed alone on those inputs: warm-up runs,
repeated runs rotating over several independently drawn inputs (so caches do not flatter the
numbers), median and 10th/90th percentiles. CUDA is timed with CUDA events.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from fxscale.compiler import backend
from fxscale.compiler.options import Options
from fxscale.contracts.profile import PHASES, GroupProfile, Profile, ProfilePoint
from fxscale.profiling.workloads import inputs_for


@dataclass(frozen=True)
class Grid:
    """Where to measure: batch sizes x lengths, for each phase."""

    batches: tuple[int, ...] = (1, 2, 4)
    lengths: tuple[int, ...] = (16, 32, 64)
    phases: tuple[str, ...] = PHASES

    def __post_init__(self) -> None:
        for name in ("batches", "lengths"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"grid {name} must be positive integers, got {values!r}")
            # sorted and distinct: slopes and "largest" lookups rely on it
            object.__setattr__(self, name, tuple(sorted(set(values))))
        unknown = set(self.phases) - set(PHASES)
        if unknown or not self.phases:
            raise ValueError(f"grid phases must be among {list(PHASES)}, got {self.phases!r}")

    def points(self) -> list[tuple[str, int, int]]:
        """Every (phase, batch, length) of the grid."""
        return [(p, b, n) for p in self.phases for b in self.batches for n in self.lengths]


class _Recorder:
    """Forward pre-hooks on group modules that keep the inputs each group receives."""

    def __init__(self, compiler: backend.Backend) -> None:
        self.active = False
        self.calls: dict[str, list[tuple[torch.nn.Module, tuple]]] = defaultdict(list)
        self.hooks: dict[int, Any] = {}
        self.compiler = compiler

    def graphs(self) -> list:
        """The group graphs compiled for this profile's model."""
        return self.compiler.group_graphs

    def attach(self) -> None:
        """Hook every group of every graph compiled for this profile."""
        for graph in self.graphs():
            for group in graph.groups:
                module = group.callable
                if isinstance(module, torch.nn.Module) and id(module) not in self.hooks:
                    self.hooks[id(module)] = module.register_forward_pre_hook(
                        partial(self._record, group.name))

    def detach(self) -> None:
        """Remove the hooks and drop the recorded inputs."""
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()
        self.calls.clear()

    def _record(self, name: str, module: torch.nn.Module, args: tuple) -> None:
        if self.active:
            self.calls[name].append((module, args))


def profile(model: torch.nn.Module, grid: Grid = Grid(), *, granularity: str = "operator",
            lowering: str = "inductor", repeats: int = 7, warmup: int = 2, rotations: int = 3,
            seed: int = 0, progress: bool = True) -> Profile:
    """Measure each operator group of a model over `grid` on the device its weights are on.

    `model` is a Hugging Face causal LM or Whisper-style encoder-decoder (or the result of
    torch.compile on one); it is compiled again with the fxscale backend.
    """
    if repeats < 1 or warmup < 0 or rotations < 1:
        raise ValueError(f"repeats and rotations must be >= 1 and warmup >= 0, got "
                         f"repeats={repeats}, warmup={warmup}, rotations={rotations}")
    module = getattr(model, "_orig_mod", model).eval()
    compiler = backend.Backend(Options(granularity=granularity, lowering=lowering))
    compiled = torch.compile(module, backend=compiler)
    inputs = inputs_for(module)
    limit = inputs.max_length()
    if limit is not None and max(grid.lengths) + 1 > limit:
        raise ValueError(f"grid lengths go up to {max(grid.lengths)}, but {type(module).__name__} "
                         f"has {limit} positions (decode needs length + 1): lower the lengths")
    device = next(module.parameters()).device
    recorder = _Recorder(compiler)
    from rich.progress import Progress  # imported here: `import fxscale` stays light
    generator = torch.Generator().manual_seed(seed)
    points: dict[str, list[ProfilePoint]] = defaultdict(list)
    try:
        with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("profiling operator groups", total=len(grid.points()))
            for phase, batch, length in grid.points():
                recorder.calls.clear()
                # fresh inputs per call: a decode step appends to the cache it is given
                compiled(**inputs.for_phase(phase, batch, length, generator))  # compiles
                recorder.attach()
                recorder.active = True
                for _ in range(rotations):
                    compiled(**inputs.for_phase(phase, batch, length, generator))
                recorder.active = False
                for name, calls in dict(recorder.calls).items():
                    times = _time_group(calls, repeats, warmup, device)
                    points[name].append(ProfilePoint(
                        phase=phase, batch=batch, length=length,
                        median_s=statistics.median(times), p10_s=_quantile(times, 0.1),
                        p90_s=_quantile(times, 0.9), repeats=len(times)))
                bar.advance(task)
    finally:
        recorder.detach()  # even when a step fails: no hooks left behind
    if not points:
        raise RuntimeError(f"no operator group of {type(module).__name__} was recorded: the "
                           "fxscale backend fell back to eager (see its warnings)")
    known = {g.name: g for graph in recorder.graphs() for g in graph.groups}
    groups = [GroupProfile(group=known[name].id, name=name, points=pts,
                           stateful=known[name].stateful) for name, pts in points.items()]
    return Profile(model=type(module).__name__, granularity=granularity,
                   device=device_description(device), source="measured",
                   dtype=dtype_name(next(module.parameters()).dtype),
                   threads=torch.get_num_threads(), versions=library_versions(), groups=groups,
                   notes=[f"lowering={lowering}, repeats={repeats}, warmup={warmup}, "
                          f"rotations={rotations}, seed={seed}"])


def _time_group(calls: list[tuple[torch.nn.Module, tuple]], repeats: int, warmup: int,
                device: torch.device) -> list[float]:
    """Seconds per call of one group, rotating over the recorded inputs."""
    for i in range(warmup):
        module, args = calls[i % len(calls)]
        module(*args)
    times = []
    for i in range(repeats):
        module, args = calls[i % len(calls)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            module(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            module(*args)
            times.append(time.perf_counter() - begin)
    return times


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    """The device-model name of a torch dtype (fp32, bf16, ...)."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"no device-model rates for dtype {dtype}; use one of "
                         f"{[str(d) for d in DTYPE_NAMES]}")
    return DTYPE_NAMES[dtype]


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile (linear interpolation) of a list of values."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def device_description(device: torch.device) -> str:
    """Human-readable description of the device measurements ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from fxscale.profiling.cpu_calibration import cpu_name

    return f"cpu: {cpu_name()} ({os.cpu_count()} cores)"


def library_versions() -> dict[str, str]:
    """Versions that affect measured latency."""
    import transformers

    from fxscale import __version__

    return {"fxscale": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
