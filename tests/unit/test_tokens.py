"""Token counting: tiktoken's exact values, model → encoding, and texts too long for one call."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.adapters import tokenizer as tokens
from shared.adapters.tokenizer import Tokenizer, chunks, encoding_name_for_model, for_model

O200K = Tokenizer("o200k_base")
CL100K = Tokenizer("cl100k_base")


def test_known_token_ids_match_tiktoken():
    assert CL100K.encode("hello world") == [15339, 1917]
    assert O200K.encode("hello world") == [24912, 2375]
    assert CL100K.count("hello world") == 2
    assert O200K.count("hello world") == 2
    assert O200K.count("") == 0


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("GPT-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-4-0125-preview", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-1106", "cl100k_base"),
        ("openai/gpt-4", "cl100k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("llama3", "o200k_base"),
        ("offline", "o200k_base"),
        ("davinci", "o200k_base"),  # a legacy encoding we cannot load falls back too
        ("", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_models_map_to_their_encoding_and_unknown_ones_to_o200k(model, encoding):
    assert encoding_name_for_model(model) == encoding
    assert for_model(model).name == encoding
    assert Tokenizer.for_model(model).name == encoding


def test_encodings_are_loaded_once():
    assert Tokenizer("o200k_base")._enc is Tokenizer.for_model("llama3")._enc is tokens.encoding("o200k_base")


def test_unknown_encoding_is_refused():
    with pytest.raises(KeyError):
        Tokenizer("no_such_base")


def test_special_token_text_is_counted_as_plain_text():
    # Users may write it; refusing it (tiktoken's encode default) would fail their request.
    assert O200K.count("<|endoftext|>") > 1
    assert CL100K.count("a <|endofprompt|> b") > 3


@pytest.mark.parametrize("tok", [O200K, CL100K], ids=lambda t: t.name)
def test_a_text_over_the_encoders_limit_is_counted_exactly_in_chunks(tok):
    n = 100_000
    text = "hello world " * n  # 1.2M characters: one call would be refused
    # "hello", then " world"/" hello" alternating, then the trailing space.
    assert tok.count(text) == 2 * n + 1
    assert len(tok.encode(text)) == 2 * n + 1


@pytest.mark.parametrize("text", ["x" * 1_200_000, "\n" * 1_100_000, "日本語" * 400_000, "🙂" * 300_000])
def test_a_long_text_without_clean_cuts_is_still_counted(text):
    n = O200K.count(text)
    assert n == sum(O200K.count(c) for c in chunks(text, tokens.CHUNK_CHARS)) > 0


def test_chunks_cover_the_text_within_the_size():
    text = ("lorem ipsum, dolor\n\tsit amet. " * 50) + "x" * 300 + "\n" * 40
    parts = chunks(text, 64)
    assert "".join(parts) == text
    assert all(0 < len(p) <= 64 for p in parts)
    assert chunks("short", 64) == ["short"]


word = st.text(st.characters(blacklist_categories=("Z", "Cc", "Cs")), min_size=1, max_size=8)
separator = st.sampled_from([" ", "  ", "   ", "\t", " \t", " \n", " \n\n", "\t\r\n", " \u00a0", "  \n "])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(word, separator), min_size=1, max_size=40), word)
def test_cutting_before_a_space_that_follows_a_word_does_not_change_the_count(pairs, tail):
    # Every 20-character window holds a clean cut (a word ≤ 8 plus a separator ≤ 5), so no cut is a fallback.
    text = "".join(w + s for w, s in pairs) + tail
    for tok in (O200K, CL100K):
        assert sum(tok.count(c) for c in chunks(text, 20)) == tok.count(text)
