"""Detokenization without the tokenizer, for byte-level BPE (GPT-2 style: Llama 3, Qwen2, the demo tokenizer).

A byte-level decoder maps each token's symbols back to bytes, joins them and decodes UTF-8, replacing what is not
valid; nothing depends on the tokens around one (no leading-space rule, as SentencePiece has). So each token's
bytes (and their text, where they are whole characters) can be looked up once, at start (`ByteTable.build`), and a
sequence's text streamed from them (`ByteStream`): one lookup for most tokens, a UTF-8 decode of the held bytes for
a token inside a character, where `IncrementalDetokenizer` decodes a window of tokens through the tokenizer (2-12
us a token on the GPU machine's host, 64 a step at batch 64; the engine's host time a decode step at batch 64, dev
CPU, `benchmarks.engine_host`: 0.77 -> 0.47 ms). The table is checked against the tokenizer's own decode over every
token and over random sequences, with and without special tokens (~1 s at start for a 128K vocabulary); a
tokenizer that fails the check, or whose decoder is not plain ByteLevel, keeps the windowed path.

    table = ByteTable.build(hf_tokenizer)      # None: use IncrementalDetokenizer
    stream = ByteStream(table, skip_special_tokens=True)
    delta = stream.append(token_id)            # the text the token completes ("" inside a character)
    rest = stream.flush()                      # held bytes at the end, U+FFFD for an incomplete character
"""

from __future__ import annotations

import codecs
import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders


def _symbol_bytes() -> dict[str, int]:
    """GPT-2's byte <-> symbol map, inverted: printable bytes stand for themselves, the others for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = dict(zip(map(chr, printable), printable)), 0
    for b in range(256):
        if b not in printable:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


@dataclass(frozen=True)
class ByteTable:
    pieces: tuple[bytes, ...]  # each id's bytes
    special: frozenset[int]  # ids skip_special_tokens drops

    def __post_init__(self):
        # Per skip_special_tokens: each id's bytes, and its text where those bytes are whole UTF-8 characters by
        # themselves (None where not): the common case streams with one lookup.
        texts = tuple(map(_whole, self.pieces))
        skipped = (tuple(b"" if i in self.special else p for i, p in enumerate(self.pieces)),
                   tuple("" if i in self.special else t for i, t in enumerate(texts)))
        object.__setattr__(self, "_lookups", {False: (self.pieces, texts), True: skipped})

    def lookups(self, skip_special_tokens: bool) -> tuple[tuple[bytes, ...], tuple[str | None, ...]]:
        """(each id's bytes, each id's text or None) as ByteStream reads them."""
        return self._lookups[skip_special_tokens]

    @classmethod
    def build(cls, tokenizer: Tokenizer, samples: int = 64, seed: int = 0) -> ByteTable | None:
        """The table of a tokenizer whose decoder is plain ByteLevel and whose decode it reproduces; else None."""
        if not isinstance(tokenizer, Tokenizer) or not isinstance(tokenizer.decoder, decoders.ByteLevel):
            return None
        symbols = _symbol_bytes()
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        pieces = []
        for i in range(size):
            token = tokenizer.id_to_token(i) or ""
            # As the ByteLevel decoder does: a token with a symbol outside the map (an added token's plain text)
            # stands for its own UTF-8.
            try:
                pieces.append(bytes(symbols[c] for c in token))
            except KeyError:
                pieces.append(token.encode())
        special = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        table = cls(tuple(pieces), special)
        return table if table._matches(tokenizer, samples, seed) else None

    def _matches(self, tokenizer: Tokenizer, samples: int, seed: int) -> bool:
        size = len(self.pieces)
        rng = random.Random(seed)
        seqs = [[i] for i in range(size)]
        seqs += [[rng.randrange(size) for _ in range(rng.randrange(1, 48))] for _ in range(samples)]
        seqs.append(sorted(self.special) + [size + 7])  # specials, and an id past the vocabulary (decodes to "")
        for skip in (False, True):
            want = tokenizer.decode_batch(seqs, skip_special_tokens=skip)
            if any(w != self.text(ids, skip) for w, ids in zip(want, seqs)):
                return False
        return True

    def text(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The ids' text as ByteStream streams it (the check compares it with the tokenizer's decode)."""
        stream = ByteStream(self, skip_special_tokens)
        return "".join(map(stream.append, ids)) + stream.flush()


def _whole(piece: bytes) -> str | None:
    """The text of bytes that are whole UTF-8 characters (none cut off at either end), else None."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return None


class ByteStream:
    """IncrementalDetokenizer's interface over a ByteTable: the text of the output tokens alone is exactly the
    tokenizer's decode of them (no prompt context: byte-level text does not depend on what precedes it)."""

    def __init__(self, table: ByteTable, skip_special_tokens: bool):
        self._pieces, self._token_texts = table.lookups(skip_special_tokens)
        self._held = b""  # the start of a character whose last bytes have not come yet
        # The deltas emitted, joined only when asked (`text`): a string grown a token at a time is copied whole
        # each time (19 us a token at 32,000 tokens on the dev CPU).
        self._texts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._texts)

    def append(self, token_id: int) -> str:
        if not self._held and 0 <= token_id < len(self._token_texts):
            delta = self._token_texts[token_id]
            if delta is not None:
                self._texts.append(delta)
                return delta
        piece = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""
        # Decodes all but an incomplete character at the end (held for the next token); invalid bytes become
        # U+FFFD, as the tokenizer's decoder makes them.
        delta, used = codecs.utf_8_decode(self._held + piece, "replace", False)
        self._held = (self._held + piece)[used:]
        self._texts.append(delta)
        return delta

    def flush(self) -> str:
        delta, self._held = codecs.utf_8_decode(self._held, "replace", True)[0], b""
        self._texts.append(delta)
        return delta
