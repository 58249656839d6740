"""How a request's next token is chosen (torch-free): greedy at temperature 0, else sampled
from the temperature-scaled distribution kept to its top_k tokens and top_p mass, after
OpenAI-style presence and frequency penalties; a seed makes it reproducible whatever else the
engine serves beside it."""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling parameters (the OpenAI API's names and defaults)."""

    temperature: float = 0.0       # 0: greedy
    top_p: float = 1.0             # keep the most likely tokens holding this much mass
    top_k: int = 0                 # keep this many most likely tokens (0: all)
    seed: int | None = None        # the same seed gives the same tokens
    presence_penalty: float = 0.0  # subtracted from a token's logit once it was generated
    frequency_penalty: float = 0.0  # subtracted per time it was generated
    logprobs: int | None = None    # also report the chosen token's and the top-n logprobs

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"{field} {why}, got {getattr(self, field)!r}")

        for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                bad(field, "must be a finite number")
        if not 0 <= self.temperature <= 2:
            bad("temperature", "must be between 0 and 2")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        for field in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, field) <= 2:
                bad(field, "must be between -2 and 2")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or
                                      not isinstance(self.seed, int)):
            bad("seed", "must be an integer or None")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or
                                          not isinstance(self.logprobs, int) or
                                          not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer from 0 to {MAX_LOGPROBS} or None")

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always taken."""
        return self.temperature == 0
