"""Incremental detokenization and stop strings, with real BPE tokenizers trained here on a tiny corpus.

With only ~40 merges over the 256 byte symbols, accented, CJK and emoji characters mostly stay split
over several byte-level tokens, which is the case the detokenizer must get right.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gpu_worker.engine.byte_level import ByteStream, ByteTable
from gpu_worker.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The answer is forty two.",
    "Café crème, naïve façade, déjà vu, Straße, smörgåsbord.",
    "東京は日本の首都です。今日は良い天気ですね。",
    "Emoji time 😀🎉🚀 and more 👍🏽 fun!",
] * 20
EOS = "<eos>"

TEXTS = {
    "ascii": "The quick brown fox said: hello, world! 42 times.",
    "accents": "Café crème, naïve façade — déjà vu in Straße.",
    "cjk": "東京は日本の首都です。天気が良い。",
    "emoji": "Party 😀🎉🚀 with 👍🏽 and 👨‍👩‍👧 family!",
    "mixed": "Résumé: 東京 😀 ok",
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> Tokenizer:
    """SentencePiece-style: the decoder drops the space of a word at the start of the decoded text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def stream(tokenizer: Tokenizer, ids: list[int], prompt=(), skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, list(prompt), skip_special_tokens)
    deltas = [detok.append(t) for t in ids]
    assert detok.text == "".join(deltas)
    return deltas


def run_stops(tokenizer: Tokenizer, text: str, stop: list[str], include=False):
    """Stream `text` token by token through a matcher; return (emitted pieces, matched, flushed)."""
    detok = IncrementalDetokenizer(tokenizer, [], True)
    matcher = StopStringMatcher(stop, include)
    pieces = []
    for t in tokenizer.encode(text).ids:
        emit, matched = matcher.feed(detok.append(t))
        pieces.append(emit)
        if matched is not None:
            return pieces, matched, None
    return pieces, None, matcher.flush()


# --- IncrementalDetokenizer -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_concatenate_to_the_full_decode(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name]).ids
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXTS[name]
    assert all("\ufffd" not in d for d in deltas), "a split character must come out whole"


@pytest.mark.parametrize("name", ["accents", "cjk", "emoji"])
def test_multibyte_characters_are_split_across_tokens(tokenizer, name):
    # Guards the test above: it only means something if some character spans several tokens.
    ids = tokenizer.encode(TEXTS[name]).ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    deltas = stream(tokenizer, ids)
    assert "" in deltas, "some token should complete no character"


def test_prompt_does_not_leak_into_the_output(tokenizer):
    prompt = tokenizer.encode("東京は").ids
    ids = tokenizer.encode("日本 😀!").ids
    assert "".join(stream(tokenizer, ids, prompt)) == "日本 😀!"


def test_prompt_context_keeps_the_leading_space(metaspace_tokenizer):
    tok = metaspace_tokenizer
    prompt = tok.encode("The quick").ids
    full = tok.encode("The quick brown fox jumps").ids
    assert full[: len(prompt)] == prompt
    output = full[len(prompt) :]
    assert tok.decode(output) == "brown fox jumps", "decoding alone drops the space; the test needs that"
    assert "".join(stream(tok, output, prompt)) == " brown fox jumps"


def test_special_tokens_are_skipped_or_kept(tokenizer):
    eos = tokenizer.token_to_id(EOS)
    ids = tokenizer.encode("Café").ids + [eos] + tokenizer.encode(" 😀").ids
    assert "".join(stream(tokenizer, ids, skip_special_tokens=True)) == "Café 😀"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)) == "Café<eos> 😀"


def test_window_stays_small_and_one_decode_a_token(tokenizer):
    """Each step decodes a bounded window, not the whole text (at most the slide length plus a character's held
    bytes), and about once: the emitted part's text is the last decode's, kept until the window slides."""
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Counting(), tokenizer.encode(TEXTS["ascii"] * 5).ids, True)
    ids = tokenizer.encode(TEXTS["mixed"] * 20).ids
    for t in ids:
        detok.append(t)
        assert len(detok._window) <= 12 + 3, "each step must decode a bounded window, not the whole text"
    assert detok.text == TEXTS["mixed"] * 20
    assert len(calls) <= 1.25 * len(ids), (len(calls), len(ids))


