"""Evaluation: loss, perplexity and bits-per-byte on held-out text; SQuAD v1.1 exact match and F1.

EM/F1 follow the official `evaluate-v1.1.py`: answers are normalised (lower case, punctuation and
the articles a/an/the removed, whitespace collapsed), each prediction is scored against every gold
answer and the maximum is kept, and scores are averaged over questions (x100).
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import EvalConfig
from lmforge.data.qa import (
    EncodedQA,
    context_windows,
    encode_for_inference,
    prompt_passage,
    without_question,
    word_bounds,
)
from lmforge.data.sources import QAExample
from lmforge.errors import LmforgeError
from lmforge.generate import SpanQuery, best_spans, greedy_batch_scored
from lmforge.model import GPT, lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import Batch

# --------------------------------------------------------------------------- SQuAD metrics (official v1.1)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_answers(metric, prediction: str, answers: list[str]) -> float:
    return max(metric(prediction, gold) for gold in answers)


def question_scores(predictions: dict[str, str], examples: list[QAExample]) -> tuple[np.ndarray, np.ndarray]:
    """Per question: EM and F1 (0-1) of its prediction; a question without one scores 0, as in the official
    script (even where a gold answer normalizes to nothing, which an empty prediction would match)."""

    def score(metric, ex: QAExample) -> float:
        return best_over_answers(metric, predictions[ex.id], ex.answers) if ex.id in predictions else 0.0

    em = [score(exact_match_score, ex) for ex in examples]
    f1 = [score(f1_score, ex) for ex in examples]
    return np.array(em, dtype=np.float64), np.array(f1, dtype=np.float64)


def averaged_scores(em: np.ndarray, f1: np.ndarray) -> dict[str, float]:
    """Micro-averaged EM and F1 (percent) of per-question scores."""
    n = len(em)
    return {"em": 100.0 * em.sum() / max(n, 1), "f1": 100.0 * f1.sum() / max(n, 1), "n": n}


def squad_scores(predictions: dict[str, str], examples: list[QAExample]) -> dict[str, float]:
    """Micro-averaged EM and F1 (percent) of predictions keyed by question id."""
    return averaged_scores(*question_scores(predictions, examples))


def bootstrap_ci(scores: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval (percent) of the mean of per-question scores: how far the score of
    another sample of as many questions could lie."""
    if len(scores) == 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    return [round(100.0 * float(q), 2) for q in np.percentile(means, [2.5, 97.5])]


# --------------------------------------------------------------------------- language-modelling metrics


