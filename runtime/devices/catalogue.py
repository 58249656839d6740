"""The device catalogue shipped with the package (devices.json: peak rates, bandwidths,
memory, power, calibrated efficiencies, with sources) and `load_device`. Pure Python; the
local CPU's model is measured with torch: `fxscale.profiling.device_model("cpu")`."""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fxscale.contracts.errors import InputError

from .model import DeviceModel, KernelFit


def _catalogue() -> dict[str, Any]:
    """The device catalogue shipped with the package."""
    text = resources.files("fxscale.runtime.devices").joinpath("devices.json").read_text()
    return json.loads(text)


def device_names() -> list[str]:
    """Names of the GPU models in the catalogue, plus 'cpu' (see fxscale.profiling)."""
    return sorted(_catalogue()["devices"]) + ["cpu"]


def load_device(name: str) -> DeviceModel:
    """A catalogued device model by name ('h100', 'h200', 'a100', 'l4')."""
    if name == "cpu":
        raise InputError("the CPU's device model is measured on this machine (with torch): "
                         "use fxscale.profiling.device_model('cpu')")
    catalogue = _catalogue()
    if name not in catalogue["devices"]:
        raise InputError(f"unknown device {name!r}; choose one of {device_names()}")
    spec = catalogue["devices"][name]
    eff = catalogue["efficiency"][spec["kind"]]
    return DeviceModel(
        name=name, description=spec["description"], kind=spec["kind"],
        peak_flops=dict(spec["peak_flops"]), memory_bandwidth=spec["memory_bandwidth"],
        memory_bytes=spec["memory_bytes"], interconnect=dict(spec["interconnect"]),
        max_power_w=spec["max_power_w"], idle_power_w=spec["idle_power_w"],
        compute_efficiency=eff["compute"], memory_efficiency=eff["memory"],
        half_time_s=eff["half_time_s"], launch_overhead_s=eff["launch_overhead_s"],
        sources={**spec["sources"], "efficiency": catalogue["efficiency"]["sources"]},
        all_reduce={int(n): (c["latency_s"], c["bandwidth"])
                    for n, c in spec.get("all_reduce", {}).items()},
        kernels={name: KernelFit(**fit) for name, fit in spec.get("kernels", {}).items()})
