"""The OpenAI API's request bodies (the fields fxscale honours) and its error shape.

Parameters fxscale does not know are ignored, as OpenAI-compatible servers do, so clients
that send more still work; a known one with a bad value is a 400 naming it. `top_k` and
`ignore_eos` are the extensions vLLM users send (through the client's `extra_body`).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fxscale.contracts.sampling import MAX_LOGPROBS, Sampling

MAX_STOPS = 16
MAX_CHOICES = 16  # prompts x n in one request


class ApiError(Exception):
    """An error the client gets as the OpenAI API's JSON: status, message, the field."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error",
             404: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable", 500: "internal_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """{"error": {"message", "type", "param", "code"}}"""
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    ignore_eos: bool = False
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        """The stop strings (at most MAX_STOPS, none empty)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", "stop")
        return tuple(stops)

    def sampling(self, logprobs: int | None, choice: int) -> Sampling:
        """The engine's sampling parameters of one choice (a seed gives choice i seed+i, so
        n choices differ and each is reproducible)."""
        try:
            return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                            seed=None if self.seed is None else self.seed + choice,
                            presence_penalty=self.presence_penalty,
                            frequency_penalty=self.frequency_penalty, logprobs=logprobs)
        except ValueError as err:  # Sampling's messages start with the field's name
            raise ApiError(400, str(err), str(err).split()[0]) from None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    """POST /v1/completions"""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Generation):
    """POST /v1/chat/completions"""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
