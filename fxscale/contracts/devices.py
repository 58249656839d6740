"""The devices a deployment is given: N alike devices, each with its memory (bytes for
weights and KV caches) and its compute slots (executions at once). Both policies get the same
devices; what they trade is where replicas go, since every replica's weights and KV blocks
must fit in the memory of the device that holds it. No torch."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from fxscale.contracts.errors import InputError

MAX_DEVICES = 256
MAX_SLOTS = 256
UNIT_NAMES = ("B", "KB", "MB", "GB", "KiB", "MiB", "GiB")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20,
         "GIB": 1 << 30}  # by the name in capitals


class PlacementError(RuntimeError):
    """No device has the memory for a replica (nothing was placed)."""


@dataclass(frozen=True)
class Devices:
    """`count` devices of `memory` bytes (None: as much as the machine has) and `slots`
    executions at once each; `per_node`: devices that share a machine (devices 0 to
    per_node - 1 on one, and so on: on Ray each machine's devices are packed on one node;
    None: Ray spreads every device)."""

    count: int = 1
    memory: int | None = None
    slots: int = 1
    per_node: int | None = None

    def __post_init__(self) -> None:
        for name, value, most in (("count", self.count, MAX_DEVICES),
                                  ("slots", self.slots, MAX_SLOTS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"Devices {name} must be an integer from 1 to {most}, got "
                                 f"{value!r}")
        if self.per_node is not None and (isinstance(self.per_node, bool)
                                          or not isinstance(self.per_node, int)
                                          or not 1 <= self.per_node <= self.count):
            raise ValueError(f"Devices per_node must be an integer from 1 to the count "
                             f"({self.count}), or None, got {self.per_node!r}")
        if self.memory is not None and (isinstance(self.memory, bool)
                                        or not isinstance(self.memory, int)
                                        or self.memory < 1):
            raise ValueError(f"Devices memory must be a positive number of bytes (or None: "
                             f"unbounded), got {self.memory!r}")

    @property
    def total_slots(self) -> int:
        """Executions at once over every device."""
        return self.count * self.slots

    def describe(self) -> str:
        """'4 devices x 512 MiB, 1 slot each'."""
        memory = "unbounded memory" if self.memory is None else format_bytes(self.memory)
        nodes = "" if self.per_node is None else f", {self.per_node} per node"
        return (f"{self.count} device{'s' * (self.count != 1)} x {memory}, {self.slots} "
                f"slot{'s' * (self.slots != 1)} each{nodes}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> Devices:
        """Devices from 'COUNTxMEMORY[xSLOTS]', e.g. '4x512MiB' or '2x1.5GiBx2' (memory
        with a unit: B, KB, MB, GB, KiB, MiB, GiB)."""
        parts = text.strip().split("x")
        if len(parts) not in (2, 3) or not parts[0].isdigit():
            raise InputError(f"devices {text!r}: expected COUNTxMEMORY[xSLOTS], e.g. "
                             "'4x512MiB' or '2x1.5GiBx2'")
        slots = parts[2] if len(parts) == 3 else "1"
        if not slots.isdigit():
            raise InputError(f"devices {text!r}: slots {slots!r} is not a whole number")
        try:
            return cls(int(parts[0]), parse_bytes(parts[1]), int(slots))
        except ValueError as err:
            raise InputError(f"devices {text!r}: {err}") from None


def parse_bytes(text: str) -> int:
    """Bytes from '512MiB', '1.5GiB', '2e9' (an InputError that names the units otherwise)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in UNITS:
        raise InputError(f"memory {text!r}: expected a number with a unit, one of "
                         f"{', '.join(UNIT_NAMES)}, e.g. 512MiB")
    return int(float(match.group(1)) * UNITS[unit])


def format_bytes(value: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '512 MiB'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"
