"""Options of the fxscale backend: one validated dataclass threaded through every pass."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

GRANULARITIES = ("operator", "layer", "model", "node")
LOWERINGS = ("inductor", "eager")


@dataclass(frozen=True)
class Options:
    """What `torch.compile(model, backend="fxscale", options={...})` accepts.

    granularity: "operator" (default) groups operators whose resource class and
        sensitivity to batch/length agree; "layer" makes one group per repeated block
        (transformer layer); "model" one group for the whole graph (the model-level
        baseline); "node" one operator per group.
    lowering: "inductor" (default) compiles each group with Inductor; "eager" runs each
        group's FX graph as is.
    dedupe: compile structurally identical groups (e.g. the same sub-block of every layer)
        once and reuse the compiled code.
    warn_on_fallback: warn when a group (or the whole graph) falls back to eager.
    """

    granularity: str = "operator"
    lowering: str = "inductor"
    dedupe: bool = True
    warn_on_fallback: bool = True

    def __post_init__(self) -> None:
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("lowering", self.lowering, LOWERINGS)
        for name in ("dedupe", "warn_on_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"fxscale option {name!r} must be True or False, got {getattr(self, name)!r}"
                )

    @classmethod
    def from_user(cls, options: Options | Mapping[str, Any] | None) -> Options:
        """Build Options from the dict given to torch.compile(options=...), rejecting unknown keys."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(
                f"fxscale options must be a dict or fxscale.Options, got {type(options).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown fxscale option(s) {unknown}; valid options are {sorted(known)} "
                "(see help(fxscale.Options))"
            )
        return cls(**dict(options))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option, the bad value and the valid choices."""
    if value not in choices:
        raise ValueError(
            f"fxscale option {name!r} must be one of {list(choices)}, got {value!r}"
        )
