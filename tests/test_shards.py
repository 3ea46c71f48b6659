import json

import numpy as np
import pytest
import torch

from lmforge.config import DataConfig, SourceConfig
from lmforge.data.shards import TokenBatcher, is_validation_doc, load_manifest, prepare_shards, token_dtype
from lmforge.errors import LmforgeError
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["lorem ipsum dolor sit amet " * 50], vocab_size=300, sample_chars=5000, min_frequency=1)


def write_docs(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_val_split_is_by_document_and_never_trained_on(tmp_path, tok):
    texts = [f"document number {i} " + "word " * (i % 7 + 5) for i in range(100)]
    write_docs(tmp_path / "a.jsonl", texts)
    data = DataConfig(sources=[SourceConfig(name="a", local="a.jsonl")], val_fraction=0.1)
    manifest = prepare_shards(data, tok, tmp_path, tmp_path / "shards")
    entry = manifest["sources"][0]
    assert entry["docs"] == 100 and entry["val_docs"] == 10 and entry["train_docs"] == 90
    dtype = token_dtype(tok.vocab_size)
    assert dtype == np.uint16 and manifest["dtype"] == "uint16"
    train = np.fromfile(tmp_path / "shards" / "a.train.bin", dtype=dtype)
    val = np.fromfile(tmp_path / "shards" / "a.val.bin", dtype=dtype)
    assert len(train) == entry["train_tokens"] and len(val) == entry["val_tokens"]
    # documents are separated by end-of-text, and every validation document is absent from training
    train_docs = {tok.decode(d) for d in np.split(train, np.where(train == tok.eot_id)[0] + 1) if len(d)}
    val_docs = [tok.decode(d) for d in np.split(val, np.where(val == tok.eot_id)[0] + 1) if len(d)]
    assert len(val_docs) == 10
    expected_val = {t for i, t in enumerate(texts) if is_validation_doc(i, 0.1)}
    assert set(val_docs) == expected_val
    assert not expected_val & train_docs
    assert load_manifest(tmp_path / "shards")["tokenizer_hash"] == manifest["tokenizer_hash"]


def test_uint32_for_large_vocab():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_batcher_is_deterministic_and_resumable(tmp_path, tok):
    write_docs(tmp_path / "a.jsonl", [f"text {i} " * 30 for i in range(40)])
    write_docs(tmp_path / "b.jsonl", [f"other {i} " * 30 for i in range(40)])
    data = DataConfig(sources=[SourceConfig(name="a", local="a.jsonl"), SourceConfig(name="b", local="b.jsonl",
                                                                                     weight=3.0)])
    prepare_shards(data, tok, tmp_path, tmp_path / "shards")
    b1 = TokenBatcher(tmp_path / "shards", "train", block_size=16, batch_size=4, seed=7)
    x, y = b1.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    state = b1.state_dict()
    after = [b1.next_batch() for _ in range(3)]
    b2 = TokenBatcher(tmp_path / "shards", "train", block_size=16, batch_size=4, seed=999)
    b2.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(after, [b2.next_batch() for _ in range(3)], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the fixed evaluation batches do not move the data position
    fixed1 = b2.fixed_batches(2)
    s = b2.state_dict()["generator"]
    assert torch.equal(fixed1[0][0], b2.fixed_batches(2)[0][0])
    assert torch.equal(s, b2.state_dict()["generator"])


def test_empty_source_and_missing_shards_are_clear_errors(tmp_path, tok):
    (tmp_path / "e.jsonl").write_text("\n")
    data = DataConfig(sources=[SourceConfig(name="e", local="e.jsonl")])
    with pytest.raises(LmforgeError, match="source 'e': no text found"):
        prepare_shards(data, tok, tmp_path, tmp_path / "shards")
    assert not (tmp_path / "shards" / "e.train.bin").exists()
    with pytest.raises(LmforgeError, match="run `lmforge prepare` first"):
        TokenBatcher(tmp_path / "nothing", "train", 16, 4, 0)
    with pytest.raises(LmforgeError, match="nothing to pretrain on"):
        prepare_shards(DataConfig(), tok, tmp_path, tmp_path / "s2")
