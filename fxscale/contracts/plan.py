"""What a deployment is asked to meet (the SLO: time to first token and time between tokens,
met by a fraction of requests), the scaling policies, and the Plan of a deployment (engines
and per-group placement) that the planner writes, the simulator replays and a live server
applies. No torch."""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from fxscale.contracts.errors import InputError
from fxscale.contracts.jsonio import Checker


@dataclass(frozen=True)
class SLO:
    """Latency targets: TTFT (a base, plus an allowance per prompt token) and mean time
    between tokens (seconds), met by `attainment` of requests (and predicted at that
    percentile)."""

    ttft: float
    tbt: float
    attainment: float = 0.99
    ttft_per_token: float = 0.0  # seconds of TTFT allowed per prompt token on top of ttft

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tbt > 0):
            raise ValueError(f"SLO ttft and tbt must be positive seconds, got {self.ttft}, "
                             f"{self.tbt}")
        if not 0 < self.attainment < 1:
            raise ValueError(f"SLO attainment must be in (0, 1), got {self.attainment}")
        if not (isinstance(self.ttft_per_token, (int, float)) and self.ttft_per_token >= 0):
            raise ValueError(f"SLO ttft_per_token must be seconds >= 0, got "
                             f"{self.ttft_per_token!r}")

    def ttft_for(self, prompt_tokens: float) -> float:
        """The TTFT target of a request with this many prompt tokens (long prompts may be
        allowed more, as long-context serving studies set it)."""
        return self.ttft + self.ttft_per_token * prompt_tokens

    def met(self, ttft: float, tbt: float, prompt_tokens: float = 0) -> bool:
        """Whether a request with this TTFT and mean time between tokens met the SLO."""
        return ttft <= self.ttft_for(prompt_tokens) and tbt <= self.tbt


@dataclass(frozen=True)
class Policy:
    """A way of deploying and scaling a model."""

    name: str
    description: str
    live: bool  # the local server runs it; the others are planned and simulated only


# The one registry of policies (the planner, the simulator, the server and the CLI read it).
POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("static", "model replicas planned once, for the first interval's rate", False),
    Policy("model", "whole-model replicas, autoscaled", True),
    Policy("phase", "prefill and decode replicas apart, each autoscaled", False),
    Policy("operator", "operator groups in pools, each scaled and placed alone", True),
)}
# Served live, the operator policy first (the order the demo and the benchmarks print them).
LIVE_POLICIES = tuple(sorted((name for name, p in POLICIES.items() if p.live),
                             key=lambda name: name != "operator"))


# ---- the Plan: what a deployment looks like (the planner writes it; the simulator replays it
# held fixed; a live server applies it with Server.apply) ---------------------------------------

ROLES = ("model", "prefill", "decode")  # what a lockstep engine runs


@dataclass(frozen=True)
class LockstepShape:
    """A model replica (or a phase replica) tensor-parallel over `shards` devices."""

    role: str     # model (prefill and decode, chunked), prefill or decode
    shards: int   # tensor-parallel degree

    @property
    def devices(self) -> int:
        """Devices one such engine occupies."""
        return self.shards

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with its type."""
        return {"type": "lockstep", **asdict(self)}


@dataclass(frozen=True)
class OperatorShape:
    """Operator groups in pools: `attention` devices hold the KV caches, in sets of
    `attention_shards` that each hold a request's KV split by heads; `dense_replicas`
    replicas of `dense_shards` devices hold the weights (attention 0: co-located). With
    `pooled_prefill`, a disaggregated dense pool spreads one prompt's tokens over its
    replicas each step; without, a prompt advances one chunk per step."""

    attention: int
    dense_shards: int
    dense_replicas: int
    attention_shards: int = 1
    pooled_prefill: bool = True

    def __post_init__(self) -> None:
        if self.attention_shards < 1 or self.attention % self.attention_shards or \
                (not self.attention and self.attention_shards > 1):
            raise ValueError(f"attention devices ({self.attention}) must be a multiple of "
                             f"attention_shards ({self.attention_shards}, at least 1; 1 when "
                             "attention is co-located)")

    @property
    def devices(self) -> int:
        """Devices one such engine occupies."""
        return self.attention + self.dense_shards * self.dense_replicas

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with its type."""
        return {"type": "operator", **asdict(self)}


SHAPES: dict[str, type] = {"lockstep": LockstepShape, "operator": OperatorShape}