@torch.no_grad()
def text_metrics(model: GPT, batches: list[Batch], byte_lengths: np.ndarray) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per UTF-8 byte over `batches`."""
    model.eval()
    device = model.tok_emb.weight.device
    lengths = torch.from_numpy(byte_lengths)
    nats, count, nbytes = 0.0, 0, 0
    for x, y in batches:
        logits = model(x.to(device))
        n = int((y != -100).sum())
        nats += float(lm_loss(logits, y.to(device))) * n
        count += n
        nbytes += int(lengths[y[y != -100]].sum())
    loss = nats / max(count, 1)
    return {
        "val_loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "bpb": nats / math.log(2) / max(nbytes, 1),
        "val_tokens": count,
        "val_bytes": nbytes,
    }


# --------------------------------------------------------------------------- SQuAD evaluation


@dataclass
class SquadPrediction:
    id: str
    question: str
    answers: list[str]
    prediction: str
    f1: float
    em: float


LONG_CONTEXT = {
    "truncate": "keep the beginning of the context (the answer position is unknown at evaluation), cut "
    "after a whole word",
    "best_match": "keep the window sharing the most words with the question (stride a quarter window), "
    "narrowed to whole words",
    "sliding_window": "overlapping windows over the whole context (stride: half a window; whole words); the "
    "answer with the highest mean token log-probability wins",
}


def question_prompts(
    tokenizer: Tokenizer,
    ex: QAExample,
    mode: str,
    block_size: int,
    max_new_tokens: int,
    long_context: str,
    context_tokens: int = 0,
) -> list[EncodedQA] | None:
    """The prompt(s) for one question: one, or one per context window; None when the question does not fit."""
    if mode == "context" and long_context == "sliding_window":
        return context_windows(tokenizer, ex.question, ex.context, block_size, max_new_tokens, context_tokens)
    enc = encode_for_inference(
        tokenizer,
        ex.question,
        ex.context if mode == "context" else None,
        block_size,
        max_new_tokens,
        context_tokens,
        long_context,
    )
    return None if enc is None else [enc]


SPAN_PADDING = "left (prompts batched; every span reads a copy of its prompt's KV cache)"
DECODING = {
    "greedy": "greedy generation",
    "span": "extractive: the passage span (whole words, not starting with an article or punctuation, at most "
    "max_new_tokens tokens) whose tokens and end-of-text get the highest mean log-probability",
}


def greedy_answers(
    model: GPT, tokenizer: Tokenizer, prompts: list[tuple[str, list[int]]], max_new_tokens: int, batch_size: int
) -> Iterator[tuple[str, list[int], float]]:
    """(question id, answer ids, mean token log-probability) per prompt, decoded greedily in batches."""
    prompts = sorted(prompts, key=lambda item: len(item[1]))  # similar lengths together: less padding
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        outputs, scores = greedy_batch_scored(
            model, [p for _, p in chunk], max_new_tokens, tokenizer.eot_id, tokenizer.pad_id
        )
        yield from ((qid, out, score) for (qid, _), out, score in zip(chunk, outputs, scores, strict=True))


@dataclass(frozen=True)
class SpanOptions:
    """How span decoding chooses among the passage's spans (the recipe's eval.span_* settings)."""

    calibration: float = 0.0  # minus this x the span's score without the question (0 = off)
    skip_question_words: bool = False  # a span made only of the question's words is no answer
    max_starts: int = 0  # only spans from the words likeliest to start the answer (0 = every word)

    @classmethod
    def of(cls, e: EvalConfig) -> SpanOptions:
        return cls(e.span_calibration, e.span_skip_question_words, e.span_max_starts)


def span_query(tokenizer: Tokenizer, prompt: list[int], options: SpanOptions = SpanOptions()) -> SpanQuery:
    """What span decoding needs of a with-context prompt: its passage, the word bounds spans keep to, the
    no-question prompt when calibrating, and with `options.skip_question_words` a test that passes over spans
    whose words (SQuAD-normalized) all appear in the question (read back from the prompt)."""
    passage = prompt_passage(tokenizer, prompt)
    baseline = without_question(tokenizer, prompt) if options.calibration else None
    accept = None
    if options.skip_question_words:
        at = prompt.index(tokenizer.question_id)
        asked = set(normalize_answer(tokenizer.decode(prompt[at + 1 : -1])).split())
        accept = lambda span: not set(normalize_answer(tokenizer.decode(span)).split()) <= asked  # noqa: E731
    return SpanQuery(prompt, passage, *word_bounds(tokenizer, passage), baseline, accept)


def span_answer(
    model: GPT, tokenizer: Tokenizer, prompt: list[int], max_tokens: int, options: SpanOptions = SpanOptions()
) -> tuple[list[int], float]:
    """The likeliest span of a with-context prompt's passage, and its score: the mean token log-probability,
    minus `options.calibration` x that of the same span without the question (see span_query, best_spans)."""
    return best_spans(
        model,
        [span_query(tokenizer, prompt, options)],
        max_tokens,
        tokenizer.eot_id,
        options.calibration,
        options.max_starts,
    )[0]


def span_answers(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[tuple[str, list[int]]],
    max_tokens: int,
    options: SpanOptions = SpanOptions(),
    batch_size: int = 1,
) -> Iterator[tuple[str, list[int], float]]:
    """(question id, answer ids, score) per prompt (see span_answer), `batch_size` prompts decoded together."""
    prompts = sorted(prompts, key=lambda item: len(item[1]))  # similar lengths together: less padding
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        found = best_spans(
            model,
            [span_query(tokenizer, ids, options) for _, ids in chunk],
            max_tokens,
            tokenizer.eot_id,
            options.calibration,
            options.max_starts,
        )
        yield from ((qid, span, score) for (qid, _), (span, score) in zip(chunk, found, strict=True))


def predict_answers(
    model: GPT,
    tokenizer: Tokenizer,
    examples: list[QAExample],
    mode: str,
    max_new_tokens: int,
    batch_size: int,
    long_context: str = "truncate",
    context_tokens: int = 0,
    decoding: str = "greedy",
    span: SpanOptions = SpanOptions(),
) -> tuple[dict[str, str], int, int]:
    """An answer for every example; returns (predictions by id, #skipped, #contexts too long).

    Prompts are built as in fine-tuning; `decoding` is a key of DECODING. Where a question has several
    prompts (sliding windows), the answer with the highest mean token log-probability wins. A question that
    does not fit the block is skipped: it gets no prediction, and so scores 0 in the average, as a missing
    prediction does in the official script.
    """
    predictions: dict[str, str] = {}
    best: dict[str, float] = {}
    prompts: list[tuple[str, list[int]]] = []
    skipped = too_long = 0
    for ex in examples:
        encs = question_prompts(tokenizer, ex, mode, model.cfg.block_size, max_new_tokens, long_context, context_tokens)
        if encs is None:
            skipped += 1
            continue
        predictions[ex.id] = ""
        too_long += encs[0].context_truncated
        prompts.extend((ex.id, enc.ids) for enc in encs)
    if decoding == "span":
        answers = span_answers(model, tokenizer, prompts, max_new_tokens, span, batch_size)
    else:
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    for qid, out, score in answers:
        if score > best.get(qid, -math.inf):
            best[qid] = score
            predictions[qid] = tokenizer.decode(out).strip()
    return predictions, skipped, too_long


def squad_eval(
    model: GPT,
    tokenizer: Tokenizer,
    examples: list[QAExample],
    mode: str,
    max_new_tokens: int,
    batch_size: int,
    n_examples: int,
    long_context: str = "truncate",
    context_tokens: int = 0,
    decoding: str = "greedy",
    span: SpanOptions = SpanOptions(),
) -> dict:
    start = time.time()
    predictions, skipped, too_long = predict_answers(
        model, tokenizer, examples, mode, max_new_tokens, batch_size, long_context, context_tokens, decoding, span
    )
    elapsed = max(time.time() - start, 1e-9)
    em, f1 = question_scores(predictions, examples)
    listed = [
        SquadPrediction(
            ex.id, ex.question, ex.answers, predictions.get(ex.id, ""), round(100 * float(f1[i]), 1), float(em[i])
        ).__dict__
        for i, ex in enumerate(examples[:n_examples])
    ]
    return {
        **averaged_scores(em, f1),
        "em_ci95": bootstrap_ci(em),
        "f1_ci95": bootstrap_ci(f1),
        "mode": mode,
        "skipped": skipped,
        "contexts_truncated": too_long if long_context != "sliding_window" and mode == "context" else 0,
        "contexts_windowed": too_long if long_context == "sliding_window" and mode == "context" else 0,
        "long_context": long_context if mode == "context" else "n/a (closed-book)",
        "context_tokens": context_tokens or "as many as fit the block",
        "context_truncation": LONG_CONTEXT[long_context] if mode == "context" else "no context (closed-book)",
        "questions_per_s": len(examples) / elapsed,
        "decoding": {
            "strategy": decoding,
            "description": DECODING[decoding],
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "kv_cache": True,
            "padding": "left" if decoding == "greedy" else SPAN_PADDING,
            **(
                {
                    "span_calibration": span.calibration,
                    "skip_question_words": span.skip_question_words,
                    "span_max_starts": span.max_starts,
                }
                if decoding == "span"
                else {}
            ),
        },
        "examples": listed,
        # {question id: [EM, F1]} (0-1): lets --compare pair two reports' scores question by question
        "question_scores": {ex.id: [float(em[i]), round(float(f1[i]), 4)] for i, ex in enumerate(examples)},
        "predictions": predictions,  # {question id: answer}, the official script's input
    }


def dropped_text(dropped: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "none"


def _context_room(context_tokens) -> str:
    return f"at most {context_tokens} tokens" if isinstance(context_tokens, int) else "what the block leaves"


def decoding_text(decoding: dict) -> str:
    details = ", ".join(f"{k} {v}" for k, v in decoding.items() if k not in ("strategy", "description"))
    return f"{decoding.get('strategy', '?')} ({decoding.get('description', '')}; {details})"


SUBSETS = {
    "spread": "evenly spaced through the dev file (every article in proportion)",
    "first": "the first ones in the dev file (a few articles)",
}  # eval.squad_subset


def subset_text(subset: str | None) -> str:
    return f", {SUBSETS.get(subset, subset)}" if subset else ""


def _ci_text(ci: list[float] | None) -> str:
    return f" (95% interval {ci[0]:.2f}-{ci[1]:.2f}: bootstrap over the questions)" if ci else ""


def precision_text(dtype: str | None) -> str:
    if dtype is None:
        return "not recorded (float32 before eval.dtype)"
    return "float32" if dtype == "float32" else f"{dtype} autocast (fp32 weights, fp32 loss and scores)"


def text_metric(report: dict, key: str, digits: int) -> str:
    """A report's held-out text metric ("val_loss", "perplexity", "bpb"), or "not measured" (no token shards)."""
    return f"{report[key]:.{digits}f}" if key in report else "not measured"


def report_markdown(report: dict) -> str:
    """A Markdown page: headline metrics table, then example predictions."""
    squad = report.get("squad", {})
    lines = [
        f"# Evaluation: {report.get('run', '')}",
        "",
        f"Checkpoint: `{report.get('checkpoint', '')}`",
        "",
        "| metric | value |",
        "|---|---|",
        f"| validation loss (nats/token) | {text_metric(report, 'val_loss', 4)} |",
        f"| perplexity | {text_metric(report, 'perplexity', 2)} |",
        f"| bits per byte | {text_metric(report, 'bpb', 4)} |",
        f"| SQuAD exact match | {squad.get('em', 0):.2f}{_ci_text(squad.get('em_ci95'))} |",
        f"| SQuAD F1 | {squad.get('f1', 0):.2f}{_ci_text(squad.get('f1_ci95'))} |",
        f"| SQuAD questions | {squad.get('n', 0)}{subset_text(squad.get('subset'))} |",
        f"| QA mode | {squad.get('mode', '')} |",
        f"| questions/s | {squad.get('questions_per_s', 0):.1f} |",
        f"| precision | {precision_text(report.get('dtype'))} |",
        "",
        f"Decoding: {decoding_text(squad.get('decoding', {}))}.",
        "",
        f"Contexts longer than the room for them ({_context_room(squad.get('context_tokens'))}): "
        f"{squad.get('context_truncation', '')} "
        f"({squad.get('contexts_truncated', 0)} cut to one window, {squad.get('contexts_windowed', 0)} split into "
        "windows). "
        f"Questions longer than the block: {squad.get('skipped', 0)} (scored 0). "
        f"Unusable dev examples left out: {dropped_text(squad.get('invalid_skipped', {}))}.",
        "",
        *(
            [f"Held-out text metrics not measured: {report['text_metrics_skipped']}.", ""]
            if "text_metrics_skipped" in report
            else []
        ),
        *(
            [
                f"{squad['validation_questions_scored']} of the scored questions are validation examples fine-tuning "
                "selected its checkpoint on (eval.squad_questions above the run's): their scores are optimistic.",
                "",
            ]
            if squad.get("validation_questions_scored")
            else []
        ),
        "## Examples",
        "",
        "| question | gold | predicted | F1 |",
        "|---|---|---|---|",
    ]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for ex in squad.get("examples", []):
        lines.append(
            f"| {cell(ex['question'])} | {cell(' / '.join(ex['answers'][:3]))} | {cell(ex['prediction'])} "
            f"| {ex['f1']} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- comparing runs

COMPARE_COLUMNS = (
    "run",
    "checkpoint",
    "mode",
    "questions",
    "EM",
    "F1 (95% interval)",
    "F1 vs first run (95% paired)",
    "bpb",
    "perplexity",
    "questions/s",
    "long contexts",
    "decoding",
    "dtype",
)


def paired_f1_change(report: dict, baseline: dict) -> str:
    """F1 of `report` minus F1 of `baseline` on the questions both scored, with a paired bootstrap interval
    (resampling questions, each scored by both): a difference that two separate intervals would blur."""
    ours = report.get("squad", {}).get("question_scores", {})
    theirs = baseline.get("squad", {}).get("question_scores", {})
    shared = [qid for qid in ours if qid in theirs]
    if not shared:
        return "-"
    change = np.array([ours[qid][1] - theirs[qid][1] for qid in shared])
    low, high = bootstrap_ci(change)
    return f"{100 * change.mean():+.2f} ({low:+.2f} to {high:+.2f}; {len(shared)} questions)"


def compare_row(report: dict, baseline: dict | None = None) -> list[str]:
    squad = report.get("squad", {})
    return [
        report.get("run", "?"),
        report.get("checkpoint", "?").rstrip("/").rsplit("/", 1)[-1],
        squad.get("mode", "-"),
        f"{squad.get('n', 0)}" + (f" ({squad['subset']})" if squad.get("subset") else ""),
        f"{squad.get('em', 0):.2f}",
        f"{squad.get('f1', 0):.2f}" + (" ({:.2f}-{:.2f})".format(*squad["f1_ci95"]) if "f1_ci95" in squad else ""),
        paired_f1_change(report, baseline) if baseline is not None else "-",
        text_metric(report, "bpb", 4),
        text_metric(report, "perplexity", 2),
        f"{squad.get('questions_per_s', 0):.1f}",
        squad.get("long_context", "-"),
        squad.get("decoding", {}).get("strategy", "-"),
        report.get("dtype", "-"),
    ]


def compare_table(reports: list[dict]) -> str:
    """One Markdown table with a row per evaluation report; each after the first also shows its F1 change from
    the first on the questions both scored."""
    lines = ["| " + " | ".join(COMPARE_COLUMNS) + " |", "|" + "---|" * len(COMPARE_COLUMNS)]
    lines += ["| " + " | ".join(compare_row(r, reports[0] if i else None)) + " |" for i, r in enumerate(reports)]
    return "\n".join(lines) + "\n"


def load_report(run_dir: str | Path) -> dict:
    """A run's eval/report.json (or a report file given directly), with a clear error when missing."""
    path = Path(run_dir)
    path = path if path.is_file() else path / "eval" / "report.json"
    if not path.is_file():
        raise LmforgeError(f"no evaluation report at {path} (run `lmforge eval --run-dir {run_dir}` first)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path}: unreadable report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("squad"), dict):
        raise LmforgeError(f"{path}: not an lmforge evaluation report (give a run directory or its eval/report.json)")
    return report