def test_flush_returns_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 😀").ids[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tokenizer, [], True)
    for t in ids:
        detok.append(t)
    held = detok.flush()
    assert held.endswith("\ufffd")
    assert detok.text == tokenizer.decode(ids) and detok.text.endswith(held)
    assert detok.flush() == ""


# --- StopStringMatcher ----------------------------------------------------------------------------


def test_stop_string_over_three_tokens_is_never_streamed(tokenizer):
    text = "The answer is STOP HERE and more"
    stop = "STOP HERE"
    ids = tokenizer.encode(text).ids
    # The stop string must really span several tokens for this test to mean anything.
    starts = [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]
    begin = text.index(stop)
    spanned = [i for i in range(len(ids)) if starts[i] < begin + len(stop) and starts[i + 1] > begin]
    assert len(spanned) >= 3

    pieces, matched, _ = run_stops(tokenizer, text, [stop])
    assert matched == stop
    expected = text[:begin]
    streamed = ""
    for p in pieces:
        streamed += p
        assert expected.startswith(streamed), f"streamed {streamed!r}, part of the stop string"
    assert streamed == expected == "The answer is "


def test_include_stop_str_in_output_keeps_it(tokenizer):
    pieces, matched, _ = run_stops(tokenizer, "The answer is STOP HERE and more", ["STOP HERE"], include=True)
    assert matched == "STOP HERE"
    assert "".join(pieces) == "The answer is STOP HERE"


def test_flush_returns_held_back_text_when_nothing_matches(tokenizer):
    # The text ends in "STO", a possible start of "STOP": held back until flush.
    pieces, matched, flushed = run_stops(tokenizer, "The answer is STO", ["STOP"])
    assert matched is None
    assert "".join(pieces) == "The answer is "
    assert flushed == "STO"


def test_earliest_stop_string_wins(tokenizer):
    text = "The quick brown fox jumps over the lazy dog"
    pieces, matched, _ = run_stops(tokenizer, text, ["lazy", "fox", "quick brown"])
    assert (matched, "".join(pieces)) == ("quick brown", "The ")


def test_multibyte_stop_string(tokenizer):
    pieces, matched, _ = run_stops(tokenizer, TEXTS["emoji"], ["🎉🚀"])
    assert (matched, "".join(pieces)) == ("🎉🚀", "Party 😀")


def test_match_is_independent_of_chunking():
    # "y" is complete after "xy", before "xyz" is: it wins however the text is split.
    for chunks in (["xyz"], ["x", "y", "z"], ["xy", "z"]):
        matcher = StopStringMatcher(["xyz", "y"], include_stop_str_in_output=False)
        out = [matcher.feed(c) for c in chunks]
        emitted = "".join(e for e, _ in out)
        assert (emitted, [m for _, m in out if m]) == ("x", ["y"]), chunks


def test_partial_match_that_fails_is_released():
    matcher = StopStringMatcher(["</answer>"], include_stop_str_in_output=False)
    assert matcher.feed("a </ans") == ("a ", None)
    assert matcher.feed("wer") == ("", None)
    assert matcher.feed("! and") == ("</answer! and", None)
    assert matcher.flush() == ""


def test_no_match_before_stopping_is_allowed():
    # Below min_tokens a stop string is ordinary text; one that completes afterwards still stops.
    matcher = StopStringMatcher(["END"], include_stop_str_in_output=False)
    assert matcher.feed("x END y E", can_stop=False) == ("x END y ", None)
    assert matcher.feed("N", can_stop=False) == ("", None)
    assert matcher.feed("D z") == ("", "END")


def test_feed_after_a_match_emits_nothing():
    matcher = StopStringMatcher(["END"], include_stop_str_in_output=False)
    assert matcher.feed("done END tail") == ("done ", "END")
    assert matcher.matched == "END"
    assert matcher.feed("more") == ("", None)
    assert matcher.flush() == ""


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([], include_stop_str_in_output=False)
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""


