"""Calibrate the local CPU's device model with short microbenchmarks, cached to a JSON file."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

from fxscale.contracts.jsonio import cache_root, write_atomic
from fxscale.runtime.devices import DeviceModel, load_device

CALIBRATION_VERSION = 1
# No vendor figures for an unknown CPU's power: modelling assumptions, stated as such.
WATTS_PER_CORE = 15.0
IDLE_FRACTION = 0.3


def cache_path() -> Path:
    """Where calibrations are cached ($FXSCALE_CACHE_DIR, else $XDG_CACHE_HOME/fxscale)."""
    return cache_root() / "cpu-calibration.json"


def _cpu_key() -> str:
    """What a calibration depends on: processor, thread count, torch version."""
    import torch

    return f"{platform.processor() or platform.machine()}|{cpu_name()}|" \
           f"threads={torch.get_num_threads()}|torch={torch.__version__}"


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo where available."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure() -> dict:
    """Run the microbenchmarks (about a second): matmul rate, copy bandwidth, overheads."""
    import torch

    big = 1024
    a, b = torch.randn(big, big), torch.randn(big, big)
    matmul_rate = 2 * big ** 3 / _best_time(lambda: torch.mm(a, b), 5)
    src = torch.empty(32 * 1024 * 1024)  # 128 MiB, well beyond the caches
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * 4
    bandwidth = copy_bytes / _best_time(lambda: dst.copy_(src), 5)
    tiny = torch.ones(1)
    overhead = _best_time(lambda: tiny.add(1), 200)
    # half-time: how much longer than work/rate small kernels take (median over small sizes)
    extra = []
    for n in (32, 64, 128):
        x, y = torch.randn(n, n), torch.randn(n, n)
        extra.append(_best_time(lambda: torch.mm(x, y), 20) - 2 * n ** 3 / matmul_rate - overhead)
    for numel in (4096, 65536):
        s, d = torch.empty(numel), torch.empty(numel)
        extra.append(_best_time(lambda: d.copy_(s), 20) - 8 * numel / bandwidth - overhead)
    return {"version": CALIBRATION_VERSION, "key": _cpu_key(), "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "fp32_flops": matmul_rate,
            "memory_bandwidth": bandwidth, "launch_overhead_s": overhead,
            "half_time_s": max(statistics.median(extra), 0.0), "measured_at": time.time()}


def calibration(refresh: bool = False) -> dict:
    """The cached calibration for this CPU, measuring (and caching) it when missing or stale."""
    path = cache_path()
    if not refresh and path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("version") == CALIBRATION_VERSION and cached.get("key") == _cpu_key():
                return cached
        except (OSError, json.JSONDecodeError):
            pass  # unreadable cache: measure again and overwrite it
    result = measure()
    try:
        write_atomic(path, json.dumps(result, indent=1))
    except OSError as err:
        warnings.warn(f"fxscale: could not cache the CPU calibration at {path} ({err}); "
                      "set FXSCALE_CACHE_DIR to a writable folder", stacklevel=2)
    return result


def cpu_device(refresh: bool = False) -> DeviceModel:
    """The local CPU as a DeviceModel, from its (cached) calibration."""
    cal = calibration(refresh)
    cores = os.cpu_count() or 1
    return DeviceModel(
        name="cpu", description=f"{cal['cpu']} ({cal['threads']} threads, calibrated)",
        kind="cpu", peak_flops={"fp32": cal["fp32_flops"]},
        memory_bandwidth=cal["memory_bandwidth"], memory_bytes=_memory_bytes(),
        interconnect={}, max_power_w=WATTS_PER_CORE * cores,
        idle_power_w=WATTS_PER_CORE * cores * IDLE_FRACTION,
        compute_efficiency=1.0, memory_efficiency=1.0, half_time_s=cal["half_time_s"],
        launch_overhead_s=cal["launch_overhead_s"],
        sources={"peak_flops": "measured: best of 5 fp32 1024^3 matmuls (torch.mm)",
                 "memory_bandwidth": "measured: best of 5 copies of 128 MiB (read + write)",
                 "half_time_s": "measured: extra time of 32-128 matmuls and small copies",
                 "launch_overhead_s": "measured: best of 200 one-element adds",
                 "max_power_w": f"assumption: {WATTS_PER_CORE:g} W per core (no vendor figure)",
                 "idle_power_w": f"assumption: {IDLE_FRACTION:.0%} of max power",
                 "cache": str(cache_path())})


def _memory_bytes() -> float:
    """Physical memory of this machine."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def device_model(name: str) -> DeviceModel:
    """A device model by name: a catalogued one, or for 'cpu' this machine's calibration."""
    return cpu_device() if name == "cpu" else load_device(name)
