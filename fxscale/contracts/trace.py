"""The Trace contract: requests with arrival time, prompt tokens and tokens to generate, in
arrival order (and, where the trace has them, the hashes of their prompt's prefix blocks);
what every trace reader returns and what the simulator, the runtime model and the live replay
consume. No torch."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from .errors import InputError

CONTEXT_MODES = ("reject", "truncate")  # what to do with a prompt longer than the context


class TraceError(InputError):
    """A trace file that cannot be read: says which file, line and field."""


@dataclass(frozen=True)
class Request:
    """One request of a trace."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    # hash of each prefix block of the prompt (the trace's `prefix_block_tokens` each): equal
    # hashes at the same position mean the same prefix, so its KV cache may be reused
    prefix: tuple[int, ...] = ()


@dataclass
class Trace:
    """Requests in arrival order, with where they came from."""

    name: str
    source: str
    requests: list[Request]
    prefix_block_tokens: int = 0  # tokens per prefix-hash block; 0: no prefix hashes

    def without_prefixes(self) -> Trace:
        """The same requests without prefix hashes (no prefix-cache reuse)."""
        return replace(self, requests=[replace(r, prefix=()) for r in self.requests],
                       prefix_block_tokens=0)

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
        return replace(self, name=f"{self.name}[{start_s:g}s+{duration_s or 'end'}]",
                       requests=[replace(r, arrival_s=r.arrival_s - start_s) for r in kept])

    def within_context(self, limit: int | None, mode: str = "reject"
                       ) -> tuple[Trace, dict[str, Any]]:
        """The requests a model with a `limit`-token context can serve, and what was done to
        the others: a prompt that leaves no room for one output token is dropped ("reject",
        as a server answers 400) or cut, keeping its end, to leave room for its output (or
        for half the context, if the output is longer: "truncate"); an output that would run
        past the context stops there (finish reason "length")."""
        if mode not in CONTEXT_MODES:
            raise ValueError(f"over-context mode must be one of {CONTEXT_MODES}, got {mode!r}")
        counts: dict[str, Any] = {"limit": limit, "mode": mode, "rejected": 0,
                                  "truncated_prompts": 0, "shortened_outputs": 0}
        if limit is None:
            return self, counts
        kept = []
        for r in self.requests:
            prompt, output = r.prompt_tokens, r.output_tokens
            if prompt >= limit:
                if mode == "reject":
                    counts["rejected"] += 1
                    continue
                counts["truncated_prompts"] += 1
                prompt = max(limit // 2, limit - output)
            elif prompt + output > limit:
                counts["shortened_outputs"] += 1
            output = min(output, limit - prompt)
            # a cut prompt keeps its end: its prefix blocks are no longer the trace's
            kept.append(Request(r.arrival_s, prompt, output,
                                r.prefix if prompt == r.prompt_tokens else ()))
        if not kept:
            raise TraceError(f"{self.name}: every prompt is longer than the model's {limit}-token "
                             "context; use a model with a longer context or mode 'truncate'")
        return replace(self, requests=kept), counts

    def scaled(self, rate_factor: float) -> Trace:
        """The same requests arriving `rate_factor` times as fast (arrival times divided)."""
        if not rate_factor > 0:
            raise ValueError(f"rate factor must be positive, got {rate_factor}")
        return replace(self, name=f"{self.name}x{rate_factor:g}",
                       requests=[replace(r, arrival_s=r.arrival_s / rate_factor)
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


