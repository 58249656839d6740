"""Tokens to text as they come, with stop strings.

Decoding token by token would split characters (byte-level tokens carry parts of one UTF-8
character) and cost O(n^2) over a long answer, so the text is decoded from a short window:
the tokens since the last emitted text, with a few before it for context; a delta ending in
an incomplete character waits for the next token. Text that could be the start of a stop
string is held back until it cannot; when a stop string appears, the text before it is the
last delta and the request is done (the stop text itself is never returned).
"""
from __future__ import annotations

from typing import Any

CONTEXT_TOKENS = 5   # tokens before the window decoded with it (spacing, merges)


class TextStream:
    """A request's text so far: push tokens, get the text that is safe to send."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = 0     # window start: CONTEXT_TOKENS before `read`
        self.read = 0       # tokens whose text is in `text`
        self.text = ""      # decoded and not sent (a stop string's beginning waits here)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Take a token; the text it makes safe to send (may be empty). Sets `stopped`
        when a stop string appeared."""
        if self.stopped:
            return ""
        self.ids.append(token)
        return self._release(final=False) if self._advance(final=False) else ""

    def finish(self) -> str:
        """The text still held back (and a last incomplete character, as U+FFFD), once no
        token will come."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._release(final=True)

    def _advance(self, final: bool) -> bool:
        """Decode the window; whether it made new characters (a special token makes none,
        half a character waits unless `final`)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return False
        self.text += after[len(before):]
        self.prefix, self.read = max(0, len(self.ids) - CONTEXT_TOKENS), len(self.ids)
        return True

    def _release(self, final: bool) -> str:
        """Send what cannot be part of a stop string; cut at a stop string."""
        # sent text could not begin a stop string, so one can only start in `text`
        hits = [i for i in (self.text.find(stop) for stop in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif final or not self.stop:
            end = len(self.text)
        else:
            end = len(self.text) - max(_tail_starting(self.text, stop) for stop in self.stop)
        delta, self.text = self.text[:end], self.text[end:]
        return delta


def _tail_starting(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is a beginning of `stop` (shorter than
    it)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
