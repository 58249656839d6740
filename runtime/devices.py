"""Analytic device models: peak rates, bandwidths, capacity, power, and a roofline latency.

GPU constants come from vendor datasheets (runtime/devices.json cites each one; see
docs/devices.md). The local CPU is calibrated by short microbenchmarks (cpu_calibration.py).
Pure Python: the planner and simulator import this without torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

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
        return self.launch_overhead_s + max(self.compute_time(flops, dtype),
                                            self.memory_time(nbytes))

    def bound(self, flops: float, nbytes: float, dtype: str = "bf16") -> str:
        """'compute' or 'memory': which side of the roofline the work falls on."""
        return "compute" if self.compute_time(flops, dtype) >= self.memory_time(nbytes) \
            else "memory"

    def ridge_point(self, dtype: str = "bf16") -> float:
        """Arithmetic intensity (FLOP/B) where the roofline turns from memory- to compute-bound."""
        return (self.peak(dtype) * self.compute_efficiency) / (
            self.memory_bandwidth * self.memory_efficiency)


def _ramp_time(work: float, rate: float, half_time: float) -> float:
    """Time of `work` at a rate that ramps up with size: work/rate + half_time.

    Equivalent to an achieved rate of rate * w / (w + rate * half_time): small work reaches
    a fraction of the rate, large work approaches it.
    """
    if work <= 0:
        return 0.0
    return work / rate + half_time


def _catalogue() -> dict[str, Any]:
    """The device catalogue shipped with the package."""
    return json.loads(resources.files("fxscale.runtime").joinpath("devices.json").read_text())


def device_names() -> list[str]:
    """Names of the GPU models in the catalogue, plus 'cpu'."""
    return sorted(_catalogue()["devices"]) + ["cpu"]


def load_device(name: str) -> DeviceModel:
    """A device model by name ('h100', 'h200', 'a100', 'l4', or 'cpu': calibrated locally)."""
    if name == "cpu":
        from .cpu_calibration import cpu_device

        return cpu_device()
    catalogue = _catalogue()
    if name not in catalogue["devices"]:
        raise ValueError(f"unknown device {name!r}; choose one of {device_names()}")
    spec = catalogue["devices"][name]
    eff = catalogue["efficiency"][spec["kind"]]
    return DeviceModel(
        name=name, description=spec["description"], kind=spec["kind"],
        peak_flops=dict(spec["peak_flops"]), memory_bandwidth=spec["memory_bandwidth"],
        memory_bytes=spec["memory_bytes"], interconnect=dict(spec["interconnect"]),
        max_power_w=spec["max_power_w"], idle_power_w=spec["idle_power_w"],
        compute_efficiency=eff["compute"], memory_efficiency=eff["memory"],
        half_time_s=eff["half_time_s"], launch_overhead_s=eff["launch_overhead_s"],
        sources={**spec["sources"], "efficiency": catalogue["efficiency"]["sources"]})