def _reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Non-streaming answer: the stop string complete earliest (then the longest) cuts the text."""
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not found:
        return text, None
    end, neg_len, s = min(found)
    return text[: end if include else end + neg_len], s


@pytest.mark.parametrize("include", [False, True])
def test_random_chunkings_agree_with_the_whole_text_answer(include):
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("aab c") for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        cuts = (
            sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8)))) if text else []
        )
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        expected, expected_stop = _reference(text, stops, include)

        matcher = StopStringMatcher(stops, include)
        streamed, matched = "", None
        for chunk in chunks:
            emit, matched = matcher.feed(chunk)
            streamed += emit
            assert expected.startswith(streamed), (text, stops, chunks)
            if matched is not None:
                break
        if matched is None:
            streamed += matcher.flush()
        assert (streamed, matched) == (expected, expected_stop), (text, stops, chunks)


# --- ByteStream (byte-level tokenizers, no tokenizer call per token) -------------------------------------------


def byte_stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens=True) -> tuple[list[str], ByteStream]:
    table = ByteTable.build(tokenizer)
    assert table is not None
    s = ByteStream(table, skip_special_tokens)
    deltas = [s.append(t) for t in ids]
    assert s.text == "".join(deltas)
    return deltas, s


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_byte_stream_deltas_are_the_decode_and_characters_come_out_whole(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name]).ids
    deltas, _ = byte_stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXTS[name]
    assert all("\ufffd" not in d for d in deltas)
    if name != "ascii":
        assert "" in deltas  # a token inside a character completes none


def test_byte_stream_matches_the_tokenizer_on_random_ids(tokenizer):
    """Any ids (invalid UTF-8 included): the streamed text plus the flush is the tokenizer's decode of them."""
    rng = random.Random(3)
    size = tokenizer.get_vocab_size()
    for _ in range(200):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            deltas, s = byte_stream(tokenizer, ids, skip)
            assert "".join(deltas) + s.flush() == tokenizer.decode(ids, skip_special_tokens=skip)


def test_byte_stream_specials_and_flush(tokenizer):
    eos = tokenizer.token_to_id(EOS)
    ids = tokenizer.encode("Café").ids + [eos] + tokenizer.encode(" 😀").ids
    assert "".join(byte_stream(tokenizer, ids, True)[0]) == "Café 😀"
    assert "".join(byte_stream(tokenizer, ids, False)[0]) == "Café<eos> 😀"
    cut = tokenizer.encode("ok 😀").ids[:-1]  # the emoji's last byte never arrives
    deltas, s = byte_stream(tokenizer, cut)
    held = s.flush()
    assert held == "\ufffd" and "".join(deltas) + held == tokenizer.decode(cut) and s.flush() == ""


def test_only_byte_level_tokenizers_that_it_reproduces_get_a_table(tokenizer, metaspace_tokenizer):
    assert ByteTable.build(metaspace_tokenizer) is None  # SentencePiece-style: the windowed path
    odd = Tokenizer.from_str(tokenizer.to_str())
    odd.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])  # not plain ByteLevel
    assert ByteTable.build(odd) is None
    # A table that does not reproduce the decode is refused: here a symbol's byte is wrong.
    table = ByteTable.build(tokenizer)
    a = tokenizer.token_to_id("a")
    broken = ByteTable(table.pieces[:a] + (b"b",) + table.pieces[a + 1:], table.special)
    assert not broken._matches(tokenizer, samples=4, seed=0)


def test_the_engine_streams_byte_level_text_from_the_table(tiny_model_dir):
    from gpu_worker.engine.tokenizer import Tokenizer as EngineTokenizer

    tok = EngineTokenizer(tiny_model_dir)
    assert "byte_table" not in vars(tok)  # a tokenizer that only encodes (the server's) never builds it
    assert isinstance(tok.detokenizer([1, 2], True), ByteStream)
    tok.byte_table = None
    assert isinstance(tok.detokenizer([1, 2], True), IncrementalDetokenizer)
