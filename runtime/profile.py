"""The Profile contract: per operator group, latency at (phase, batch, length) on one device.

Every number records where it came from (measured on a device, or analytic from a device
model) and, for fitted models, how wrong it may be. JSON on disk; loading checks every
field and names the one that is wrong. Pure Python: no torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fxscale.jsonio import read_json

PROFILE_VERSION = 1
PHASES = ("prefill", "decode")


@dataclass
class ProfilePoint:
    """Latency of one group at one grid point: median and spread over repeated runs (seconds)."""

    phase: str
    batch: int
    length: int
    median_s: float
    p10_s: float
    p90_s: float
    repeats: int


@dataclass
class GroupProfile:
    """The measured or analytic points of one group, and its fitted latency model if any."""

    group: str
    name: str
    points: list[ProfilePoint]
    stateful: bool = False
    fit: dict[str, Any] | None = None

    def at(self, phase: str, batch: int, length: int) -> ProfilePoint | None:
        """The point measured at exactly this (phase, batch, length), if any."""
        return next((p for p in self.points
                     if (p.phase, p.batch, p.length) == (phase, batch, length)), None)


@dataclass
class Profile:
    """Latency profiles of every operator group of one model on one device."""

    model: str
    granularity: str
    device: str
    source: str
    dtype: str
    threads: int
    versions: dict[str, str]
    groups: list[GroupProfile]
    notes: list[str] = field(default_factory=list)
    version: int = PROFILE_VERSION

    def group(self, group_id: str) -> GroupProfile:
        """The profile of one group."""
        for g in self.groups:
            if g.group == group_id:
                return g
        raise KeyError(f"no profile for group {group_id!r}; have {[g.group for g in self.groups]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON text; also write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Profile:
        """Load from JSON text or a path to a JSON file, checking every field."""
        return cls.from_dict(*read_json(text_or_path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "<dict>") -> Profile:
        """Build from a dict, raising ValueError('<file>: field <path> ...') on any bad field."""
        check = _Checker(where)
        check.kind(data, dict, "profile")
        version = check.field(data, "version", int, "")
        if version != PROFILE_VERSION:
            raise ValueError(f"{where}: field 'version' is {version!r}; this fxscale reads "
                             f"profile version {PROFILE_VERSION} (re-run fxscale profile)")
        top = {name: check.field(data, name, kind, "") for name, kind in (
            ("model", str), ("granularity", str), ("device", str), ("source", str),
            ("dtype", str), ("threads", int), ("versions", dict), ("groups", list))}
        if top["threads"] <= 0:
            raise ValueError(f"{where}: field 'threads' must be positive, got {top['threads']}")
        groups = []
        for i, g in enumerate(top["groups"]):
            at = f"groups[{i}]."
            check.kind(g, dict, at[:-1])
            points = []
            for j, p in enumerate(check.field(g, "points", list, at)):
                pat = f"{at}points[{j}]."
                check.kind(p, dict, pat[:-1])
                phase = check.field(p, "phase", str, pat)
                if phase not in PHASES:
                    raise ValueError(f"{where}: field '{pat}phase' must be one of {list(PHASES)}, "
                                     f"got {phase!r}")
                values = {name: check.field(p, name, int, pat)
                          for name in ("batch", "length", "repeats")}
                times = {name: check.field(p, name, (int, float), pat)
                         for name in ("median_s", "p10_s", "p90_s")}
                for name, value in values.items():
                    if value < 1:
                        raise ValueError(f"{where}: field '{pat}{name}' must be at least 1, "
                                         f"got {value!r}")
                for name, value in times.items():
                    if not math.isfinite(value) or value < 0:
                        raise ValueError(f"{where}: field '{pat}{name}' must be a non-negative "
                                         f"time in seconds, got {value!r}")
                points.append(ProfilePoint(phase=phase, **values, **times))
            fit = g.get("fit")
            if fit is not None:
                check.kind(fit, dict, f"{at}fit")
                check.kind(check.field(fit, "phases", dict, f"{at}fit."), dict, f"{at}fit.phases")
            stateful = g.get("stateful", False)
            check.kind(stateful, bool, f"{at}stateful")
            groups.append(GroupProfile(group=check.field(g, "group", str, at),
                                       name=check.field(g, "name", str, at), points=points,
                                       stateful=stateful, fit=fit))
        return cls(model=top["model"], granularity=top["granularity"], device=top["device"],
                   source=top["source"], dtype=top["dtype"], threads=top["threads"],
                   versions=top["versions"], groups=groups, notes=_notes(data, check))


def _notes(data: dict, check: _Checker) -> list[str]:
    """The optional notes: a list of strings."""
    notes = data.get("notes", [])
    check.kind(notes, list, "field 'notes'")
    for i, note in enumerate(notes):
        check.kind(note, str, f"field 'notes[{i}]'")
    return notes


class _Checker:
    """Field checks that name the file and the field path in their errors."""

    def __init__(self, where: str) -> None:
        self.where = where

    def kind(self, value: Any, kind: type | tuple, path: str) -> None:
        """Raise unless value has the JSON type `kind`."""
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ValueError(f"{self.where}: {path} must be a JSON "
                             f"{getattr(kind, '__name__', 'number')}, got {type(value).__name__}")

    def field(self, data: dict, name: str, kind: type | tuple, prefix: str) -> Any:
        """The value of a required field of type `kind`."""
        if name not in data:
            raise ValueError(f"{self.where}: missing field '{prefix}{name}'")
        value = data[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            raise ValueError(f"{self.where}: field '{prefix}{name}' must be {expected}, "
                             f"got {value!r}")
        return value
