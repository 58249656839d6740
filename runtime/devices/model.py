"""Analytic device models: peak rates, bandwidths, capacity, power, and a roofline latency.

GPU constants come from vendor datasheets (runtime/devices.json cites each one; see
docs/devices.md). The local CPU is calibrated by short microbenchmarks (cpu_calibration.py).
Pure Python: the planner and simulator import this without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

UNMEASURED_ALL_REDUCE_LATENCY_S = 10e-6  # assumption, for devices without measured profiles
FIT_DTYPE = "fp16"  # the dtype measured kernel profiles ran in (Vidur's): other dtypes scale


@dataclass(frozen=True)
class KernelFit:
    """One kernel class fitted to measured times. Compute-bound classes (GEMMs): latency plus
    the p-norm of compute and memory time, ((F / compute_rate)^n + (B / memory_rate)^n)^(1/n)
    with n = `sharpness` (a large n is the roofline's max, n = 1 their sum). Memory-bound
    classes: latency + B / memory_rate, the bytes beyond `cache_bytes` (what the cache held
    from the kernel before) also at `beyond_rate` (DRAM's extra cost)."""

    latency_s: float
    memory_rate: float                  # B/s
    compute_rate: float | None = None   # FLOP/s at FIT_DTYPE; None: memory-bound
    sharpness: float = 1.0
    cache_bytes: float = 0.0
    beyond_rate: float | None = None    # B/s; None: no cache effect

    def time(self, flops: Any, nbytes: Any, rate_scale: float = 1.0) -> Any:
        """Seconds of kernels of this class (also elementwise over arrays)."""
        memory = nbytes / self.memory_rate
        if self.beyond_rate:
            beyond = nbytes - self.cache_bytes
            beyond = np.maximum(0.0, beyond) if isinstance(beyond, np.ndarray) \
                else max(0.0, beyond)
            memory = memory + beyond / self.beyond_rate
        if not self.compute_rate:
            return self.latency_s + memory
        compute = flops / (self.compute_rate * rate_scale)
        n = self.sharpness
        return self.latency_s + (compute ** n + memory ** n) ** (1 / n)


@dataclass(frozen=True)
class DeviceModel:
    """One device: peak rates per dtype (FLOP/s), memory bandwidth (B/s), capacity, power."""

    name: str
    description: str
    kind: str
    peak_flops: dict[str, float]
    memory_bandwidth: float
    memory_bytes: float
    interconnect: dict[str, float]
    max_power_w: float
    idle_power_w: float
    compute_efficiency: float
    memory_efficiency: float
    half_time_s: float
    launch_overhead_s: float
    sources: dict[str, str] = field(default_factory=dict)
    # workers on one node -> (latency s, ring bandwidth B/s), fitted to measured all-reduces
    all_reduce: dict[int, tuple[float, float]] = field(default_factory=dict)
    # kernel class (gemm, norm, embedding, rotary, activation, residual) -> its fit to
    # measured operator times
    kernels: dict[str, KernelFit] = field(default_factory=dict)
    # (kernel, dtype) -> timer, ("all-reduce", workers) -> ring constants: built once
    _timers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for a dtype, with a clear error for dtypes the device has no rate for."""
        if dtype not in self.peak_flops:
            raise ValueError(f"device {self.name!r} has no peak rate for dtype {dtype!r}; "
                             f"known: {sorted(self.peak_flops)}")
        return self.peak_flops[dtype]

    def compute_time(self, flops: float, dtype: str) -> float:
        """Seconds for `flops` at the achieved (size-dependent) compute rate."""
        return _ramp_time(flops, self.peak(dtype) * self.compute_efficiency, self.half_time_s)

    def memory_time(self, nbytes: float) -> float:
        """Seconds to move `nbytes` at the achieved (size-dependent) bandwidth."""
        return _ramp_time(nbytes, self.memory_bandwidth * self.memory_efficiency,
                          self.half_time_s)

    def latency(self, flops: float, nbytes: float, dtype: str = "bf16") -> float:
        """Roofline latency of a kernel group: overhead + max(compute time, memory time)."""
        return self.timer(None, dtype)(flops, nbytes)

    def timer(self, kernel: str | None, dtype: str = "bf16") -> Callable[[float, float],
                                                                          float]:
        """seconds(flops, bytes) of a kernel class at a dtype: its measured fit when the
        device has one (no work takes no time), else the roofline (`latency`). Built once
        per (kernel, dtype) with its constants bound: the planner and simulator call it for
        every part of every step they cost."""
        key = (kernel if kernel in self.kernels else None, dtype)
        if key not in self._timers:
            self._timers[key] = self._fit_timer(self.kernels[key[0]], dtype) if key[0] \
                else self._roofline_timer(dtype)
        return self._timers[key]

    def _roofline_timer(self, dtype: str) -> Callable[[float, float], float]:
        """The roofline as a timer: overhead + max of the ramped compute and memory times."""
        rate = self.peak(dtype) * self.compute_efficiency
        bandwidth = self.memory_bandwidth * self.memory_efficiency
        half, launch = self.half_time_s, self.launch_overhead_s

        def seconds(flops: float, nbytes: float) -> float:
            return launch + max(_ramp_time(flops, rate, half), _ramp_time(nbytes, bandwidth, half))
        return seconds

    def _fit_timer(self, fit: KernelFit, dtype: str) -> Callable[[float, float], float]:
        """A kernel fit as a timer, its rate scaled to the dtype's peak."""
        scale = self.peak(dtype) / self.peak(FIT_DTYPE)

        def seconds(flops: float, nbytes: float) -> float:
            if flops <= 0 and nbytes <= 0:
                return 0.0
            return fit.time(flops, nbytes, scale)
        return seconds

    def efficient_compute(self, dtype: str = "bf16") -> float:
        """The highest FLOP/s any of its models reaches at a dtype (the roofline's efficient
        rate or a kernel fit's): what a lower bound may assume."""
        scale = self.peak(dtype) / self.peak(FIT_DTYPE) if FIT_DTYPE in self.peak_flops else 1
        fitted = [f.compute_rate * scale for f in self.kernels.values() if f.compute_rate]
        return max([self.peak(dtype) * self.compute_efficiency, *fitted])

    def efficient_bandwidth(self) -> float:
        """The highest B/s any of its models reaches (see efficient_compute)."""
        return max([self.memory_bandwidth * self.memory_efficiency,
                    *(f.memory_rate for f in self.kernels.values())])

    def kernel_time(self, kernel: str | None, flops: float, nbytes: float,
                    dtype: str = "bf16") -> float:
        """Seconds of one kernel class's work: its measured fit when the device has one for
        `kernel`, else the roofline `latency`; no work takes no time."""
        return self.timer(kernel, dtype)(flops, nbytes)

    def all_reduce_time(self, nbytes: float, workers: int) -> float:
        """Seconds of an all-reduce of `nbytes` over `workers` devices of one node: the
        measured ring constants of the smallest measured worker count >= `workers` (the
        largest otherwise); without measurements, a ring over the fastest link at
        UNMEASURED_ALL_REDUCE_LATENCY_S (an assumption)."""
        if workers <= 1:
            return 0.0
        key = ("all-reduce", workers)
        if key not in self._timers:
            if self.all_reduce:
                counts = sorted(self.all_reduce)
                self._timers[key] = self.all_reduce[next((n for n in counts if n >= workers),
                                                         counts[-1])]
            else:
                self._timers[key] = (UNMEASURED_ALL_REDUCE_LATENCY_S,
                                     self.interconnect.get("nvlink", self.interconnect["pcie"]))
        return ring_all_reduce_time(nbytes, workers, *self._timers[key])

    def bound(self, flops: float, nbytes: float, dtype: str = "bf16") -> str:
        """'compute' or 'memory': which side of the roofline the work falls on."""
        return "compute" if self.compute_time(flops, dtype) >= self.memory_time(nbytes) \
            else "memory"

    def ridge_point(self, dtype: str = "bf16") -> float:
        """Arithmetic intensity (FLOP/B) where the roofline turns from memory- to compute-bound."""
        return (self.peak(dtype) * self.compute_efficiency) / (
            self.memory_bandwidth * self.memory_efficiency)


def ring_all_reduce_time(nbytes: Any, workers: int, latency: float, bandwidth: float) -> Any:
    """A ring all-reduce: a fixed latency plus 2(n-1)/n of the bytes over each link (also
    elementwise over an array of sizes)."""
    return latency + 2 * (workers - 1) / workers * nbytes / bandwidth


def _ramp_time(work: float, rate: float, half_time: float) -> float:
    """Time of `work` at a rate that ramps up with size: work/rate + half_time.

    Equivalent to an achieved rate of rate * w / (w + rate * half_time): small work reaches
    a fraction of the rate, large work approaches it.
    """
    if work <= 0:
        return 0.0
    return work / rate + half_time
