"""Incremental detokenization and stop-string matching for one generated sequence.

IncrementalDetokenizer turns each new token into the text it completes, decoding only a small window
of recent tokens (vLLM's prefix_offset/read_offset method), so streaming costs O(1) per token and a
multi-byte character split over byte-level tokens comes out whole. The window slides only every few
tokens, so the text of its emitted part is the last decode's, kept: one decode per token, not two.
StopStringMatcher sits after it and decides what is safe to stream: text that could still turn into a
stop string is held back. (Byte-level tokenizers stream from a table instead: byte_level.ByteStream, picked by
Tokenizer.detokenizer.)
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

# Prompt tokens kept as left context for the first output token: tokenizers such as SentencePiece
# decode a leading space differently at the start of a string than after other text.
_PROMPT_CONTEXT_TOKENS = 5
# The window slides once it holds this many emitted tokens, down to the last _SLIDE_KEEP of them (their decode,
# the new prefix text, is the one extra decode a slide costs).
_WINDOW_MAX = 12
_SLIDE_KEEP = 4
# What a decoder emits for an incomplete UTF-8 sequence.
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens.

    The window holds a few emitted tokens (context) and the tokens after them. `_read` splits it:
    tokens before it have been emitted, tokens from it on have not. A new token's text is
    decode(window) minus decode(window[:_read]) (kept as `_prefix_text`), emitted only once it no
    longer ends in U+FFFD (the decoder's mark for an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._texts: list[str] = []  # the deltas emitted (joined only when asked: `text`)

    @property
    def text(self) -> str:
        """The output text emitted so far (prompt excluded)."""
        return "".join(self._texts)

    def append(self, token_id: int) -> str:
        """Add the next output token; return the text it completes ("" while a character is incomplete)."""
        self._window.append(token_id)
        full_text = self._decode(self._window)
        # Hold back while the new tokens end inside a character, or add no text yet (skipped special
        # tokens; decoders that only settle a token's text once the next one arrives).
        if len(full_text) <= len(self._prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(full_text)

    def flush(self) -> str:
        """Text of tokens still held back when the sequence ends (may contain U+FFFD); "" if none."""
        if self._read == len(self._window):
            return ""
        return self._emit(self._decode(self._window))

    def _emit(self, full_text: str) -> str:
        """Everything in the window is emitted: its text past the prefix is the delta, and its text the next
        prefix; once it is long, the window slides to its last few tokens (whose decode is then the prefix)."""
        delta = full_text[len(self._prefix_text) :]
        self._texts.append(delta)
        if len(self._window) >= _WINDOW_MAX:
            self._window = self._window[-_SLIDE_KEEP:]
            full_text = self._decode(self._window)
        self._read = len(self._window)
        self._prefix_text = full_text
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""


class StopStringMatcher:
    """Finds stop strings in streamed text and withholds text that could still become one.

    When several stop strings occur, the one that is complete first in the text wins (the earliest
    end; at equal ends, the earliest start), so the result does not depend on how the text was split
    into tokens. After a match the matcher is finished and ignores further text.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = list(stop)
        self._include = include_stop_str_in_output
        self._pending = ""  # text received but not yet emitted
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the sequence, or None."""
        return self._matched

    def feed(self, new_text: str, can_stop: bool = True) -> tuple[str, str | None]:
        """Take newly decoded text; return (text safe to stream now, stop string matched or None).

        On a match, the returned text runs up to the stop string (through it with
        include_stop_str_in_output) and the sequence should finish. With can_stop=False (the sequence
        is still below min_tokens) nothing matches, as in vLLM: a complete stop string streams as
        text, and only a possible start of one at the end is held back, so a stop string that ends
        once stopping is allowed still matches.
        """
        if self._matched is not None:
            return "", None
        if not self._stop:
            return new_text, None
        # Text emitted earlier never ended in a possible stop-string start (that part was held back),
        # so a match must start inside pending + new text.
        text = self._pending + new_text
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self._stop if can_stop else ():
            start = text.find(s)
            if start != -1 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is not None:
            end, start, s = best
            self._matched = s
            self._pending = ""
            return text[: end if self._include else start], s

        hold = max(_partial_match_len(text, s) for s in self._stop)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], None

    def flush(self) -> str:
        """Return the held-back text when the sequence ends for another reason (length, EOS)."""
        text, self._pending = self._pending, ""
        return text


def _partial_match_len(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop` (0 if none)."""
    first = stop[0]
    # Only positions holding stop's first character can begin a partial match; the earliest one that
    # does gives the longest suffix.
    i = text.find(first, max(0, len(text) - len(stop) + 1))
    while i != -1:
        if stop.startswith(text[i:]):
            return len(text) - i
        i = text.find(first, i + 1)
    return 0
