"""Choosing span-decoding settings on held-out dev questions: F1 of several eval.span_* variants on the same
questions, each compared with the first (the baseline) by a paired bootstrap interval of the F1 difference.

The questions are dev questions that the run's evaluation never scores: neither its EM/F1 questions
(eval.squad_questions, eval.squad_subset) nor its fine-tuning validation examples. So settings chosen here
are not fitted to the reported score.

    python bench/span_settings.py RUN [--questions 1500] [--data-dir ../shared/data] [--dtype float32] \\
        --variant starts=0,calibration=0.5 --variant starts=2,calibration=0.5 --variant starts=2,calibration=0

A variant sets any of `starts` (eval.span_max_starts), `calibration` (eval.span_calibration) and
`skip` (eval.span_skip_question_words, 0/1); the rest come from the run's config.
Last line: `span_settings: best <variant> F1 X.XX (baseline X.XX)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lmforge  # noqa: E402
from lmforge.config import load_recipe  # noqa: E402
from lmforge.data.qa import clean_examples  # noqa: E402
from lmforge.data.sources import QAExample, data_dir_from_env, iter_qa_examples  # noqa: E402
from lmforge.evaluate import SpanOptions, bootstrap_ci, predict_answers, question_scores  # noqa: E402
from lmforge.pipeline import load_qa_splits  # noqa: E402
from lmforge.train.precision import autocast, resolve_dtype  # noqa: E402

FIELDS = {
    "starts": ("max_starts", int),
    "calibration": ("calibration", float),
    "skip": ("skip_question_words", lambda text: bool(int(text))),
}


def parse_variant(text: str, base: SpanOptions) -> SpanOptions:
    """`starts=2,calibration=0.5` -> the run's SpanOptions with those fields changed."""
    changes = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in FIELDS:
            raise SystemExit(f"--variant {text}: unknown setting '{key}' (known: {', '.join(FIELDS)})")
        name, kind = FIELDS[key]
        changes[name] = kind(value)
    return dataclasses.replace(base, **changes)


def held_out_questions(recipe, data_dir: Path | None, n: int) -> list[QAExample]:
    """n dev questions evenly spaced through those the run's evaluation neither scores nor validates on."""
    splits = load_qa_splits(recipe, data_dir)
    used = {ex.id for ex in splits.eval} | {ex.id for ex in splits.val}
    dev, _ = clean_examples(list(iter_qa_examples(recipe.qa.dev, data_dir)), "dev")
    rest = [ex for ex in dev if ex.id not in used]
    if n >= len(rest):
        return rest
    return [rest[i * len(rest) // n] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--questions", type=int, default=1500)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dtype", default="float32", help="eval.dtype for every variant (bfloat16: faster)")
    ap.add_argument("--variant", action="append", required=True, help="e.g. starts=2,calibration=0.5")
    args = ap.parse_args()

    recipe = load_recipe(Path(args.run) / "config.toml")
    model, tok = lmforge.load(args.run)
    e = recipe.eval
    questions = held_out_questions(recipe, data_dir_from_env(args.data_dir), args.questions)
    device = model.tok_emb.weight.device
    dtype = resolve_dtype(args.dtype, device)
    print(
        f"{len(questions)} held-out dev questions, {e.long_context} windows of {recipe.answer_context_tokens} "
        f"tokens, {dtype}, threads {torch.get_num_threads()}"
    )
    f1s: dict[str, np.ndarray] = {}
    with autocast(device, dtype):  # warm-up: the first variant's questions/s pays no one-time cost
        predict_answers(
            model,
            tok,
            questions[:2],
            "context",
            e.max_new_tokens,
            2,
            e.long_context,
            recipe.answer_context_tokens,
            "span",
            SpanOptions.of(e),
        )
    for text in args.variant:
        options = parse_variant(text, SpanOptions.of(e))
        start = time.perf_counter()
        with autocast(device, dtype):
            predictions = predict_answers(
                model,
                tok,
                questions,
                "context",
                e.max_new_tokens,
                e.batch_size,
                e.long_context,
                recipe.answer_context_tokens,
                "span",
                options,
            )[0]
        rate = len(questions) / (time.perf_counter() - start)
        f1s[text] = question_scores(predictions, questions)[1]
        line = f"{text:40s} F1 {100 * f1s[text].mean():6.2f}  {rate:6.1f} questions/s"
        if len(f1s) > 1:
            low, high = bootstrap_ci(f1s[text] - f1s[args.variant[0]])
            line += (
                f"  vs {args.variant[0]}: {100 * (f1s[text] - f1s[args.variant[0]]).mean():+.2f} "
                f"(95% {low:+.2f} to {high:+.2f})"
            )
        print(line, flush=True)
    best = max(f1s, key=lambda k: f1s[k].mean())
    print(
        f"span_settings: best {best} F1 {100 * f1s[best].mean():.2f} (baseline {100 * f1s[args.variant[0]].mean():.2f})"
    )


if __name__ == "__main__":
    main()
