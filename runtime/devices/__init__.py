"""fxscale.runtime.devices: analytic device models (peak rates, bandwidths, memory, power,
calibrated roofline efficiencies) from the shipped catalogue, and fits of measured profiles.

Imports contracts only; no torch."""
from .catalogue import device_names, load_device
from .model import DeviceModel

__all__ = ["DeviceModel", "device_names", "load_device"]
