"""Bad QA input is counted, named and skipped; it never crashes fine-tuning or evaluation."""

from __future__ import annotations

import json
import logging

import pytest

from lmforge.config import SourceConfig
from lmforge.data.qa import clean_examples, context_windows, encode_examples
from lmforge.data.sources import iter_qa_examples
from lmforge.tokenizer import Tokenizer, train_tokenizer

CONTEXT = "Paris is the capital of France. The Seine flows through Paris."
LONG_QUESTION = "Which " + "very " * 400 + "long question is this?"


def bad_squad(path):
    qas = [
        {"id": "ok-1", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {
            "id": "ok-2",
            "question": "What flows through Paris?",
            "answers": [{"text": "The Seine", "answer_start": 32}, {"text": "", "answer_start": 0}],
        },
        {"id": "no-question", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "no-answers", "question": "Who?"},
        {"id": "answers-not-a-list", "question": "Who?", "answers": "Paris"},
        "not a dict at all",
        {"id": "empty-answer", "question": "What?", "answers": [{"text": "  ", "answer_start": 0}]},
        {"id": "not-in-context", "question": "Where is Rome?", "answers": [{"text": "Italy", "answer_start": 3}]},
        {"id": "bad-start", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": "zero"}]},
        {"id": "long-question", "question": LONG_QUESTION, "answers": [{"text": "Paris", "answer_start": 0}]},
    ]
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "France",
                "paragraphs": [{"context": CONTEXT, "qas": qas}, {"qas": [{"id": "no-context"}]}, "junk"],
            },
            "junk article",
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_loader_skips_malformed_entries_naming_them(tmp_path, caplog):
    path = bad_squad(tmp_path / "bad.json")
    src = SourceConfig(name="bad", local=str(path), format="squad")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        examples = list(iter_qa_examples(src, None))
    ids = [ex.id for ex in examples]
    assert ids == ["ok-1", "ok-2", "empty-answer", "not-in-context", "bad-start", "long-question"]
    assert examples[4].answer_starts == [-1]  # a non-integer offset becomes "unknown", not a crash
    warning = " ".join(r.getMessage() for r in caplog.records)
    for bad in ("no-question", "no-answers", "answers-not-a-list", "bad.json:0/0/5"):
        assert bad in warning


def test_clean_examples_counts_and_names(tmp_path, caplog):
    examples = list(
        iter_qa_examples(SourceConfig(name="bad", local=str(bad_squad(tmp_path / "b.json")), format="squad"), None)
    )
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        kept, dropped = clean_examples(examples, "test")
    assert [ex.id for ex in kept] == ["ok-1", "ok-2", "bad-start", "long-question"]
    assert dropped == {"empty answer": 1, "answer text not in the context": 1}
    assert kept[1].answers == ["The Seine"] and kept[1].answer_starts == [32]  # the empty gold answer is dropped
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "empty-answer" in warning and "not-in-context" in warning


def test_lone_surrogate_escapes_in_a_qa_file_are_replaced_and_named(tmp_path, caplog):
    """JSON may hold "\\ud800", which is no Unicode text: the tokenizer refuses it (a TypeError), so the loader
    replaces it with U+FFFD, as pretraining sources do, and names the example."""
    context = "Caf\ud800 Paris is the capital of France."
    qas = [
        {"id": "ok", "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 6}]},
        {"id": "odd\udfff", "question": "Capital \udc00?", "answers": [{"text": "Paris\ud83d", "answer_start": 6}]},
    ]
    path = tmp_path / "surrogates.json"
    path.write_text(json.dumps({"data": [{"title": "T\ud800", "paragraphs": [{"context": context, "qas": qas}]}]}))
    assert "\\ud800" in path.read_text()  # escaped in the file, as json.dumps writes it
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        examples = list(iter_qa_examples(SourceConfig(name="odd", local=str(path), format="squad"), None))
    first, second = examples
    assert (
        first.context == second.context == "Caf\ufffd Paris is the capital of France."
        and first.question == qas[0]["question"]
    )
    assert (second.id, second.question, second.answers, second.title) == (
        "odd\ufffd",
        "Capital \ufffd?",
        ["Paris\ufffd"],
        "T\ufffd",
    )
    assert "2 example(s) had lone surrogate escapes" in caplog.text and "ok, odd\ufffd" in caplog.text
    kept, _ = clean_examples(examples, "test")  # the second's answer is no longer in the passage
    tokenizer = train_tokenizer([context.replace("\ud800", "e")] * 20, 300, 10_000, 1)
    assert len(encode_examples(tokenizer, kept, "context", 128, 24, "train")) == 1


def test_training_encoding_counts_questions_longer_than_the_block(tiny_run, tmp_path, caplog):
    tok = Tokenizer.load(tiny_run / "tokenizer.json")
    examples = list(
        iter_qa_examples(SourceConfig(name="bad", local=str(bad_squad(tmp_path / "b.json")), format="squad"), None)
    )
    kept, _ = clean_examples(examples, "test")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        items = encode_examples(tok, kept, "context", 128, 24, "train")
    assert len(items) == 3
    assert all(len(it.ids) <= 129 for it in items)
    assert "1 question longer than the block" in caplog.text


def test_sliding_windows_cover_the_whole_context(tiny_run):
    tok = Tokenizer.load(tiny_run / "tokenizer.json")
    context = " ".join(f"Sentence number {i} mentions the word w{i}." for i in range(60))
    block, max_new = 128, 16
    windows = context_windows(tok, "Which word?", context, block, max_new)
    ctx_ids = tok.encode(context)
    assert len(windows) > 2 and all(w.context_truncated for w in windows)
    q_len = len(tok.encode("Which word?")) + 2
    covered = set()
    for w in windows:
        assert len(w.ids) <= block - max_new
        assert w.ids[0] == tok.context_id and w.ids[-1] == tok.answer_id
        body = w.ids[1:-q_len]
        start = next(s for s in range(len(ctx_ids)) if ctx_ids[s : s + len(body)] == body)
        covered.update(range(start, start + len(body)))
    assert covered == set(range(len(ctx_ids)))
    # a short context gives exactly one, untruncated prompt; a question that cannot fit gives None
    (single,) = context_windows(tok, "Which word?", "Short.", block, max_new)
    assert not single.context_truncated
    assert context_windows(tok, LONG_QUESTION, context, block, max_new) is None


@pytest.mark.slow
def test_finetune_and_eval_survive_bad_qa_files(copy_run, tmp_path):
    from lmforge.config import load_recipe
    from lmforge.pipeline import eval_stage, finetune_stage
    from lmforge.rundir import RunDir

    run = RunDir(copy_run())
    path = bad_squad(tmp_path / "bad.json")
    recipe = load_recipe(
        run.config,
        {
            "qa.train.local": str(path),
            "qa.dev.local": str(path),
            "qa.max_dev_examples": "0",
            "eval.squad_questions": "0",
            "finetune.eval_interval": "1",
        },
    )
    result = finetune_stage(recipe, run)
    assert result.steps >= 1
    report = eval_stage(recipe, run, checkpoint="best")
    squad = report["squad"]
    assert squad["n"] == 4  # the usable dev examples, the too-long question included (scored 0)
    assert squad["skipped"] == 1
    # the malformed entries (no question, no answers, answers not a list, not a dict, no context) are counted too
    assert squad["invalid_skipped"] == {
        "malformed entry (no context, question or answers)": 5,
        "empty answer": 1,
        "answer text not in the context": 1,
    }
    assert "5 malformed entry (no context, question or answers)" in (run.eval / "report.md").read_text()


def test_eval_without_a_usable_dev_question_stops_and_keeps_the_report(copy_run, data_dir, tmp_path):
    from lmforge.config import load_recipe
    from lmforge.errors import LmforgeError
    from lmforge.pipeline import eval_stage
    from lmforge.rundir import RunDir

    run = RunDir(copy_run())
    unusable = [
        {"id": "empty-answer", "question": "What?", "answers": [{"text": " ", "answer_start": 0}]},
        {"id": "not-in-context", "question": "Where?", "answers": [{"text": "Italy", "answer_start": 3}]},
    ]
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": unusable}]}]}))
    before = (run.eval / "report.json").read_bytes()
    recipe = load_recipe(run.config, {"qa.dev.local": str(dev)})
    with pytest.raises(LmforgeError, match=r"no usable dev question .*1 empty answer, 1 answer text not in the"):
        eval_stage(recipe, run, data_dir)
    assert (run.eval / "report.json").read_bytes() == before


def test_training_window_keeps_the_answer_even_without_a_usable_offset(tiny_run):
    from lmforge.data.qa import answer_position, encode_for_training
    from lmforge.data.sources import QAExample

    tok = Tokenizer.load(tiny_run / "tokenizer.json")
    context = " ".join(f"Filler sentence {i} about nothing." for i in range(80)) + " The treasure is in Oslo."
    for start in (-1, 3):  # missing, and pointing at the wrong place
        ex = QAExample("x", "Where is the treasure?", context, ["Oslo"], [start])
        assert answer_position(ex) == context.index("Oslo")
        item = encode_for_training(tok, ex, "context", 128, 24)
        assert item.context_truncated and len(item.ids) <= 129
        assert "treasure is in Oslo" in tok.decode(item.ids[: item.prompt_len])


def test_gold_answers_outside_the_context_are_kept_for_scoring_after_those_inside():
    from lmforge.data.sources import QAExample
    from lmforge.evaluate import squad_scores

    ex = QAExample("q", "Which river?", "Paris lies on the Seine.", ["river Seine", "Seine", ""], [-1, 18, 0])
    kept, dropped = clean_examples([ex], "test")
    assert not dropped
    # training reads the first answer, which is in the passage; the empty one is dropped
    assert kept[0].answers == ["Seine", "river Seine"] and kept[0].answer_starts == [18, -1]
    # scoring takes the best over every gold answer, as the official script does
    assert squad_scores({"q": "river Seine"}, kept)["em"] == 100.0
