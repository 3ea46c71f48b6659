import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config import SourceConfig
from lmforge.data.sources import iter_documents, iter_qa_examples
from lmforge.errors import LmforgeError


def docs(tmp_path, **kw):
    return list(iter_documents(SourceConfig(name="s", **kw), tmp_path))


def test_formats_and_compression(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "gz one"}) + "\n" + json.dumps({"text": "gz two"}) + "\n")
    pq.write_table(pa.table({"body": ["pq one", "pq two"]}), tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "json one"}]))
    (tmp_path / "e.csv").write_text("id,text\n1,csv one\n")
    assert docs(tmp_path, local="a.txt") == ["plain text file"]
    assert docs(tmp_path, local="b.jsonl.gz") == ["gz one", "gz two"]
    assert docs(tmp_path, local="c.parquet", text_field="body") == ["pq one", "pq two"]
    assert docs(tmp_path, local="d.json") == ["json one"]
    assert docs(tmp_path, local="e.csv") == ["csv one"]
    assert docs(tmp_path, local="*.txt") == ["plain text file"]
    assert docs(tmp_path, local="b.jsonl.gz", max_docs=1) == ["gz one"]


def test_zstd(tmp_path):
    import zstandard

    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zst doc"}\n'))
    assert docs(tmp_path, local="z.jsonl.zst") == ["zst doc"]


def test_bad_json_line_and_missing_field_are_skipped_with_file_and_line(tmp_path, caplog):
    (tmp_path / "m.jsonl").write_text('{"text": "good"}\n{broken\n{"other": 1}\n{"text": "also good"}\n')
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert docs(tmp_path, local="m.jsonl") == ["good", "also good"]
    assert "m.jsonl:2: invalid JSON" in caplog.text
    assert "m.jsonl:3: no string field 'text'" in caplog.text


def test_non_utf8_is_replaced_and_counted(tmp_path, caplog):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert docs(tmp_path, local="bad.txt") == ["caf\ufffd au lait"]
    assert "invalid UTF-8" in caplog.text and "1 records had invalid UTF-8" in caplog.text


@pytest.mark.parametrize(
    "setup, kw, message",
    [
        (lambda d: None, {"local": "missing.jsonl"}, "no local files match 'missing.jsonl'"),
        (lambda d: (d / "empty").mkdir(), {"local": "empty"}, "has no supported files"),
        (lambda d: (d / "e.txt").write_text("   \n"), {"local": "e.txt"}, "no documents in e.txt"),
        (
            lambda d: pq.write_table(pa.table({"a": ["x"]}), d / "p.parquet"),
            {"local": "p.parquet"},
            "no documents in p.parquet",
        ),
        (lambda d: (d / "j.json").write_text("{oops"), {"local": "j.json"}, "j.json: invalid JSON at line 1"),
        (lambda d: (d / "x.xml").write_text("<a/>"), {"local": "x.xml"}, "unsupported file type"),
        (lambda d: (d / "t.txt.gz").write_bytes(b"not gzip"), {"local": "t.txt.gz"}, "corrupt or truncated"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, setup, kw, message):
    setup(tmp_path)
    with pytest.raises(LmforgeError, match=message) as err:
        docs(tmp_path, **kw)
    assert "\n" not in str(err.value)


def test_optional_source_without_copy_is_skipped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert docs(tmp_path, local="nothing/*.jsonl", optional=True) == []
    assert "optional source 's' skipped" in caplog.text


def test_hub_unreachable_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LmforgeError) as err:
        docs(tmp_path, local="squad/*.json", hub="rajpurkar/squad-does-not-exist")
    msg = str(err.value)
    assert "rajpurkar/squad-does-not-exist" in msg and "not reachable" in msg and "--data-dir" in msg


def test_squad_file_as_pretraining_text_and_as_qa(data_dir):
    src = SourceConfig(name="dev", local="squad/dev-v1.1.json")
    contexts = list(iter_documents(src, data_dir))
    assert len(contexts) == 2067 == len(set(contexts))
    examples = list(iter_qa_examples(src, data_dir))
    assert len(examples) == 10570
    ex = examples[0]
    assert ex.question.startswith("Which NFL team represented the AFC")
    assert "Denver Broncos" in ex.answers
    assert ex.context[ex.answer_starts[0] :].startswith(ex.answers[0])


def test_squad_with_missing_fields_skips_and_warns(tmp_path, caplog):
    data = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {
                                "id": "ok",
                                "question": "Where is Paris?",
                                "answers": [{"text": "France", "answer_start": 12}],
                            },
                            {"id": "noans", "question": "Why?", "answers": []},
                            {"id": "noq", "answers": [{"text": "Paris", "answer_start": 0}]},
                        ],
                    }
                ],
            }
        ]
    }
    (tmp_path / "s.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        examples = list(iter_qa_examples(SourceConfig(name="s", local="s.json"), tmp_path))
    assert [e.id for e in examples] == ["ok"]
    assert "noans" in caplog.text and "noq" in caplog.text
