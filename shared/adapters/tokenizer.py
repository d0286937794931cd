"""Token counting with OpenAI's real encodings, offline.

`bpe_openai` embeds the encodings, so counting needs no network and agrees with
tiktoken. Importing it loads every encoding (about a second), so it is imported on
first use, and each encoding is built once per process.
"""

from __future__ import annotations

import re
import threading
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import bpe_openai

DEFAULT_ENCODING = "o200k_base"
"""The encoding of current OpenAI models, and the guess for every model we do not know."""

CHUNK_CHARS = 50_000
"""Longest text handed to the encoder at once. It refuses 1,000,000 characters or more,
and more than 200,000 tokens per call; a character is at most 4 UTF-8 bytes and a token
at least one byte, so 50,000 characters stay under both."""

_PREFIXES = (
    # Dated, fine-tuned and provider-prefixed variants of the older cl100k models; every
    # other unknown name (gpt-4o-*, gpt-4.1-*, o1, o3, gpt-5, llama3, ...) falls back to o200k.
    ("gpt-4-", "cl100k_base"),
    ("gpt-3.5-turbo-", "cl100k_base"),
    ("gpt-35-turbo-", "cl100k_base"),
    ("text-embedding-", "cl100k_base"),
    ("ft:gpt-4:", "cl100k_base"),
    ("ft:gpt-3.5-turbo", "cl100k_base"),
)

_module: ModuleType | None = None
_encodings: dict[str, bpe_openai.Encoding] = {}
_tokenizers: dict[str, Tokenizer] = {}
_lock = threading.RLock()

_CLEAN_CUT = re.compile(r"(?s).*\S(?=[^\S\r\n])")
"""Finds the last spot before a space or tab that follows a non-space. No pre-token of
either encoding spans such a spot (words take a leading space, never a trailing one),
so counting the two sides apart gives the same total as counting them together."""
_ANY_CUT = re.compile(r"(?s).*(?=\s)")


def _bpe() -> ModuleType:
    global _module
    if _module is None:
        with _lock, warnings.catch_warnings():  # its loader calls a deprecated importlib.resources API
            warnings.simplefilter("ignore", DeprecationWarning)
            import bpe_openai

            _module = bpe_openai
    return _module


def encoding(name: str) -> bpe_openai.Encoding:
    """The named encoding, loaded once. Unknown names raise KeyError."""
    enc = _encodings.get(name)
    if enc is None:
        with _lock:
            enc = _encodings.get(name)
            if enc is None:
                enc = _encodings[name] = _bpe().get_encoding(name)
    return enc


def encoding_name_for_model(model: str | None) -> str:
    """The encoding a model uses; `DEFAULT_ENCODING` for a model we do not know."""
    if not model:
        return DEFAULT_ENCODING
    name = model.strip().lower().removeprefix("openai/")
    try:
        found = _bpe().encoding_name_for_model(name)
    except KeyError:
        found = next((enc for prefix, enc in _PREFIXES if name.startswith(prefix)), DEFAULT_ENCODING)
    # Legacy encodings (gpt2, r50k, p50k) need tiktoken's data files, which we do not ship.
    return found if found in ("cl100k_base", "o200k_base") else DEFAULT_ENCODING


class Tokenizer:
    """Counts tokens of text the way an OpenAI model will see it."""

    CACHED = 100_000
    """Texts whose counts a tokenizer remembers: a chat re-reads the newest messages of its session, and counting
    is the dear part (about a microsecond a character); a hit costs a dictionary lookup."""

    def __init__(self, encoding_name: str) -> None:
        self.name = encoding_name
        self._enc = encoding(encoding_name)
        self._counts: dict[str, int] = {}

    @classmethod
    def for_model(cls, model: str | None) -> Tokenizer:
        """The tokenizer of a model's encoding: one per encoding and process, so its remembered counts are shared."""
        name = encoding_name_for_model(model)
        tokenizer = _tokenizers.get(name)
        if tokenizer is None:
            with _lock:
                tokenizer = _tokenizers.setdefault(name, cls(name))
        return tokenizer

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r})"

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`. Special-token text such as `<|endoftext|>` is plain text here:
        it comes from users, and must be counted, not refused."""
        if len(text) <= CHUNK_CHARS:
            return self._enc.encode_ordinary(text)
        return [t for chunk in chunks(text, CHUNK_CHARS) for t in self._enc.encode_ordinary(chunk)]

    def count(self, text: str) -> int:
        n = self._counts.get(text)
        if n is None:
            if len(text) <= CHUNK_CHARS:
                n = len(self._enc.encode_ordinary(text))
            else:
                n = sum(len(self._enc.encode_ordinary(chunk)) for chunk in chunks(text, CHUNK_CHARS))
            if len(self._counts) >= self.CACHED:
                self._counts.clear()  # simpler than an LRU, and a chat refills what it needs at once
            self._counts[text] = n
        return n


for_model = Tokenizer.for_model


def chunks(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at most `size` characters, at whitespace where possible.

    Cuts go before a space or tab that follows a non-space, where the count is exact; failing
    that before any whitespace, failing that anywhere (both then may be off by a token or so).
    """
    out: list[str] = []
    start, n = 0, len(text)
    while n - start > size:
        end = start + size
        m = _CLEAN_CUT.match(text, start, end) or _ANY_CUT.match(text, start, end)
        cut = m.end() if m is not None and m.end() > start else end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out
