"""The Profile contract: per operator group, latency at (phase, batch, length) on one device.

Every number records where it came from (measured on a device, or analytic from a device
model) and, for fitted models, how wrong it may be. JSON on disk; loading checks every
field and names the one that is wrong. Pure Python: no torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fxscale.contracts.jsonio import Checker, read_json, write_atomic

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
            write_atomic(Path(path), text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Profile:
        """Load from JSON text or a path to a JSON file, checking every field."""
        return cls.from_dict(*read_json(text_or_path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "<dict>") -> Profile:
        """Build from a dict, raising InputError('<file>: field <path> ...') on any bad field."""
        check = Checker(where, "a Profile")
        check.object(data, "")
        version = check.get(data, "version")
        if version != PROFILE_VERSION:
            check.fail("version", f"is {version!r}; this fxscale reads profile version "
                                  f"{PROFILE_VERSION} (re-run fxscale profile)")
        check.unknown(data, {f.name for f in fields(cls)})
        top = {name: check.string(check.get(data, name), name)
               for name in ("model", "granularity", "device", "source", "dtype")}
        threads = int(check.number(check.get(data, "threads"), "threads", 1, integer=True))
        versions = check.object(check.get(data, "versions"), "versions")
        for name, value in versions.items():
            check.string(value, f"versions.{name}")
        groups = [_group(check, g, f"groups[{i}]")
                  for i, g in enumerate(check.array(check.get(data, "groups"), "groups"))]
        notes = check.array(check.get(data, "notes", default=[]), "notes")
        for i, note in enumerate(notes):
            check.string(note, f"notes[{i}]")
        return cls(**top, threads=threads, versions=versions, groups=groups, notes=notes)


def _group(check: Checker, data: Any, at: str) -> GroupProfile:
    """One group's points and optional fit."""
    check.object(data, at)
    check.unknown(data, {f.name for f in fields(GroupProfile)}, f"{at}.")
    points = [_point(check, p, f"{at}.points[{j}]")
              for j, p in enumerate(check.array(check.get(data, "points", f"{at}."),
                                                f"{at}.points"))]
    fit = check.get(data, "fit", f"{at}.", None)
    if fit is not None:
        check.object(fit, f"{at}.fit")
        check.object(check.get(fit, "phases", f"{at}.fit."), f"{at}.fit.phases")
    return GroupProfile(group=check.string(check.get(data, "group", f"{at}."), f"{at}.group"),
                        name=check.string(check.get(data, "name", f"{at}."), f"{at}.name"),
                        points=points, fit=fit,
                        stateful=check.boolean(check.get(data, "stateful", f"{at}.", False),
                                               f"{at}.stateful"))


def _point(check: Checker, data: Any, at: str) -> ProfilePoint:
    """One measured point: phase, sizes of at least 1, times in seconds (finite, >= 0)."""
    check.object(data, at)
    check.unknown(data, {f.name for f in fields(ProfilePoint)}, f"{at}.")
    phase = check.string(check.get(data, "phase", f"{at}."), f"{at}.phase", PHASES)
    sizes = {name: int(check.number(check.get(data, name, f"{at}."), f"{at}.{name}", 1,
                                    integer=True)) for name in ("batch", "length", "repeats")}
    times = {name: float(check.number(check.get(data, name, f"{at}."), f"{at}.{name}", 0))
             for name in ("median_s", "p10_s", "p90_s")}
    return ProfilePoint(phase=phase, **sizes, **times)
