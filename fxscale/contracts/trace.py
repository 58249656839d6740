"""The Trace contract: requests with arrival time, prompt tokens and tokens to generate, in
arrival order; what every trace reader returns and what the simulator, the runtime model and
the live replay consume. No torch."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from .errors import InputError


class TraceError(InputError):
    """A trace file that cannot be read: says which file, line and field."""


@dataclass(frozen=True)
class Request:
    """One request of a trace."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class Trace:
    """Requests in arrival order, with where they came from."""

    name: str
    source: str
    requests: list[Request]

    def duration_s(self) -> float:
        """Time from the first to the last arrival."""
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    def rate(self) -> float:
        """Mean arrival rate (requests per second)."""
        duration = self.duration_s()
        return (len(self.requests) - 1) / duration if duration > 0 else 0.0

    def window(self, start_s: float = 0.0, duration_s: float | None = None) -> Trace:
        """The requests arriving in [start, start + duration), arrivals re-based to 0."""
        if start_s < 0 or (duration_s is not None and duration_s <= 0):
            raise ValueError(f"window start must be >= 0 and duration > 0, got start={start_s}, "
                             f"duration={duration_s}")
        end = float("inf") if duration_s is None else start_s + duration_s
        kept = [r for r in self.requests if start_s <= r.arrival_s < end]
        return Trace(f"{self.name}[{start_s:g}s+{duration_s if duration_s else 'end'}]",
                     self.source, [Request(r.arrival_s - start_s, r.prompt_tokens,
                                           r.output_tokens) for r in kept])

    def scaled(self, rate_factor: float) -> Trace:
        """The same requests arriving `rate_factor` times as fast (arrival times divided)."""
        if not rate_factor > 0:
            raise ValueError(f"rate factor must be positive, got {rate_factor}")
        return Trace(f"{self.name}x{rate_factor:g}", self.source,
                     [Request(r.arrival_s / rate_factor, r.prompt_tokens, r.output_tokens)
                      for r in self.requests])

    def summary(self) -> dict[str, float]:
        """Count, duration, rate and token statistics."""
        prompts = [r.prompt_tokens for r in self.requests]
        outputs = [r.output_tokens for r in self.requests]
        return {"requests": len(self.requests), "duration_s": self.duration_s(),
                "rate_rps": self.rate(),
                "prompt_mean": statistics.fmean(prompts) if prompts else 0.0,
                "prompt_p50": statistics.median(prompts) if prompts else 0.0,
                "output_mean": statistics.fmean(outputs) if outputs else 0.0,
                "output_p50": statistics.median(outputs) if outputs else 0.0}


