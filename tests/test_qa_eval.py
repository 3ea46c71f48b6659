"""SQuAD evaluation: scored batched decoding, long contexts (truncate / sliding window), report, --compare."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from lmforge.config import SourceConfig
from lmforge.data.qa import context_windows
from lmforge.data.sources import iter_qa_examples
from lmforge.errors import ConfigError

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"


def tiny_recipe(**overrides: str):
    from lmforge.config import load_recipe

    return load_recipe(TINY, overrides)


def _dev(data_dir, n):
    src = SourceConfig(name="dev", local="squad/dev-v1.1.json", format="squad")
    examples = []
    for ex in iter_qa_examples(src, data_dir):
        examples.append(ex)
        if len(examples) == n:
            return examples
    return examples


def test_greedy_batch_scores_are_mean_token_logprobs(tiny_run):
    import lmforge
    from lmforge.generate import greedy_batch_scored

    model, tok = lmforge.load(tiny_run)
    prompts = [tok.encode("Once upon a time"), tok.encode("The capital of France is a city called")]
    outs, scores = greedy_batch_scored(model, prompts, 6, tok.eot_id, tok.pad_id)
    for prompt, out, score in zip(prompts, outs, scores, strict=True):
        scored = out + ([tok.eot_id] if len(out) < 6 else [])  # the stop token counts when produced
        with torch.no_grad():
            logp = model(torch.tensor([prompt + scored])).log_softmax(-1)[0]
        targets = torch.tensor(scored)
        expected = logp[len(prompt) - 1 : len(prompt) - 1 + len(scored)].gather(-1, targets[:, None]).mean()
        assert score == pytest.approx(float(expected), abs=1e-4)


def test_sliding_window_picks_the_best_scored_window(tiny_run, data_dir, monkeypatch):
    import lmforge
    import lmforge.evaluate as ev

    model, tok = lmforge.load(tiny_run)
    examples = [ex for ex in _dev(data_dir, 40) if len(tok.encode(ex.context)) > 120][:3]
    assert examples

    def fake(model, prompts, max_new_tokens, stop_id, pad_id):
        # "answer" = each window's first context token; score = that token's id
        return [[p[1]] for p in prompts], [float(p[1]) for p in prompts]

    monkeypatch.setattr(ev, "greedy_batch_scored", fake)
    preds, skipped, windowed = ev.predict_answers(model, tok, examples, "context", 16, 4, "sliding_window")
    assert skipped == 0 and windowed == len(examples)
    for ex in examples:
        windows = context_windows(tok, ex.question, ex.context, model.cfg.block_size, 16)
        assert len(windows) > 1
        assert preds[ex.id] == tok.decode([max(w.ids[1] for w in windows)]).strip()


def test_squad_eval_long_context_modes(tiny_run, data_dir):
    import lmforge
    from lmforge.evaluate import squad_eval

    model, tok = lmforge.load(tiny_run)
    examples = _dev(data_dir, 12)
    trunc = squad_eval(model, tok, examples, "context", 8, 8, 5)
    slide = squad_eval(model, tok, examples, "context", 8, 8, 5, long_context="sliding_window")
    closed = squad_eval(model, tok, examples, "closed_book", 8, 8, 5)
    best = squad_eval(model, tok, examples, "context", 8, 8, 5, long_context="best_match", context_tokens=48)
    assert trunc["n"] == slide["n"] == closed["n"] == best["n"] == 12
    assert best["contexts_truncated"] == 12 and best["context_tokens"] == 48  # every dev context is over 48 tokens
    assert "most words with the question" in best["context_truncation"]
    assert trunc["contexts_truncated"] > 0 and trunc["contexts_windowed"] == 0
    assert slide["contexts_windowed"] == trunc["contexts_truncated"] and slide["contexts_truncated"] == 0
    assert "windows" in slide["context_truncation"] and slide["long_context"] == "sliding_window"
    assert closed["long_context"].startswith("n/a") and closed["contexts_truncated"] == 0
    assert len(trunc["examples"]) == 5 and {"question", "answers", "prediction", "f1", "em"} <= set(
        trunc["examples"][0]
    )


def test_report_fields(tiny_run):
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    squad = report["squad"]
    for key in (
        "em",
        "f1",
        "n",
        "mode",
        "decoding",
        "examples",
        "questions_per_s",
        "long_context",
        "context_truncation",
        "skipped",
        "invalid_skipped",
        "subset",
    ):
        assert key in squad, key
    assert squad["decoding"]["strategy"] == "greedy" and squad["decoding"]["kv_cache"] is True
    assert len(squad["examples"]) == 20 and squad["subset"] == "spread"
    for key in ("checkpoint", "bpb", "perplexity", "val_loss", "dtype"):
        assert key in report
    assert squad["em_ci95"][0] <= squad["em"] <= squad["em_ci95"][1]
    assert squad["f1_ci95"][0] <= squad["f1"] <= squad["f1_ci95"][1]
    md = (tiny_run / "eval" / "report.md").read_text()
    assert "Contexts longer than the room for them" in md and "bits per byte" in md
    assert f"| SQuAD F1 | {squad['f1']:.2f} (95% interval {squad['f1_ci95'][0]:.2f}-" in md
    assert "evenly spaced through the dev file" in md


def test_predictions_file_holds_every_scored_answer_and_gives_the_report_scores(tiny_run, data_dir):
    """RUN/eval/predictions.json ({question id: answer}, the official script's format) holds an answer for
    each scored question, and scoring it again gives the report's EM and F1."""
    from lmforge.config import load_recipe
    from lmforge.evaluate import squad_scores
    from lmforge.pipeline import load_qa_splits

    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    predictions = json.loads((tiny_run / "eval" / "predictions.json").read_text())
    assert "predictions" not in report["squad"]  # kept out of the report itself
    scored = load_qa_splits(load_recipe(tiny_run / "config.toml"), data_dir).eval
    assert set(predictions) == {ex.id for ex in scored} and len(predictions) == report["squad"]["n"]
    again = squad_scores(predictions, scored)
    assert again["em"] == pytest.approx(report["squad"]["em"]) and again["f1"] == pytest.approx(report["squad"]["f1"])
    per_question = report["squad"]["question_scores"]
    assert set(per_question) == set(predictions)
    assert 100 * sum(f1 for _, f1 in per_question.values()) / len(per_question) == pytest.approx(again["f1"], abs=1e-3)
    assert 100 * sum(em for em, _ in per_question.values()) / len(per_question) == pytest.approx(again["em"])
    examples = {ex["id"]: ex["prediction"] for ex in report["squad"]["examples"]}
    assert all(predictions[qid] == answer for qid, answer in examples.items())


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_questions():
    import numpy as np

    from lmforge.evaluate import bootstrap_ci

    rng = np.random.default_rng(1)
    small, large = rng.random(100), rng.random(2500)
    lo, hi = bootstrap_ci(small)
    assert lo < 100 * small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert lo2 < 100 * large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 3  # width ~ 1/sqrt(n): 25x the questions, 1/5
    assert bootstrap_ci(small) == [lo, hi]  # seeded: the same report twice gives the same interval
    assert bootstrap_ci(np.array([])) == [0.0, 0.0]


def test_eval_compare_prints_one_table(tiny_run, tmp_path, capsys):
    from lmforge.cli import main

    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    other = tmp_path / "other"
    (other / "eval").mkdir(parents=True)
    (other / "eval" / "report.json").write_text(
        json.dumps({**report, "run": "other-run", "squad": {**report["squad"], "f1": 12.345}})
    )
    assert main(["eval", "--compare", str(tiny_run), str(other)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 4 and table[0].startswith("| run |")
    lo, hi = report["squad"]["f1_ci95"]
    assert f"| {report['squad']['f1']:.2f} ({lo:.2f}-{hi:.2f}) |" in table[2] and "other-run" in table[3]
    assert f"| 12.35 ({lo:.2f}-{hi:.2f}) |" in table[3]
    assert f"| {report['squad']['n']} (spread) |" in table[2]
    assert "| F1 vs first run (95% paired) |" in table[0]
    n = report["squad"]["n"]
    assert f"| +0.00 (+0.00 to +0.00; {n} questions) |" in table[3]  # the same per-question scores
    assert main(["eval", "--compare", str(tiny_run), str(tmp_path / "missing")]) == 2
    assert "no evaluation report" in capsys.readouterr().err


def test_eval_compare_refuses_files_that_are_not_reports(tiny_run, tmp_path, capsys):
    from lmforge.cli import main

    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    for path in (tiny_run / "eval" / "predictions.json", listed):  # predictions.json sits beside report.json
        assert main(["eval", "--compare", str(tiny_run), str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: not an lmforge evaluation report" in err and len(err.splitlines()) == 1


def test_report_keeps_each_questions_scores_and_compare_pairs_them():
    """report.json keeps every scored question's EM and F1, which give the report's averages; --compare pairs
    two reports on the questions both scored: the mean F1 change and a bootstrap interval over those questions."""
    import numpy as np

    from lmforge.evaluate import bootstrap_ci, compare_table, paired_f1_change

    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(400)]
    base_f1 = rng.random(400)
    better_f1 = np.clip(base_f1 + rng.normal(0.05, 0.1, 400), 0, 1)

    def report(name, f1s, keep=slice(None)):
        scores = {qid: [float(f == 1), float(f)] for qid, f in list(zip(ids, f1s, strict=True))[keep]}
        return {
            "run": name,
            "squad": {"f1": 100 * float(np.mean([v[1] for v in scores.values()])), "question_scores": scores},
        }

    base, better = report("base", base_f1), report("better", better_f1)
    change = better_f1 - base_f1
    low, high = bootstrap_ci(change)
    assert 0 < low < 100 * change.mean() < high
    base_low, base_high = bootstrap_ci(base_f1)
    assert high - low < (base_high - base_low) / 2  # pairing removes the spread the two runs share
    assert paired_f1_change(better, base) == f"{100 * change.mean():+.2f} ({low:+.2f} to {high:+.2f}; 400 questions)"
    # only the questions both scored are paired
    part = report("part", better_f1, slice(100, 300))
    low, high = bootstrap_ci(change[100:300])
    assert (
        paired_f1_change(part, base)
        == f"{100 * change[100:300].mean():+.2f} ({low:+.2f} to {high:+.2f}; 200 questions)"
    )
    assert paired_f1_change({"run": "old report"}, base) == "-"
    rows = compare_table([base, better]).splitlines()
    assert "| - |" in rows[2] and f"{100 * change.mean():+.2f} (" in rows[3]


def test_eval_dtype_is_applied_and_recorded(tiny_run, data_dir, tmp_path, capsys):
    """`lmforge eval` runs in fp32 by default and under bf16 autocast with eval.dtype = bfloat16 (auto picks it on
    bf16 hardware); the report says which, and --compare shows it."""
    import shutil

    from lmforge.cli import main

    runs = {}
    for name, flags in (("fp32", []), ("bf16", ["--eval.dtype", "bfloat16"])):
        run = tmp_path / name
        shutil.copytree(tiny_run, run)
        assert (
            main(
                [
                    "eval",
                    "--run-dir",
                    str(run),
                    "--data-dir",
                    str(data_dir),
                    "--eval.squad_questions",
                    "12",
                    "--eval.val_batches",
                    "4",
                    *flags,
                ]
            )
            == 0
        )
        runs[name] = json.loads((run / "eval" / "report.json").read_text())
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32["dtype"] == "float32" and bf16["dtype"] == "bfloat16"
    assert bf16["val_loss"] != fp32["val_loss"] and abs(bf16["val_loss"] - fp32["val_loss"]) < 0.05
    assert bf16["squad"]["n"] == fp32["squad"]["n"] == 12
    assert "| precision | bfloat16 autocast" in (tmp_path / "bf16" / "eval" / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "fp32"), str(tmp_path / "bf16")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].endswith("| dtype |") and rows[2].endswith("| float32 |") and rows[3].endswith("| bfloat16 |")


def test_long_context_is_validated():
    assert tiny_recipe(**{"eval.long_context": "sliding_window"}).eval.long_context == "sliding_window"
    with pytest.raises(ConfigError, match="eval.long_context"):
        tiny_recipe(**{"eval.long_context": "middle"})


@pytest.mark.slow
def test_eval_cli_sliding_window(copy_run, data_dir):
    from lmforge.cli import main

    run = copy_run()
    assert (
        main(
            [
                "eval",
                "--run-dir",
                str(run),
                "--data-dir",
                str(data_dir),
                "--eval.squad_questions=16",
                "--eval.long_context=sliding_window",
            ]
        )
        == 0
    )
    squad = json.loads((run / "eval" / "report.json").read_text())["squad"]
    assert squad["n"] == 16 and squad["long_context"] == "sliding_window"


def test_validation_examples_never_overlap_the_scored_questions(data_dir):
    from lmforge.pipeline import load_qa_splits

    for n_eval, subset in (("64", "spread"), ("64", "first"), ("0", "spread")):  # 0 = score every dev question
        recipe = tiny_recipe(
            **{"eval.squad_questions": n_eval, "eval.squad_subset": subset, "qa.max_train_examples": "500"}
        )
        splits = load_qa_splits(recipe, data_dir)
        scored = {ex.id for ex in splits.eval}
        assert len(scored) == (64 if n_eval == "64" else 10570)
        assert len(splits.val) > 1 and not scored & {ex.id for ex in splits.val}
        assert not {ex.id for ex in splits.train} & {ex.id for ex in splits.val}


def test_eval_scoring_more_questions_than_the_run_counts_its_validation_examples(copy_run, data_dir, tmp_path):
    """Fine-tuning selected on the end of the dev file; an eval of every question reaches into it and says so."""
    from lmforge.config import load_recipe, save_recipe
    from lmforge.pipeline import eval_stage
    from lmforge.rundir import RunDir

    squad = json.loads((data_dir / "squad" / "dev-v1.1.json").read_text())
    small = tmp_path / "dev-small.json"
    small.write_text(json.dumps({"data": [{**squad["data"][0], "paragraphs": squad["data"][0]["paragraphs"][:2]}]}))
    run = RunDir(copy_run())
    trained = load_recipe(
        run.config, {"qa.dev.local": str(small), "qa.max_dev_examples": "4", "eval.squad_questions": "6"}
    )
    save_recipe(trained, run.config)  # as if fine-tuned with these: its validation loss used the last 4
    assert eval_stage(trained, run, data_dir)["squad"]["validation_questions_scored"] == 0
    report = eval_stage(load_recipe(run.config, {"eval.squad_questions": "0"}), run, data_dir)
    assert report["squad"]["validation_questions_scored"] == 4
    assert "4 of the scored questions are validation examples" in (run.eval / "report.md").read_text()


def test_spread_subset_samples_every_article_and_first_takes_the_start(data_dir):
    """SQuAD dev is grouped by article (its first 810 questions are all about Super Bowl 50): the default
    subset is spread through the file, in file order; "first" keeps the old behaviour."""
    from lmforge.pipeline import load_qa_splits

    recipe = tiny_recipe(**{"eval.squad_questions": "100", "qa.max_train_examples": "50"})
    assert recipe.eval.squad_subset == "spread"
    dev = list(iter_qa_examples(recipe.qa.dev, data_dir))
    position = {ex.id: i for i, ex in enumerate(dev)}
    spread = [position[ex.id] for ex in load_qa_splits(recipe, data_dir).eval]
    assert len(set(spread)) == 100 and spread == sorted(spread)
    assert spread[0] == 0 and spread[-1] > 9000  # reaches the last articles (the val examples come after)
    assert max(b - a for a, b in itertools.pairwise(spread)) <= len(dev) // 100 + 1
    first = load_qa_splits(
        tiny_recipe(**{"eval.squad_questions": "100", "eval.squad_subset": "first", "qa.max_train_examples": "50"}),
        data_dir,
    ).eval
    assert [position[ex.id] for ex in first] == list(range(100))
    with pytest.raises(ConfigError, match="eval.squad_subset"):
        tiny_recipe(**{"eval.squad_subset": "random"})
    with pytest.raises(ConfigError, match="eval.dtype"):
        tiny_recipe(**{"eval.dtype": "fp16"})


# --------------------------------------------------------------------------- extractive (span) decoding


def test_best_span_is_the_brute_force_best(tiny_run):
    """Scoring every span at once on copies of the prompt's KV cache gives what one full forward per span gives."""
    import lmforge
    from lmforge.generate import best_span

    model, tok = lmforge.load(tiny_run)
    prompt = tok.encode("Once upon a time there was a little dog named Max.") + [tok.question_id]
    passage = tok.encode(" The little dog ran to the big red barn and hid.")
    starts, ends, width = [0, 2, 3, 5, 9], [1, 3, 4, 6, 7, len(passage)], 4

    def mean_logprob(span: list[int], before: list[int] = prompt) -> float:
        seq = before + span + [tok.eot_id]
        with torch.no_grad():
            logp = model(torch.tensor([seq])).log_softmax(-1)[0]
        targets = torch.tensor(span + [tok.eot_id])
        return float(logp[len(before) - 1 : len(seq) - 1].gather(-1, targets[:, None]).mean())

    scored = {(s, e): mean_logprob(passage[s:e]) for s in starts for e in ends if 0 < e - s <= width}
    (s, e), expected = max(scored.items(), key=lambda item: item[1])
    for max_rows in (256, 2):  # one batch, and starts split over several batches
        span, score = best_span(model, prompt, passage, starts, ends, width, tok.eot_id, max_rows=max_rows)
        assert span == passage[s:e]
        assert score == pytest.approx(expected, abs=1e-4)
    # calibrated: minus w x the span's score after another prompt (the question left out)
    baseline = tok.encode("Once upon a time") + [tok.question_id]
    calibrated = {k: v - 0.7 * mean_logprob(passage[k[0] : k[1]], baseline) for k, v in scored.items()}
    (s, e), expected = max(calibrated.items(), key=lambda item: item[1])
    for max_rows in (256, 2):
        span, score = best_span(
            model,
            prompt,
            passage,
            starts,
            ends,
            width,
            tok.eot_id,
            max_rows=max_rows,
            baseline=baseline,
            baseline_weight=0.7,
        )
        assert span == passage[s:e]
        assert score == pytest.approx(expected, abs=1e-4)
    # spans end only where allowed: with a single end, every answer stops there
    span, _ = best_span(model, prompt, passage, starts, [7], width, tok.eot_id)
    assert span in [passage[s:7] for s in starts if 0 < 7 - s <= width]
    assert best_span(model, prompt, passage, [], ends, width, tok.eot_id) == ([], float("-inf"))


def test_spans_made_of_question_words_are_passed_over(tiny_run):
    """best_span's `accept` rules candidates out, best first; span_answer's skip_question_words uses it for
    spans whose words (SQuAD-normalized: articles and punctuation dropped) all appear in the question."""
    import lmforge
    from lmforge.data.qa import build_prompt, prompt_passage, word_bounds
    from lmforge.evaluate import SpanOptions, normalize_answer, span_answer
    from lmforge.generate import best_span

    model, tok = lmforge.load(tiny_run)
    question = "Where did the little dog run?"
    prompt, _ = build_prompt(tok, question, "The little dog ran to the big red barn and hid.", 100)
    passage = prompt_passage(tok, prompt)
    starts, ends = word_bounds(tok, passage)
    plain, _ = best_span(model, prompt, passage, starts, ends, 6, tok.eot_id)
    refused = []
    chosen, _ = best_span(
        model,
        prompt,
        passage,
        starts,
        ends,
        6,
        tok.eot_id,
        max_rows=2,
        accept=lambda span: refused.append(span) or span != plain,
    )
    assert chosen and chosen != plain and refused[0] == plain  # the best was asked first, then the next best
    asked = set(normalize_answer(question).split())
    answer = tok.decode(span_answer(model, tok, prompt, 6, SpanOptions(skip_question_words=True))[0])
    assert answer.strip() and not set(normalize_answer(answer).split()) <= asked
    with_words = [tok.decode(passage[s:e]) for s in starts for e in ends if 0 < e - s <= 6]
    assert any(set(normalize_answer(t).split()) <= asked for t in with_words)  # there were such spans to skip


def test_span_max_starts_scores_only_the_likeliest_first_words(tiny_run):
    """With max_starts k, only spans from the k starts whose first token the prompt makes likeliest (minus w x
    its likelihood without the question, as spans are calibrated) compete; when `accept` refuses all of them,
    every start competes again."""
    import lmforge
    from lmforge.generate import best_span

    model, tok = lmforge.load(tiny_run)
    prompt = tok.encode("Once upon a time there was a little dog named Max.") + [tok.question_id]
    baseline = tok.encode("Once upon a time") + [tok.question_id]
    passage = tok.encode(" The little dog ran to the big red barn and hid.")
    starts, ends, width = [0, 1, 2, 3, 5, 7, 9], [1, 2, 3, 4, 6, 7, 8, len(passage)], 3

    def first_token_logprobs(before: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([before]))[0, -1].log_softmax(-1)

    first = first_token_logprobs(prompt) - 0.5 * first_token_logprobs(baseline)
    ranked = sorted(starts, key=lambda s: float(first[passage[s]]), reverse=True)
    for keep in (1, 3):
        likeliest = sorted(ranked[:keep])
        span, score = best_span(
            model,
            prompt,
            passage,
            starts,
            ends,
            width,
            tok.eot_id,
            baseline=baseline,
            baseline_weight=0.5,
            max_starts=keep,
        )
        assert (span, score) == best_span(
            model, prompt, passage, likeliest, ends, width, tok.eot_id, baseline=baseline, baseline_weight=0.5
        )
        assert any(span == passage[s : s + len(span)] for s in likeliest)
    everything = best_span(model, prompt, passage, starts, ends, width, tok.eot_id)
    assert best_span(model, prompt, passage, starts, ends, width, tok.eot_id, max_starts=len(starts)) == everything
    # every span from the likeliest start refused: the others compete
    top = passage[ranked[0]]
    refusing = best_span(
        model,
        prompt,
        passage,
        starts,
        ends,
        width,
        tok.eot_id,
        baseline=baseline,
        baseline_weight=0.5,
        max_starts=1,
        accept=lambda span: span[0] != top,
    )
    assert refusing[0] and refusing[0][0] != top


def test_best_spans_of_a_batch_match_one_question_at_a_time(tiny_run):
    """Questions decoded together (left-padded prompts of different lengths, span rows of several questions in one
    batch) get the spans and scores each gets alone, with calibration, question-word skipping and max_starts."""
    import lmforge
    from lmforge.data.qa import build_prompt
    from lmforge.evaluate import SpanOptions, span_query
    from lmforge.generate import best_spans

    model, tok = lmforge.load(tiny_run)
    cases = [
        ("Where did the little dog run?", "The little dog ran to the big red barn and hid."),
        ("Who was named Max?", "Once upon a time there was a little dog named Max. He liked to play."),
        ("What did the girl find?", "Lily found a shiny stone in the garden. She showed it to her mom, who smiled."),
        ("When did it rain?", "It rained all day."),
    ]
    prompts = [build_prompt(tok, q, c, 100)[0] for q, c in cases]
    assert len({len(p) for p in prompts}) == len(prompts)  # every prompt padded differently
    for options in (SpanOptions(), SpanOptions(0.5, True), SpanOptions(0.5, True, 2), SpanOptions(0.0, False, 1)):
        queries = [span_query(tok, p, options) for p in prompts]
        alone = [best_spans(model, [q], 6, tok.eot_id, options.calibration, options.max_starts)[0] for q in queries]
        for max_rows in (256, 3):  # one batch of span rows, and rows of different questions mixed in small batches
            together = best_spans(model, queries, 6, tok.eot_id, options.calibration, options.max_starts, max_rows)
            for (span, score), (span1, score1) in zip(together, alone, strict=True):
                assert span == span1 and span
                assert score == pytest.approx(score1, abs=1e-4)
    assert best_spans(model, [], 6, tok.eot_id) == []


def test_word_bounds_and_prompt_passage(tiny_run):
    import lmforge
    from lmforge.data.qa import build_prompt, prompt_passage, word_bounds

    _, tok = lmforge.load(tiny_run)
    text = "The dog (born 1998) barked.\n\nThen it slept."
    ids = tok.encode(text)
    starts, ends = word_bounds(tok, ids)
    words = [tok.decode(ids[s : min(e for e in ends if e > s)]).strip() for s in starts]  # shortest spans
    assert words == ["dog", "born", "1998", "barked", "Then", "it", "slept"]  # no article or punctuation starts
    assert ends[-1] == len(ids) and 0 not in ends
    assert all(tok.decode(ids[s:e]).strip() in text for s in starts for e in ends if e > s)
    prompt, _ = build_prompt(tok, "Who barked?", "The dog barked.", 100)
    assert tok.decode(prompt_passage(tok, prompt)) == "The dog barked."
    assert prompt_passage(tok, build_prompt(tok, "Who barked?", None, 100)[0]) == []


def test_span_decoding_answers_are_passage_spans(tiny_run, data_dir):
    import lmforge
    from lmforge.evaluate import squad_eval
    from lmforge.pipeline import answer_question

    model, tok = lmforge.load(tiny_run)
    examples = _dev(data_dir, 8)
    report = squad_eval(
        model, tok, examples, "context", 8, 8, 8, long_context="best_match", context_tokens=48, decoding="span"
    )
    assert report["n"] == 8 and report["decoding"]["strategy"] == "span"
    assert "span" in report["decoding"]["description"]
    for ex, row in zip(examples, report["examples"], strict=True):
        assert row["prediction"] and row["prediction"] in ex.context
    context = "Paris is the capital and most populous city of France."
    answer = answer_question(model, tok, "What is the capital of France?", context, 8, decoding="span")
    assert answer and answer in context


def test_single_answers_are_computed_in_eval_dtype(tiny_run):
    """`lmforge generate --question`, the run's sample answer and the server's span answers compute in
    eval.dtype, as `lmforge eval` scored: under bf16 autocast every forward pass is autocast, in float32 none."""
    import lmforge
    from lmforge.pipeline import answer_question
    from lmforge.serve.host import AnswerSettings, ModelHost

    model, tok = lmforge.load(tiny_run)
    autocast_on: list[bool] = []
    model.register_forward_hook(lambda *_: autocast_on.append(torch.is_autocast_enabled("cpu")))
    question, context = "What is the capital of France?", "Paris is the capital and most populous city of France."
    for decoding in ("span", "greedy"):
        for dtype, expected in (("bfloat16", True), ("float32", False)):
            autocast_on.clear()
            assert answer_question(model, tok, question, context, 8, decoding=decoding, dtype=dtype) is not None
            assert autocast_on and set(autocast_on) == {expected}, (decoding, dtype)
    host = ModelHost(tiny_run)
    hosted = host.model()
    hosted.register_forward_hook(lambda *_: autocast_on.append(torch.is_autocast_enabled("cpu")))
    for dtype, expected in (("bfloat16", True), ("float32", False)):
        settings = AnswerSettings("span", 8, 0, dtype=dtype)
        autocast_on.clear()
        text, n = host.span_answer(host.active, host.span_prompt(hosted, question, context, settings), settings)
        assert text in context and n > 0
        assert autocast_on and set(autocast_on) == {expected}, dtype


def _answer_settings_spy(monkeypatch) -> list[dict]:
    """Records the arguments of every `answer_question` call (it still answers)."""
    import inspect

    from lmforge import pipeline

    calls: list[dict] = []
    real = pipeline.answer_question

    def spy(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "answer_question", spy)
    return calls


def test_closed_book_single_answers_leave_the_context_out(copy_run, monkeypatch, capsys):
    """A closed-book model is asked in the prompt format it was fine-tuned on, as eval asks it."""
    from lmforge.cli import main
    from lmforge.config import load_recipe, save_recipe
    from lmforge.pipeline import sample_answer
    from lmforge.rundir import RunDir

    run = RunDir(copy_run())
    recipe = load_recipe(run.config, {"qa.mode": "closed_book", "sample_context": "Paris is in France."})
    save_recipe(recipe, run.config)
    calls = _answer_settings_spy(monkeypatch)
    assert main(["generate", "--run-dir", str(run.root), "--question", "Where is Paris?", "--context", "France"]) == 0
    assert sample_answer(recipe, run)["context"] is None
    assert [c.get("context") for c in calls] == [None, None]
    assert "closed-book run (qa.mode = 'closed_book'): the context is left out" in capsys.readouterr().err


def test_generate_question_with_max_new_tokens_filling_the_block_names_it(tiny_run, capsys):
    from lmforge.cli import main

    assert main(["generate", "--run-dir", str(tiny_run), "--question", "Who?", "--max-new-tokens", "200"]) == 2
    assert "max new tokens 200 leave no room for the question in the model's 128-token block" in capsys.readouterr().err


def test_single_answers_use_the_eval_settings_of_the_run(tiny_run, monkeypatch, capsys):
    """`generate --question` and the run's sample answer answer as `lmforge eval` does: eval.max_new_tokens
    (16 in the tiny recipe) unless --max-new-tokens is given, the passage window and decoding of the recipe."""
    from lmforge.cli import main
    from lmforge.pipeline import sample_answer
    from lmforge.rundir import RunDir

    calls = _answer_settings_spy(monkeypatch)
    recipe = tiny_recipe()
    question, context = "What is the capital of France?", "Paris is the capital and most populous city of France."
    assert main(["generate", "--run-dir", str(tiny_run), "--question", question, "--context", context]) == 0
    assert main(["generate", "--run-dir", str(tiny_run), "--question", question, "--max-new-tokens", "5"]) == 0
    sample_answer(recipe, RunDir(tiny_run))
    assert [c["max_new_tokens"] for c in calls] == [recipe.eval.max_new_tokens, 5, recipe.eval.max_new_tokens]
    assert all(
        c["context_tokens"] == recipe.answer_context_tokens and c["decoding"] == recipe.eval.decoding for c in calls
    )
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.slow
def test_eval_cli_span_decoding_uses_the_answer_window(copy_run, data_dir):
    """`lmforge eval` passes eval.decoding and eval.context_tokens through; the window overrides qa.context_tokens."""
    from lmforge.cli import main
    from lmforge.data.sources import iter_qa_examples

    run = copy_run()
    config = (run / "config.toml").read_text()
    assert (
        main(
            [
                "eval",
                "--run-dir",
                str(run),
                "--data-dir",
                str(data_dir),
                "--eval.squad_questions=8",
                "--eval.decoding=span",
                "--eval.context_tokens=32",
                "--qa.context_tokens=96",
                "--eval.long_context=best_match",
                "--eval.span_calibration=0.5",
                "--eval.span_skip_question_words=true",
                "--eval.span_max_starts=3",
            ]
        )
        == 0
    )
    squad = json.loads((run / "eval" / "report.json").read_text())["squad"]
    assert squad["n"] == 8 and squad["decoding"]["strategy"] == "span" and squad["context_tokens"] == 32
    assert squad["decoding"]["span_calibration"] == 0.5 and squad["decoding"]["skip_question_words"] is True
    assert squad["decoding"]["span_max_starts"] == 3
    assert (run / "config.toml").read_text() == config  # the overrides were this evaluation's, not the run's
    contexts = {
        ex.id: ex.context
        for ex in iter_qa_examples(SourceConfig(name="dev", local="squad/dev-v1.1.json", format="squad"), data_dir)
    }
    assert all(row["prediction"] and row["prediction"] in contexts[row["id"]] for row in squad["examples"])


def test_every_eval_choice_is_described_in_reports():
    """The choices config accepts for eval.squad_subset/long_context/decoding are exactly those evaluate describes."""
    from lmforge import config, evaluate

    assert tuple(evaluate.SUBSETS) == config.SQUAD_SUBSETS
    assert tuple(evaluate.LONG_CONTEXT) == config.LONG_CONTEXTS
    assert tuple(evaluate.DECODING) == config.DECODINGS
    with pytest.raises(ConfigError, match="eval.long_context: must be 'truncate', 'best_match' or 'sliding_window'"):
        tiny_recipe(**{"eval.long_context": "all"})


def test_span_decoding_is_validated():
    assert tiny_recipe(**{"eval.decoding": "span"}).eval.decoding == "span"
    with pytest.raises(ConfigError, match="eval.decoding"):
        tiny_recipe(**{"eval.decoding": "beam"})
    with pytest.raises(ConfigError, match="needs qa.mode"):
        tiny_recipe(**{"eval.decoding": "span", "qa.mode": "closed_book"})
    assert tiny_recipe(**{"eval.span_calibration": "0.5"}).eval.span_calibration == 0.5
    with pytest.raises(ConfigError, match="eval.span_calibration"):
        tiny_recipe(**{"eval.span_calibration": "-0.5"})
    assert tiny_recipe(**{"eval.span_max_starts": "2"}).eval.span_max_starts == 2
    with pytest.raises(ConfigError, match="eval.span_max_starts"):
        tiny_recipe(**{"eval.span_max_starts": "-1"})
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens.*must be < model.block_size \(128\)"):
        tiny_recipe(**{"eval.max_new_tokens": "128"})
    recipe = tiny_recipe(**{"qa.context_tokens": "96"})
    assert recipe.answer_context_tokens == 96  # 0: as in fine-tuning
    assert tiny_recipe(**{"qa.context_tokens": "96", "eval.context_tokens": "32"}).answer_context_tokens == 32


def test_span_settings_bench_picks_questions_the_eval_never_scores(data_dir):
    """bench/span_settings.py chooses settings on dev questions outside the scored and the validation ones."""
    import importlib.util

    from lmforge.pipeline import load_qa_splits

    path = Path(__file__).resolve().parents[1] / "bench" / "span_settings.py"
    spec = importlib.util.spec_from_file_location("span_settings", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recipe = tiny_recipe(**{"eval.squad_questions": "300"})
    splits = load_qa_splits(recipe, data_dir)
    held = bench.held_out_questions(recipe, data_dir, 500)
    assert len(held) == 500 and len({ex.id for ex in held}) == 500
    assert not {ex.id for ex in held} & ({ex.id for ex in splits.eval} | {ex.id for ex in splits.val})
    options = bench.parse_variant("starts=2,skip=1", bench.SpanOptions(0.5))
    assert options == bench.SpanOptions(0.5, True, 2)


def test_answer_tokens_bench_splits_the_logged_dev_loss(tiny_run, data_dir):
    """bench/answer_tokens.py: the first answer token of each row is found, and first + later tokens
    together give back the dev loss the run logged for its best checkpoint."""
    import importlib.util

    from lmforge.train.metrics import read_metrics

    path = Path(__file__).resolve().parents[1] / "bench" / "answer_tokens.py"
    spec = importlib.util.spec_from_file_location("answer_tokens", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    targets = torch.tensor([[-100, -100, 5, 6, 7], [-100, 3, -100, -100, -100], [-100, -100, -100, -100, 9]])
    assert bench.first_answer_positions(targets).nonzero().tolist() == [[0, 2], [1, 1], [2, 4]]
    r = bench.split_loss(tiny_run, data_dir)
    best = min(
        m["loss"]
        for m in read_metrics(tiny_run / "metrics.jsonl")
        if m.get("stage") == "finetune" and m.get("split") == "val"
    )
    assert r["all"] == pytest.approx(best, rel=0.01)  # the run validated under bf16 autocast, the bench in fp32
    assert r["answers"] > 0 and 0 <= r["top1"] <= 100 and r["first"] > 0 and r["later"] > 0


def test_eval_reads_only_the_dev_file(copy_run, data_dir, tmp_path):
    """Scoring needs the dev questions, not the training set: a run evaluated where its train file is
    missing scores the same questions."""
    from lmforge.config import load_recipe
    from lmforge.pipeline import eval_stage, load_qa_splits
    from lmforge.rundir import RunDir

    run = RunDir(copy_run())
    recipe = load_recipe(
        run.config,
        {"eval.squad_questions": "8", "qa.train.local": str(tmp_path / "missing.json"), "qa.train.name": "missing"},
    )
    report = eval_stage(recipe, run, data_dir)
    expected = load_qa_splits(load_recipe(run.config, {"eval.squad_questions": "8"}), data_dir).eval
    assert list(report["squad"]["question_scores"]) == [ex.id for ex in expected]


def test_a_run_remembers_its_data_directory(copy_run, data_dir, monkeypatch, capsys):
    """The README's `run --resume --run-dir R` and `eval --run-dir R` work without repeating --data-dir: the
    run remembers the folder it was made from (and a new --data-dir replaces it)."""
    from lmforge.cli import main

    monkeypatch.delenv("LMFORGE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were the local copies not found, the Hub would be tried and fail
    run = copy_run()
    assert json.loads((run / "progress.json").read_text())["data_dir"] == str(data_dir.resolve())
    assert main(["eval", "--run-dir", str(run), "--eval.squad_questions=4"]) == 0, capsys.readouterr().err
    assert json.loads((run / "eval" / "report.json").read_text())["squad"]["n"] == 4
