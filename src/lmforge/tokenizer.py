"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): train, save, load.

Byte-level BPE round-trips any Unicode text exactly: every string is first mapped to its UTF-8 bytes,
so there is no unknown token and no normalisation that could change the text.

Text is encoded as text: a "<|endoftext|>" or "<|question|>" written in a document, a question or a prompt
is those characters, never the control id (as tiktoken's `allowed_special=()`), so data cannot inject a
document boundary or a QA marker. Control ids are only ever added by id (shards, QA prompts).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Encoding, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write

EOT = "<|endoftext|>"
PAD = "<|pad|>"
CONTEXT = "<|context|>"
QUESTION = "<|question|>"
ANSWER = "<|answer|>"
SPECIAL_TOKENS = [EOT, PAD, CONTEXT, QUESTION, ANSWER]

log = logging.getLogger("lmforge")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids lmforge needs by name."""

    def __init__(self, hf: HFTokenizer):
        # special-token strings in text are plain text (see the module docstring). The setting is not saved in
        # tokenizer.json, so the file, its hash and the Hugging Face export keep the library's default
        hf.encode_special_tokens = True
        self.hf = hf
        ids = {tok: hf.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise LmforgeError(f"tokenizer lacks special tokens {missing}; was it trained by lmforge?")
        self.eot_id: int = ids[EOT]
        self.pad_id: int = ids[PAD]
        self.context_id: int = ids[CONTEXT]
        self.question_id: int = ids[QUESTION]
        self.answer_id: int = ids[ANSWER]
        self.special_ids = frozenset(ids.values())

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_markup(self, text: str) -> Encoding:
        """`text` written in the prompt format, its special-token strings ("<|question|>") read as their ids;
        with offsets. Only for text that is markup by contract (the attention explorer's input)."""
        return self._markup.encode(text, add_special_tokens=False)

    @functools.cached_property
    def _markup(self) -> HFTokenizer:
        markup = HFTokenizer.from_str(self.hf.to_str())
        markup.encode_special_tokens = False
        return markup

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        return self.hf.id_to_token(i)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for specials): the denominator of bits-per-byte.

        In byte-level BPE every character of a token's string is one byte, so the length of the
        token string is its byte count, exact even for tokens holding part of a multi-byte character.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.hf.get_vocab().items():
            lengths[i] = 0 if i in self.special_ids else len(token)
        return lengths

    def save(self, path: str | Path) -> None:
        atomic_write(path, lambda p: self.hf.save(str(p)))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"tokenizer not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises bare Exceptions on malformed files
            raise LmforgeError(f"{path}: not a valid tokenizer.json ({exc})") from None


def _take_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        if seen >= max_chars:
            return
        text = text[: max_chars - seen]
        seen += len(text)
        yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int, sample_chars: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on up to `sample_chars` characters of `texts`."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    hf.train_from_iterator(_take_chars(texts, sample_chars), trainer=trainer)
    if hf.get_vocab_size() < 256 + len(SPECIAL_TOKENS):
        raise LmforgeError("tokenizer training saw no text")
    if hf.get_vocab_size() < vocab_size:  # BPE ran out of pairs seen min_frequency times
        log.warning(
            "tokenizer: the training text supports only %d tokens (asked %d): add text (more sources or "
            "tokenizer.sample_chars), or lower tokenizer.min_frequency (%d) or tokenizer.vocab_size",
            hf.get_vocab_size(),
            vocab_size,
            min_frequency,
        )
    return Tokenizer(hf)
