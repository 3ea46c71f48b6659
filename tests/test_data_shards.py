"""Sharding: parallel = in-process, fixed-size shards with an index, dedup, held-out validation, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import DataConfig, SourceConfig
from lmforge.data import shards as shards_mod
from lmforge.data.shards import load_manifest, prepare_shards, read_index
from lmforge.errors import LmforgeError
from lmforge.tokenizer import train_tokenizer

WORDS = (
    "the river runs past old mill where children play and birds sing in tall green trees while "
    "a quiet farmer counts his sheep under bright morning light"
).split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_docs(300, 0), vocab_size=400, sample_chars=200_000)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def data_cfg(tmp_path: Path, **kw) -> DataConfig:
    docs = make_docs(400, 1)
    write_jsonl(tmp_path / "a.jsonl", docs[:300] + docs[:20])  # 20 exact duplicates
    write_jsonl(tmp_path / "b.jsonl", make_docs(100, 2) + docs[290:300])  # 10 duplicates of source a
    defaults = dict(shard_tokens=4096, val_fraction=0.1, workers=1)
    defaults.update(kw)
    return DataConfig(
        sources=[
            SourceConfig(name="a", local=str(tmp_path / "a.jsonl")),
            SourceConfig(name="b", local=str(tmp_path / "b.jsonl")),
        ],
        **defaults,
    )


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in (".bin", ".npy")}


def test_shards_index_dedup_and_split(tmp_path, tok):
    cfg = data_cfg(tmp_path)
    manifest = prepare_shards(cfg, tok, None, tmp_path / "out")
    a, b = manifest["sources"]
    assert (a["duplicates"], b["duplicates"]) == (20, 10)
    assert (a["docs"], b["docs"]) == (300, 100)
    assert len(a["shards"]["train"]) > 3  # fixed-size shards
    assert all(s["tokens"] >= cfg.shard_tokens for s in a["shards"]["train"][:-1])
    assert manifest["tokenizer_hash"] and manifest["dtype"] == "uint16"
    train_hashes, val_hashes = set(), set()
    for entry in (a, b):
        for split, hashes in (("train", train_hashes), ("val", val_hashes)):
            for shard in entry["shards"][split]:
                tokens = np.fromfile(tmp_path / "out" / shard["file"], dtype=np.uint16)
                index = read_index(tmp_path / "out" / shard["index"])
                assert len(tokens) == shard["tokens"] == index["length"].sum()
                assert (index["source"] == entry["id"]).all()
                first = tokens[index["offset"][0] : index["offset"][0] + index["length"][0]]
                assert first[-1] == tok.eot_id  # documents end with end-of-text
                hashes.update(index["hash"].tolist())
    assert not train_hashes & val_hashes  # validation documents are never trained on
    assert len(val_hashes) == 40  # every 10th of the 400 unique documents


@pytest.mark.parametrize("cap", [0, 3000])
def test_parallel_workers_write_identical_shards(tmp_path, tok, monkeypatch, cap):
    monkeypatch.setattr(shards_mod, "BATCH_DOCS", 16)  # many batches in flight
    outputs = []
    for workers in (1, 2):
        cfg = data_cfg(tmp_path, workers=workers)
        cfg.sources[0].max_tokens = cap  # a source cut short must leave nothing in flight for the next one
        prepare_shards(cfg, tok, None, tmp_path / f"w{workers}")
        outputs.append(shard_bytes(tmp_path / f"w{workers}"))
    assert outputs[0] == outputs[1]


def test_interrupted_preparation_resumes_without_redoing_finished_shards(tmp_path, tok, monkeypatch):
    cfg = data_cfg(tmp_path)
    reference = tmp_path / "reference"
    prepare_shards(cfg, tok, None, reference)
    monkeypatch.setattr(shards_mod, "BATCH_DOCS", 16)  # many batches, so the interruption lands mid-source
    real = shards_mod._write_batch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(shards_mod, "_write_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(cfg, tok, None, out)
    assert not (out / "manifest.json").exists()
    staging = out / shards_mod.STAGING  # a source is made there and moved into place once every source is done
    done = json.loads((staging / "a" / "progress.json").read_text())
    assert done["shards"]["train"] and not done["done"]
    finished = {s["file"]: (staging / s["file"]).stat().st_mtime_ns for s in done["shards"]["train"]}
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(shards_mod, "_write_batch", real)
    resumed_batches = {"n": 0}

    def counting(*args, **kwargs):
        resumed_batches["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "_write_batch", counting)
    manifest = prepare_shards(cfg, tok, None, out)
    assert shard_bytes(out) == shard_bytes(reference)
    assert manifest == load_manifest(reference) | {"sources": manifest["sources"]}
    # every count, bytes included, as in the uninterrupted preparation
    assert manifest["sources"] == load_manifest(reference)["sources"]
    assert not staging.exists()
    assert all((out / f).stat().st_mtime_ns == t for f, t in finished.items())  # not rewritten
    assert resumed_batches["n"] < 12 + 10  # only the unfinished part was tokenized again
    again = {"n": 0}
    monkeypatch.setattr(shards_mod, "_write_batch", lambda *a, **k: again.__setitem__("n", 1) or real(*a, **k))
    prepare_shards(cfg, tok, None, out)  # everything done: nothing is tokenized
    assert again["n"] == 0


def test_special_token_strings_in_documents_are_text_not_boundaries(tmp_path, tok):
    """A document quoting "<|endoftext|>" keeps it as text: exactly one end-of-text per document, at its end."""
    texts = [
        d + (" <|endoftext|> and <|question|> <|answer|> <|pad|>" if i % 7 == 3 else "")
        for i, d in enumerate(make_docs(60, 5))
    ]
    cfg = DataConfig(
        sources=[SourceConfig(name="a", local=str(write_jsonl(tmp_path / "a.jsonl", texts)))],
        shard_tokens=4096,
        val_fraction=0.1,
        workers=1,
    )
    manifest = prepare_shards(cfg, tok, None, tmp_path / "out")
    decoded = []
    for split in ("train", "val"):
        for shard in manifest["sources"][0]["shards"][split]:
            tokens = np.fromfile(tmp_path / "out" / shard["file"], dtype=np.uint16)
            index = read_index(tmp_path / "out" / shard["index"])
            assert int((tokens == tok.eot_id).sum()) == len(index)  # no injected document boundary
            assert not np.isin(tokens, list(tok.special_ids - {tok.eot_id})).any()
            decoded += [
                tok.decode(tokens[o : o + n - 1]) for o, n in zip(index["offset"], index["length"], strict=True)
            ]
    assert sorted(decoded) == sorted(texts)  # exact round trip


def test_no_validation_documents_error_gives_advice_that_works(tmp_path, tok):
    folder = tmp_path / "plays"
    folder.mkdir()
    for i in range(2):  # two files of 30 paragraphs: two documents read whole
        (folder / f"{i}.txt").write_text("\n\n".join(make_docs(30, 10 + i)))
    cfg = DataConfig(sources=[SourceConfig(name="plays", local=str(folder))], val_fraction=0.05, workers=1)
    with pytest.raises(LmforgeError) as exc:
        prepare_shards(cfg, tok, None, tmp_path / "out")
    message = str(exc.value)
    assert "at least 11 documents" in message and "'plays', has 2" in message
    assert 'sample_by = "paragraph"' in message and "source 'plays'" in message and "\n" not in message
    assert "raise data.val_fraction above 0.25" in message
    cfg.val_fraction = 0.26  # either advice works
    assert prepare_shards(cfg, tok, None, tmp_path / "out")["sources"][0]["val_docs"] == 1
    cfg.val_fraction, cfg.sources[0].sample_by = 0.05, "paragraph"
    manifest = prepare_shards(cfg, tok, None, tmp_path / "out")
    assert manifest["sources"][0]["docs"] == 60 and manifest["sources"][0]["val_docs"] == 3


def test_val_fraction_is_exact_and_1_over_k_keeps_its_documents():
    n = 100_000
    for f in (0.15, 0.3, 0.4, 0.6, 0.9, 0.123):
        assert sum(shards_mod.is_validation_doc(i, f) for i in range(n)) == round(f * n)
    for k in (2, 3, 7, 10, 20, 50, 1000):  # 0.05 (the recipes) and 0.02 (the default) split as they always did
        assert [i for i in range(5000) if shards_mod.is_validation_doc(i, 1 / k)] == list(range(k // 2, 5000, k))


def test_max_tokens_caps_a_source(tmp_path, tok):
    cfg = data_cfg(tmp_path)
    cfg.sources[0].max_tokens = 5000
    manifest = prepare_shards(cfg, tok, None, tmp_path / "out")
    a = manifest["sources"][0]
    assert 5000 <= a["train_tokens"] + a["val_tokens"] < 5000 + 4 * 200


def test_no_sources_and_old_manifests_are_clear_errors(tmp_path, tok):
    with pytest.raises(LmforgeError, match="no \\[\\[data.sources\\]\\]"):
        prepare_shards(DataConfig(), tok, None, tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"dtype": "uint16", "sources": []}))
    with pytest.raises(LmforgeError, match="prepare` again"):
        load_manifest(tmp_path)


def test_changed_config_or_deleted_shards_redo_a_source(tmp_path, tok):
    cfg = data_cfg(tmp_path)
    out = tmp_path / "out"
    first = prepare_shards(cfg, tok, None, out)
    (out / first["sources"][1]["shards"]["train"][0]["file"]).unlink()  # as data.delete_consumed does
    again = prepare_shards(cfg, tok, None, out)
    assert again["sources"] == first["sources"]
    assert all((out / s["file"]).is_file() for e in again["sources"] for s in e["shards"]["train"])
    cfg.sources[0].min_chars = 300  # a changed source is prepared again (and so are those after it: dedup)
    changed = prepare_shards(cfg, tok, None, out)
    assert changed["sources"][0]["dropped"]["too_short"] > 0
    assert changed["sources"][0]["docs"] < first["sources"][0]["docs"]


def test_a_preparation_interrupted_while_swapping_in_changed_sources_is_finished_by_the_next(
    tmp_path, tok, monkeypatch
):
    cfg = data_cfg(tmp_path)
    out = tmp_path / "out"
    prepare_shards(cfg, tok, None, out)
    cfg.sources[0].min_chars = 300  # both sources change (b through dedup)
    reference = prepare_shards(cfg, tok, None, tmp_path / "reference")
    real_replace = Path.replace
    moved = []

    def replace(self, target):
        if self.parent.name == shards_mod.STAGING:
            if moved:
                raise KeyboardInterrupt  # killed between two sources' swaps
            moved.append(self.name)
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(cfg, tok, None, out)
    assert moved == ["a"] and not (out / "manifest.json").exists()  # half swapped: no manifest claims either
    monkeypatch.setattr(Path, "replace", real_replace)
    assert prepare_shards(cfg, tok, None, out) == reference
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")
    assert not (out / shards_mod.STAGING).exists()