@dataclass(frozen=True)
class EngineCount:
    """`count` engines of one shape."""

    engine: LockstepShape | OperatorShape
    count: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"engine": {"type": ..., ...}, "count": n}."""
        return {"engine": self.engine.to_dict(), "count": self.count}


@dataclass(frozen=True)
class GroupPlacement:
    """One operator group's place in a deployment."""

    group: str                    # the group's id in its GroupGraph (g12)
    kind: str                     # its name with the layer index as '*' (what a server scales)
    role: str                     # the engine role it runs in: model, prefill, decode, operator
    replicas: int                 # replicas of the group (attention: devices it spreads over)
    shards: int = 1               # devices each replica is sharded over
    max_batch: int = 1            # requests per step it is sized for
    devices: tuple[int, ...] = ()  # device ids it occupies
    device_fraction: float = 0.0  # its share of those devices' time
    tbt_budget_s: float = 0.0     # its share of the time between tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "devices": list(self.devices)}


@dataclass(frozen=True)
class Plan:
    """A deployment: engines of each shape with counts, per-group placement, predictions."""

    policy: str
    model: str
    device: str
    rate: float                   # requests per second it is sized for
    engines: tuple[EngineCount, ...]
    devices: int
    power_w: float
    ttft_p50: float
    ttft_p99: float
    tbt_p50: float
    tbt_p99: float
    chunk: int                    # prompt tokens per step (chunked prefill)
    groups: tuple[GroupPlacement, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "engines": [e.to_dict() for e in self.engines],
                "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "<plan>") -> Plan:
        """Rebuild from `to_dict` output; a missing, unknown or mistyped field is named."""
        check = Checker(where, "a Plan")
        check.object(data, "")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(n for n in names if n not in data and n != "groups")
        if unknown or missing:
            raise InputError(f"{where}: Plan fields unknown {unknown}, missing {missing}")
        check.string(data["policy"], "policy", tuple(POLICIES))
        for name in ("model", "device"):
            check.string(data[name], name)
        values = {name: check.number(data[name], name, 0, integer=name in ("devices", "chunk"))
                  for name in ("rate", "devices", "power_w", "ttft_p50", "ttft_p99", "tbt_p50",
                               "tbt_p99", "chunk")}
        engines = tuple(_engine_count(check, e, f"engines[{i}]")
                        for i, e in enumerate(check.array(data["engines"], "engines")))
        groups = tuple(_placement(check, row, f"groups[{i}]")
                       for i, row in enumerate(check.array(data.get("groups", []), "groups")))
        return cls(policy=data["policy"], model=data["model"], device=data["device"],
                   engines=engines, groups=groups, **values)


def _engine_count(check: Checker, entry: Any, at: str) -> EngineCount:
    """One {"engine": {...}, "count": n} entry of a Plan, its engine fields checked."""
    check.object(entry, at)
    check.unknown(entry, {"engine", "count"}, f"{at}.")
    engine = check.object(check.get(entry, "engine", f"{at}."), f"{at}.engine")
    count = check.number(check.get(entry, "count", f"{at}."), f"{at}.count", 1, integer=True)
    kind = check.string(check.get(engine, "type", f"{at}.engine."), f"{at}.engine.type",
                        tuple(SHAPES))
    shape = SHAPES[kind]
    known = {f.name for f in fields(shape)}
    check.unknown(engine, known | {"type"}, f"{at}.engine.")
    values: dict[str, Any] = {}
    for f in sorted(fields(shape), key=lambda f: f.name):
        # a field with a default came later: plans written before it keep loading
        value = check.get(engine, f.name, f"{at}.engine.",
                          ... if f.default is MISSING else f.default)
        path = f"{at}.engine.{f.name}"
        if f.name == "role":
            values[f.name] = check.string(value, path, ROLES)
        elif isinstance(f.default, bool):
            values[f.name] = check.boolean(value, path)
        else:
            values[f.name] = check.number(value, path, 1 if f.name.endswith("shards") else 0,
                                          integer=True)
    try:
        return EngineCount(shape(**values), count)
    except ValueError as e:
        raise InputError(f"{check.where}: {at}.engine: {e}") from None


def _placement(check: Checker, row: Any, at: str) -> GroupPlacement:
    """One group's placement in a Plan, each field checked."""
    check.object(row, at)
    known = {f.name: f for f in fields(GroupPlacement)}
    check.unknown(row, set(known), f"{at}.")
    values: dict[str, Any] = {}
    for name in ("group", "kind", "role"):
        values[name] = check.string(check.get(row, name, f"{at}."), f"{at}.{name}")
    values["replicas"] = check.number(check.get(row, "replicas", f"{at}."), f"{at}.replicas",
                                      0, integer=True)
    for name in ("shards", "max_batch"):
        if name in row:
            values[name] = check.number(row[name], f"{at}.{name}", 1, integer=True)
    if "devices" in row:
        values["devices"] = tuple(
            check.number(d, f"{at}.devices[{j}]", 0, integer=True)
            for j, d in enumerate(check.array(row["devices"], f"{at}.devices")))
    for name in ("device_fraction", "tbt_budget_s"):
        if name in row:
            values[name] = check.number(row[name], f"{at}.{name}", 0)
    return GroupPlacement(**values)
