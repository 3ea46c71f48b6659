import logging

import pytest
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Sarah said she would come. " * 20,
    "Numbers 12345 and symbols #@! appear too. " * 10,
]

TRICKY = [
    "plain ascii",
    "emoji 😀👩‍👩‍👧 and flags 🇫🇷",
    "CJK 漢字かなカナ 한국어",
    "combining e\u0301 vs \u00e9, a\u0308",
    "control \x00\x01\t\r\n\x1b[0m chars",
    "  leading and trailing spaces  ",
    "mixed <|endoftext|> looking text",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TRAIN_TEXT, vocab_size=400, sample_chars=10_000, min_frequency=1)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special=False) == text


def test_special_tokens_are_single_ids(tok):
    for special in SPECIAL_TOKENS:
        assert tok.encode_markup(special).ids == [tok.hf.token_to_id(special)]
    assert len({tok.eot_id, tok.pad_id, tok.context_id, tok.question_id, tok.answer_id}) == 5


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_token_strings_in_text_are_plain_text(tok, special, tmp_path):
    """Data or a question holding "<|endoftext|>" must not inject a control id: it is encoded as its characters,
    and decodes back exactly (also when special tokens are skipped)."""
    text = f"A {special} B{special}{special}\n{special[:-1]}"
    for ids in (tok.encode(text), tok.encode_batch([text, "x"])[0], list(tok.hf.encode(text).ids)):
        assert not set(ids) & tok.special_ids
        assert tok.decode(ids) == tok.decode(ids, skip_special=False) == text
        assert sum(int(n) for n in tok.token_byte_lengths()[ids]) == len(text.encode())
    # markup (the attention explorer's input) still reads the strings as ids
    assert tok.hf.token_to_id(special) in tok.encode_markup(text).ids
    # tokenizer.json is unchanged (same hash, and the library's default for whoever loads the file)
    tok.save(tmp_path / "tokenizer.json")
    raw = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.to_str() == tok.hf.to_str()
    assert raw.encode(special, add_special_tokens=False).ids == [tok.hf.token_to_id(special)]


def test_learned_merges_compress(tok):
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_byte_lengths_sum_to_utf8_length(tok):
    lengths = tok.token_byte_lengths()
    for text in TRICKY:
        assert sum(int(lengths[i]) for i in tok.encode(text)) == len(text.encode("utf-8"))
    assert lengths[tok.eot_id] == 0


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.encode("hello world") == tok.encode("hello world")
    assert again.eot_id == tok.eot_id


def test_load_errors(tmp_path):
    with pytest.raises(LmforgeError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LmforgeError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)


def test_a_vocabulary_smaller_than_asked_is_a_one_line_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        small = train_tokenizer(TRAIN_TEXT, vocab_size=2048, sample_chars=10_000)
    assert small.vocab_size < 2048
    warning = f"supports only {small.vocab_size} tokens (asked 2048): add text"
    assert warning in caplog.text and "min_frequency (2)" in caplog.text and len(caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        train_tokenizer(TRAIN_TEXT, vocab_size=300, sample_chars=10_000)
    assert not caplog.records


def test_sample_chars_caps_training_text():
    tok = train_tokenizer(["abc " * 10_000], vocab_size=1000, sample_chars=50, min_frequency=1)
    # 50 characters of "abc abc ..." cannot produce many merges
    assert tok.vocab_size < 300


def test_a_checkpoint_refuses_a_tokenizer_it_was_not_trained_with(copy_run, capsys):
    """A run's checkpoints record their tokenizer's hash: loading, serving, evaluating or fine-tuning them with
    another tokenizer.json stops with one line instead of answering garbage."""
    from lmforge.cli import main
    from lmforge.data.shards import tokenizer_hash
    from lmforge.pipeline import load
    from lmforge.serve.host import ModelHost
    from lmforge.train.checkpoint import read_state

    run = copy_run()
    own = Tokenizer.load(run / "tokenizer.json")
    for name in ("pretrained", "best", "last"):
        assert read_state(run / "checkpoints" / name)["tokenizer_hash"] == tokenizer_hash(own)
    load(run)  # its own tokenizer: fine
    other = train_tokenizer(
        ["a different corpus of words, numbers 123 and more words"] * 50, own.vocab_size, 10_000, min_frequency=1
    )
    other.save(run / "tokenizer.json")
    capsys.readouterr()  # (the small-vocabulary warning above: not part of what the commands below print)
    with pytest.raises(LmforgeError, match="is not the tokenizer .* was trained with"):
        load(run)
    with pytest.raises(LmforgeError, match="was trained with"):
        ModelHost(run)
    assert main(["generate", "--run-dir", str(run), "Once upon a time"]) != 0
    err = capsys.readouterr().err
    assert "was trained with" in err and "Traceback" not in err
    vocab = str(read_state(run / "checkpoints" / "pretrained")["model_config"]["vocab_size"])  # same shape
    assert main(["finetune", "--run-dir", str(run), "--finetune.max_steps", "1", "--model.vocab_size", vocab]) != 0
    assert "was trained with" in capsys.readouterr().err


SHORT = ["s" * 96 + f"{i:04d}" for i in range(1000)]  # 100K characters of short documents


def _sample_by_source(tmp_path, weights: dict, phases=None, sample_chars=60_000) -> dict[str, int]:
    """Characters of each source in the tokenizer sample (every source's text is made of its own letter)."""
    import json

    from lmforge.config import recipe_from_dict
    from lmforge.pipeline import tokenizer_sample

    docs = {"books": ["b" * 200_000, "c" * 200_000], "short": SHORT}
    for name, texts in docs.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = {"sources": [{"name": n, "local": str(tmp_path / f"{n}.jsonl"), "weight": w} for n, w in weights.items()]}
    if phases:
        data["phases"] = phases
    recipe = recipe_from_dict({"data": data, "tokenizer": {"sample_chars": sample_chars}}, {})
    sample = "".join(tokenizer_sample(recipe, None))
    assert len(sample) == sample_chars
    short = len(sample) - sample.count("b") - sample.count("c")
    return {"books": len(sample) - short, "short": short / sample_chars, "c": sample.count("c")}


def test_tokenizer_sample_follows_the_mixture_weights_by_characters(tmp_path):
    """Two 200K-character books do not crowd out a source of short documents: each source gets its weight's share
    of the characters, and a book is taken in pieces alongside the other."""
    even = _sample_by_source(tmp_path, {"books": 1, "short": 1})
    assert abs(even["short"] - 0.5) < 0.1
    assert even["c"] >= 8_000  # the second book is sampled too, not only the first
    assert abs(_sample_by_source(tmp_path, {"books": 1, "short": 3})["short"] - 0.75) < 0.1
    phases = [{"name": "books only", "tokens": 1000, "weights": {"books": 1}}, {"name": "mix", "weights": {"short": 1}}]
    assert abs(_sample_by_source(tmp_path, {"books": 1, "short": 1}, phases)["short"] - 0.5) < 0.1  # averaged
    # a source that runs out leaves the rest of its share to the others
    assert _sample_by_source(tmp_path, {"books": 1, "short": 1}, sample_chars=300_000)["short"] == 1 / 3
