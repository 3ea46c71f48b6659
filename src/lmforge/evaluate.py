"""Evaluation: loss, perplexity and bits-per-byte on held-out text; SQuAD v1.1 exact match and F1.

EM/F1 follow the official `evaluate-v1.1.py`: answers are normalised (lower case, punctuation and
the articles a/an/the removed, whitespace collapsed), each prediction is scored against every gold
answer and the maximum is kept, and scores are averaged over questions (x100).
"""

from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.qa import encode_for_inference
from lmforge.data.sources import QAExample
from lmforge.generate import greedy_batch
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import Batch, lm_loss

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


def squad_scores(predictions: dict[str, str], examples: list[QAExample]) -> dict[str, float]:
    """Micro-averaged EM and F1 (percent) of predictions keyed by question id."""
    em = f1 = 0.0
    for ex in examples:
        pred = predictions.get(ex.id, "")
        em += best_over_answers(exact_match_score, pred, ex.answers)
        f1 += best_over_answers(f1_score, pred, ex.answers)
    n = len(examples)
    return {"em": 100.0 * em / max(n, 1), "f1": 100.0 * f1 / max(n, 1), "n": n}


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


def predict_answers(model: GPT, tokenizer: Tokenizer, examples: list[QAExample], mode: str, max_new_tokens: int,
                    batch_size: int) -> tuple[dict[str, str], int, int]:
    """Greedy answers for every example; returns (predictions by id, #skipped, #contexts truncated).

    Prompts are built as in fine-tuning; a context too long for the block keeps its beginning
    (truncation at evaluation: the answer position is unknown).
    """
    predictions: dict[str, str] = {}
    prompts: list[tuple[str, list[int]]] = []
    skipped = truncated = 0
    for ex in examples:
        enc = encode_for_inference(tokenizer, ex.question, ex.context if mode == "context" else None,
                                   model.cfg.block_size, max_new_tokens)
        if enc is None:
            skipped += 1
            predictions[ex.id] = ""
            continue
        truncated += enc.context_truncated
        prompts.append((ex.id, enc.ids))
    # similar lengths together: less padding per batch
    prompts.sort(key=lambda item: len(item[1]))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        outputs = greedy_batch(model, [p for _, p in chunk], max_new_tokens, tokenizer.eot_id, tokenizer.pad_id)
        for (qid, _), out in zip(chunk, outputs):
            predictions[qid] = tokenizer.decode(out).strip()
    return predictions, skipped, truncated


def squad_eval(model: GPT, tokenizer: Tokenizer, examples: list[QAExample], mode: str, max_new_tokens: int,
               batch_size: int, n_examples: int) -> dict:
    start = time.time()
    predictions, skipped, truncated = predict_answers(model, tokenizer, examples, mode, max_new_tokens, batch_size)
    elapsed = max(time.time() - start, 1e-9)
    scores = squad_scores(predictions, examples)
    listed = []
    for ex in examples[:n_examples]:
        pred = predictions.get(ex.id, "")
        listed.append(SquadPrediction(ex.id, ex.question, ex.answers, pred,
                                      round(100 * best_over_answers(f1_score, pred, ex.answers), 1),
                                      best_over_answers(exact_match_score, pred, ex.answers)).__dict__)
    return {
        **scores,
        "mode": mode,
        "skipped": skipped,
        "contexts_truncated": truncated,
        "context_truncation": "keep the beginning of the context (answer position unknown at evaluation)",
        "questions_per_s": len(examples) / elapsed,
        "decoding": {"strategy": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "kv_cache": True},
        "examples": listed,
    }


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
        f"| validation loss (nats/token) | {report['val_loss']:.4f} |",
        f"| perplexity | {report['perplexity']:.2f} |",
        f"| bits per byte | {report['bpb']:.4f} |",
        f"| SQuAD exact match | {squad.get('em', 0):.2f} |",
        f"| SQuAD F1 | {squad.get('f1', 0):.2f} |",
        f"| SQuAD questions | {squad.get('n', 0)} |",
        f"| QA mode | {squad.get('mode', '')} |",
        f"| questions/s | {squad.get('questions_per_s', 0):.1f} |",
        "",
        f"Decoding: {squad.get('decoding', {})}. Contexts longer than the block: {squad.get('context_truncation', '')} "
        f"({squad.get('contexts_truncated', 0)} truncated, {squad.get('skipped', 0)} skipped).",
        "",
        "## Examples",
        "",
        "| question | gold | predicted | F1 |",
        "|---|---|---|---|",
    ]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for ex in squad.get("examples", []):
        lines.append(f"| {cell(ex['question'])} | {cell(' / '.join(ex['answers'][:3]))} | {cell(ex['prediction'])} "
                     f"| {ex['f1']} |")
    return "\n".join(lines) + "\n"
