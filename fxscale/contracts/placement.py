"""Where each replica lives: the deployment's devices (contracts/devices.py), what each holds
(weights and KV caches, in bytes) and its compute slots. The one placement rule the live
executor and the simulator both follow. No torch.

A replica is placed when it starts and released when it stops. A group pinned to devices
(a plan's placement: `pin`) is placed on those devices only. Placement is refused
(PlacementError) when no allowed device has the memory left; otherwise it goes, in order of
preference, to the device that already holds its attention replica's other layers (a
request's KV blocks of every layer stay on one device), to a device holding no replica of
the same group (another copy of a group is worth having only where it adds compute), then to
the device with the fewest replicas and the least memory used. A replica's calls take its
device's slots. What every device holds is recorded at each change (the history
`stats()` shows over time)."""
from __future__ import annotations

import fnmatch
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from fxscale.contracts.devices import Devices, PlacementError, format_bytes

HISTORY = 4096  # placement changes kept


@dataclass(frozen=True)
class Demand:
    """A replica to place: who it is (group, replica key), its bytes, and the key of the
    attention replica whose device it prefers (None: no preference)."""

    group: str
    key: int
    weight_bytes: int
    kv_bytes: int
    affinity: int | None = None

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


class Placement:
    """The devices and what each holds (see the module docstring); thread-safe."""

    def __init__(self, devices: Devices, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.devices, self.clock = devices, clock
        self.slots = [threading.Semaphore(devices.slots) for _ in range(devices.count)]
        self.held: dict[tuple[str, int], tuple[int, Demand]] = {}  # (group, key) -> device
        self.pins: dict[str, tuple[int, ...]] = {}  # group pattern -> devices it may use
        self.lock = threading.Lock()
        self.started = clock()
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.peak = [0] * devices.count

    # ---- placing -----------------------------------------------------------------------------
    def place(self, demand: Demand) -> int:
        """Put a replica on a device; its index (PlacementError when none has room)."""
        with self.lock:
            device = self._choose(demand, self._used())
            self.held[(demand.group, demand.key)] = (device, demand)
            self._record()
            return device

    def pin(self, groups: str, devices: tuple[int, ...]) -> None:
        """Place the replicas of the groups a name or pattern ('model.layers.*#1/attention')
        matches from now on only on these devices (() frees them; a group two pins match
        follows the later one); the replicas they have stay where they are (`misplaced`)."""
        wrong = [d for d in devices if not 0 <= d < self.devices.count]
        if wrong:
            raise ValueError(f"cannot pin {groups} to devices {wrong}: the devices are 0 to "
                             f"{self.devices.count - 1} ({self.devices.describe()})")
        with self.lock:
            self.pins.pop(groups, None)
            if devices:
                self.pins[groups] = tuple(sorted(set(devices)))

    def misplaced(self, group: str) -> list[int]:
        """The keys of a group's replicas held on devices its pin does not allow."""
        with self.lock:
            allowed = self._allowed(group)
            return sorted(key for (g, key), (device, _) in self.held.items()
                          if g == group and device not in allowed)

    def _allowed(self, group: str) -> tuple[int, ...] | range:
        """The devices a group may use: its latest pin's, or all (lock held)."""
        pinned = [d for pattern, d in self.pins.items() if fnmatch.fnmatchcase(group, pattern)]
        return pinned[-1] if pinned else range(self.devices.count)

    def check(self, demands: list[Demand], releases: Iterable[tuple[str, int]] = ()) -> None:
        """Raise PlacementError if these replicas could not all be placed now, in this order,
        once the replicas `releases` names ((group, key): stopped first in the same change)
        have freed their memory (nothing is placed or freed)."""
        with self.lock:
            held = dict(self.held)
            for key in releases:
                held.pop(key, None)
            used = self._used(held)
            for demand in demands:
                device = self._choose(demand, used, held)
                used[device] += demand.bytes
                held[(demand.group, demand.key)] = (device, demand)

    def charge(self, group: str, key: int, weight_bytes: int, kv_bytes: int) -> None:
        """Add bytes to a placed replica (state it met after it started), unrefused: the call
        that met it is already running."""
        with self.lock:
            device, demand = self.held[(group, key)]
            self.held[(group, key)] = (device, Demand(
                group, key, demand.weight_bytes + weight_bytes, demand.kv_bytes + kv_bytes,
                demand.affinity))
            self._record()

    def release(self, group: str, key: int) -> None:
        """Free a stopped replica's memory."""
        with self.lock:
            if self.held.pop((group, key), None) is not None:
                self._record()

    def device_of(self, group: str, key: int) -> int:
        """The device a replica lives on."""
        with self.lock:
            return self.held[(group, key)][0]

    def _used(self, held: dict | None = None) -> list[int]:
        used = [0] * self.devices.count
        for device, demand in (self.held if held is None else held).values():
            used[device] += demand.bytes
        return used

    def _choose(self, demand: Demand, used: list[int], held: dict | None = None) -> int:
        """The device for a replica (the module docstring's order), or PlacementError."""
        held = self.held if held is None else held
        memory = self.devices.memory
        allowed = self._allowed(demand.group)
        fits = [d for d in allowed if memory is None or used[d] + demand.bytes <= memory]
        if not fits:
            free = max(memory - used[d] for d in allowed)
            where = f"the {self.devices.describe()}" if isinstance(allowed, range) else \
                f"devices {list(allowed)} it is pinned to"
            raise PlacementError(
                f"no device has room for a replica of {demand.group} "
                f"({format_bytes(demand.weight_bytes)} weights + "
                f"{format_bytes(demand.kv_bytes)} KV): the most free on any of {where} is "
                f"{format_bytes(free)}; give the devices more memory, more devices, or fewer "
                "kv_cache_tokens")
        same_group = {device for (group, _), (device, _) in held.items()
                      if group == demand.group}
        count = [0] * self.devices.count
        for device, _ in held.values():
            count[device] += 1
        partner = {device for device, other in held.values()
                   if demand.affinity is not None and other.affinity == demand.affinity}
        return min(fits, key=lambda d: (d not in partner, d in same_group, count[d], used[d],
                                        d))

    def _record(self) -> None:
        """Note what every device holds now (lock held)."""
        weights, kv = [0] * self.devices.count, [0] * self.devices.count
        for device, demand in self.held.values():
            weights[device] += demand.weight_bytes
            kv[device] += demand.kv_bytes
        for d in range(self.devices.count):
            self.peak[d] = max(self.peak[d], weights[d] + kv[d])
        self.history.append({"t": self.clock() - self.started, "weight_bytes": weights,
                             "kv_bytes": kv})

    def reset_peaks(self) -> None:
        """Peaks afresh from what the devices hold now (the history stays: it is the story)."""
        with self.lock:
            self.peak = self._used()

    # ---- reading -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The devices, and per device: memory, slots, what it holds now, its peak, and its
        replicas; the history of changes."""
        with self.lock:
            rows = []
            for d in range(self.devices.count):
                mine = sorted((g, k, demand) for (g, k), (device, demand) in self.held.items()
                              if device == d)
                rows.append({"device": d, "memory": self.devices.memory,
                             "slots": self.devices.slots,
                             "weight_bytes": sum(m.weight_bytes for _, _, m in mine),
                             "kv_bytes": sum(m.kv_bytes for _, _, m in mine),
                             "peak_bytes": self.peak[d],
                             "replicas": [f"{g}#{k}" for g, k, _ in mine]})
            return {**self.devices.to_dict(), "devices": rows,
                    "pins": {g: list(d) for g, d in sorted(self.pins.items())},
                    "history": list(self.history)}
