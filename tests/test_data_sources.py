"""Sources: formats, compression, malformed rows, filters, templates, caps, and the `datasets` (Hub) path."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.config import SourceConfig
from lmforge.data.sources import data_dir_from_env, iter_documents
from lmforge.errors import LmforgeError

DOCS = ["First document about rivers.", "Second one, about mountains.", "A third about the sea."]


def docs_of(path: Path, **kw) -> tuple[list[str], Counter]:
    stats: Counter = Counter()
    src = SourceConfig(name="s", local=str(path), **kw)
    return list(iter_documents(src, None, stats)), stats


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.json", "d.csv", "d.parquet", "d.csv.gz"])
def test_every_format_reads_the_same_documents(tmp_path, name):
    path = tmp_path / name
    records = [{"text": t, "id": i} for i, t in enumerate(DOCS)]
    base = name.split(".")[1]
    if base == "jsonl":
        raw = jsonl_bytes(records)
    elif base == "json":
        raw = json.dumps(records).encode()
    elif base == "csv":
        raw = ("id,text\n" + "".join(f'{r["id"]},"{r["text"]}"\n' for r in records)).encode()
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
        raw = None
    if raw is not None:
        if name.endswith(".gz"):
            raw = gzip.compress(raw)
        elif name.endswith(".zst"):
            raw = zstandard.ZstdCompressor().compress(raw)
        path.write_bytes(raw)
    docs, stats = docs_of(path)
    assert docs == DOCS
    assert stats["docs"] == 3


def test_txt_files_and_directories(tmp_path):
    (tmp_path / "books").mkdir()
    for i, t in enumerate(DOCS):
        (tmp_path / "books" / f"{i}.txt").write_text(t)
    (tmp_path / "books" / "notes.bin").write_bytes(b"\x00")  # unsupported files in a directory are ignored
    docs, _ = docs_of(tmp_path / "books")
    assert docs == DOCS


BOOK = "Act one.\r\nScene one.\r\n\r\n\r\nEnter the king.\n   \nExit,\npursued by a bear.\n"


def test_txt_sample_by_document_paragraph_and_line(tmp_path, monkeypatch):
    path = tmp_path / "book.txt"
    path.write_text(BOOK, newline="")
    paragraphs = ["Act one.\nScene one.", "Enter the king.", "Exit,\npursued by a bear."]
    assert docs_of(path)[0] == paragraphs  # auto: a single-file source is cut into paragraphs
    assert docs_of(path, sample_by="paragraph")[0] == paragraphs
    assert docs_of(path, sample_by="line")[0] == [
        "Act one.",
        "Scene one.",
        "Enter the king.",
        "Exit,",
        "pursued by a bear.",
    ]
    assert docs_of(path, sample_by="document")[0] == [BOOK]
    (tmp_path / "more.txt").write_text(BOOK, newline="")
    assert docs_of(tmp_path / "*.txt")[0] == [BOOK, BOOK]  # auto: several files are a document each
    gz = tmp_path / "z" / "book.txt.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(BOOK.encode()))
    # paragraphs and lines are streamed: the file is never read whole
    monkeypatch.setattr("lmforge.data.sources._read_text", lambda *a: pytest.fail("read whole"))
    assert docs_of(gz, sample_by="paragraph")[0] == paragraphs


def test_txt_paragraphs_are_located_by_line(tmp_path, caplog):
    path = tmp_path / "book.txt"
    path.write_bytes(b"one\n\ntwo caf\xe9\n\nthree\n")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        docs, stats = docs_of(path, min_chars=4)
    assert docs == ["two caf\ufffd", "three"] and stats["too_short"] == 1
    assert f"{path}:3: invalid UTF-8" in caplog.text


def test_malformed_rows_are_skipped_counted_and_located(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        jsonl_bytes([{"text": DOCS[0]}])
        + b"{not json\n"
        + jsonl_bytes([{"title": "no text"}])
        + b'{"text": "caf\xe9 latin-1"}\n'
        + b"[1, 2]\n"
        + jsonl_bytes([{"text": DOCS[1]}])
    )
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        docs, stats = docs_of(path)
    assert docs == [DOCS[0], "caf\ufffd latin-1", DOCS[1]]
    assert (stats["bad_json"], stats["missing_field"], stats["replaced"], stats["not_object"]) == (1, 1, 1, 1)
    text = caplog.text
    assert f"{path}:2: invalid JSON" in text
    assert f"{path}:3: no string field 'text'" in text
    assert f"{path}:4: invalid UTF-8" in text
    assert f"{path}:5: expected a JSON object" in text


def test_lone_surrogates_are_replaced_counted_and_located(tmp_path, caplog):
    """A JSON escape such as \\ud800 gives a str that no UTF-8 can hold: replaced, never a crash."""
    from lmforge.config import DataConfig
    from lmforge.data.shards import prepare_shards
    from lmforge.tokenizer import train_tokenizer

    path = tmp_path / "s.jsonl"
    path.write_bytes(jsonl_bytes([{"text": t} for t in DOCS * 4]) + b'{"text": "broken \\ud800 surrogate \\udfff"}\n')
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        docs, stats = docs_of(path)
    assert docs[-1] == "broken \ufffd surrogate \ufffd"
    assert stats["surrogates"] == 1
    assert f"{path}:13: lone surrogate" in caplog.text and "1 records had lone surrogate" in caplog.text
    src = SourceConfig(name="s", local=str(path))
    tok = train_tokenizer(iter_documents(src, None), vocab_size=300, sample_chars=10_000)  # tokenizer train
    manifest = prepare_shards(DataConfig(sources=[src], val_fraction=0.2, workers=1), tok, None, tmp_path / "out")
    assert manifest["sources"][0]["docs"] == 4  # DOCS deduplicated, and the repaired document


def test_truncated_gzip_is_one_clear_error(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes([{"text": t * 200} for t in DOCS]))[:-30])
    with pytest.raises(LmforgeError, match="corrupt or truncated"):
        docs_of(path)


def test_truncated_or_corrupt_zstd_is_one_clear_error_and_every_frame_is_read(tmp_path):
    raw = jsonl_bytes([{"text": f"{t} {i}"} for i in range(300) for t in DOCS])
    packed = zstandard.ZstdCompressor().compress(raw)
    cut = tmp_path / "cut.jsonl.zst"
    for bad in (packed[: len(packed) // 2], packed[:-3], packed[:20] + b"\x00" * 50 + packed[70:]):
        cut.write_bytes(bad)
        with pytest.raises(LmforgeError, match="cut.jsonl.zst: corrupt or truncated"):
            docs_of(cut)
    middle = raw.index(b"\n", len(raw) // 2) + 1  # two frames, as concatenated or multi-threaded zstd writes
    two = tmp_path / "two.jsonl.zst"
    two.write_bytes(
        zstandard.ZstdCompressor().compress(raw[:middle]) + zstandard.ZstdCompressor().compress(raw[middle:])
    )
    assert len(docs_of(two)[0]) == 900
    txt = tmp_path / "cut.txt.zst"
    txt.write_bytes(zstandard.ZstdCompressor().compress(raw)[:-3])
    with pytest.raises(LmforgeError, match="cut.txt.zst: corrupt or truncated"):
        docs_of(txt)


def test_csv_long_fields_multiline_rows_and_errors(tmp_path, caplog):
    book = "word " * 60_000  # 300 kB: over the csv module's default 128 KiB field limit
    path = tmp_path / "d.csv"
    path.write_bytes(f'id,text\n1,"{book}"\n2,"two\nlines"\n3,caf'.encode() + b"\xe9\n")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        docs, stats = docs_of(path)
    assert docs == [book, "two\nlines", "caf\ufffd"]
    assert f"{path}:5: invalid UTF-8" in caplog.text and stats["replaced"] == 1
    path.write_bytes(b"id,text\n1,ok\n2,a bare\rcarriage return\n")  # any csv.Error: one line, file:line
    with pytest.raises(LmforgeError, match=f"^{path}:3: malformed CSV"):
        docs_of(path)


def test_empty_source_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(LmforgeError, match="source 's': no documents"):
        docs_of(path)
    with pytest.raises(LmforgeError, match="no local files match"):
        list(iter_documents(SourceConfig(name="x", local="missing/*.jsonl"), tmp_path))


def test_filters_template_and_caps(tmp_path):
    path = tmp_path / "web.jsonl"
    records = [
        {"title": "A", "text": "short", "int_score": 5, "language": "en"},
        {"title": "B", "text": "long enough text " * 3, "int_score": 2, "language": "en"},
        {"title": "C", "text": "long enough text " * 3, "int_score": 4, "language": "fr"},
        {"title": "D", "text": "long enough text " * 3, "int_score": 3, "language": "en"},
        {"title": "E", "text": "x" * 500, "int_score": 3, "language": "en"},
        {"title": "F", "text": "kept because no score column " * 2, "language": "en"},
    ]
    path.write_bytes(jsonl_bytes(records))
    docs, stats = docs_of(
        path,
        min_chars=20,
        max_chars=200,
        score_field="int_score",
        min_score=3,
        language_field="language",
        languages=["en"],
        template="{title}: {text}",
    )
    assert [d[:2] for d in docs] == ["D:", "F:"]
    assert (stats["too_short"], stats["low_score"], stats["other_language"], stats["too_long"]) == (1, 1, 1, 1)
    assert stats["unscored"] == 1
    capped, _ = docs_of(path, max_docs=2)
    assert len(capped) == 2
    with pytest.raises(LmforgeError, match="no documents"):
        docs_of(path, template="{title} {missing_field}")


def _hub_like_dataset(root: Path) -> Path:
    """A local folder laid out like a Hub dataset repo with configs (as HuggingFaceFW/fineweb-edu is)."""
    (root / "sample" / "10BT").mkdir(parents=True)
    rows = [{"text": f"Educational page {i} about photosynthesis and light.", "int_score": i % 5} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows[:20]), root / "sample" / "10BT" / "000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[20:]), root / "sample" / "10BT" / "001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
        "    path: sample/10BT/*.parquet\n---\n# fineweb-edu stand-in\n"
    )
    return root


def test_hub_code_path_reads_a_dataset_repo_with_a_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _hub_like_dataset(tmp_path / "fineweb-edu")
    src = SourceConfig(
        name="fineweb-edu", hub=str(repo), hub_config="sample-10BT", score_field="int_score", min_score=3
    )
    stats: Counter = Counter()
    docs = list(iter_documents(src, None, stats))
    assert len(docs) == 16 and stats["low_score"] == 24
    assert docs[0] == "Educational page 3 about photosynthesis and light."


def test_unreachable_hub_says_so_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    src = SourceConfig(
        name="fineweb-edu",
        hub="HuggingFaceFW/no-such-dataset-lmforge",
        hub_config="sample-10BT",
        local="pretrain/fineweb/*.parquet",
    )
    with pytest.raises(LmforgeError) as exc:
        list(iter_documents(src, Path("/nonexistent")))
    message = str(exc.value)
    assert "\n" not in message
    assert "not reachable" in message and "pretrain/fineweb/*.parquet" in message and "--data-dir" in message


def test_real_squad_contexts_are_unique_paragraphs(data_dir):
    src = SourceConfig(name="squad", local="squad/dev-v1.1.json", format="squad")
    docs = list(iter_documents(src, data_dir))
    assert len(docs) == len(set(docs)) and 2000 <= len(docs) <= 2067


def test_tinyshakespeare_is_cut_into_paragraphs(data_dir):
    docs, _ = docs_of(data_dir / "pretrain" / "tinyshakespeare.txt")
    assert len(docs) > 7000 and docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."


def test_real_pretraining_samples(data_dir):
    stats: Counter = Counter()
    stories = list(
        iter_documents(SourceConfig(name="tinystories", local="pretrain/tinystories/*.jsonl.gz"), data_dir, stats)
    )
    assert len(stories) == stats["records"] == 3316 and stories[0].startswith("Spot. Spot saw the shiny car")
    books = SourceConfig(name="books", local="pretrain/gutenberg", template="{title}\n\n{text}", max_chars=300_000)
    titles = [doc.split("\n", 1)[0] for doc in iter_documents(books, data_dir)]
    assert "Alice's Adventures in Wonderland" in titles and "Moby Dick: Or The Whale" not in titles  # too long


def test_a_data_dir_that_does_not_exist_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("LMFORGE_DATA_DIR", raising=False)
    assert data_dir_from_env(None) is None and data_dir_from_env(tmp_path) == tmp_path
    with pytest.raises(LmforgeError, match=f"^--data-dir {tmp_path / 'nope'}: no such directory$"):
        data_dir_from_env(tmp_path / "nope")
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(LmforgeError, match=f"^LMFORGE_DATA_DIR {tmp_path / 'gone'}: no such directory$"):
        data_dir_from_env(None)
