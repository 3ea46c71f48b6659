"""SQuAD evaluation throughput: lmforge's batched greedy decoding (left padding + one shared KV cache)
against two baselines measured in the same run, on the same dev questions and the same weights:

  sequential   lmforge, one question at a time (batch 1, KV cache): what evaluation costs without batching
  hf           Hugging Face `transformers` generate on the run exported with `lmforge export --format hf`
               (LlamaForCausalLM, left padding, same batch size, greedy)

    python bench/qa_eval.py RUN [--questions 64] [--batch-size 32] [--data-dir ../shared/data] [--span-max-starts K]

Also checks that the three produce the same answers (they decode the same greedy tokens). With-context runs
also time extractive span answers (the run's eval.span_* settings), `--batch-size` questions decoded together
against one at a time, and check that they agree.
Last line: `qa_eval: batched/sequential X.XX, lmforge/hf X.XX[, span batched/sequential X.XX]` (questions/s
ratios; > 1: lmforge faster)
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

import lmforge
from lmforge.config import load_recipe
from lmforge.data.sources import data_dir_from_env, iter_qa_examples
from lmforge.evaluate import SpanOptions, predict_answers, squad_scores
from lmforge.export import export_hf


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def load_hf(hf_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)


def hf_answers(
    model, tok, prompts: dict[str, list[int]], max_new: int, batch_size: int, pad_id: int, eos_id: int
) -> dict[str, str]:
    items = sorted(prompts.items(), key=lambda kv: len(kv[1]))  # same length grouping as lmforge
    out: dict[str, str] = {}
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            width = max(len(p) for _, p in chunk)
            ids = torch.full((len(chunk), width), pad_id)
            mask = torch.zeros_like(ids)
            for row, (_, p) in enumerate(chunk):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
            for (qid, _), row in zip(chunk, gen[:, width:], strict=True):
                out[qid] = tok.decode(row, skip_special_tokens=True).strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--span-max-starts", type=int, default=None, help="eval.span_max_starts (default: the run's)")
    args = ap.parse_args()

    torch.manual_seed(0)
    recipe = load_recipe(Path(args.run) / "config.toml")
    model, tok = lmforge.load(args.run)
    examples = list(islice(iter_qa_examples(recipe.qa.dev, data_dir_from_env(args.data_dir)), args.questions))
    mode, max_new = recipe.qa.mode, recipe.eval.max_new_tokens
    print(
        f"{len(examples)} dev questions, mode {mode}, max_new_tokens {max_new}, batch {args.batch_size}, "
        f"threads {torch.get_num_threads()}"
    )

    def greedy(batch_size: int):  # long contexts truncated, as the Hugging Face prompts below
        return predict_answers(model, tok, examples, mode, max_new, batch_size)[0]

    predict_answers(model, tok, examples[:2], mode, max_new, 2)  # warm-up: no one-time cost in the first timing
    if mode == "context":
        predict_answers(model, tok, examples[:2], mode, max_new, 2, decoding="span", span=SpanOptions.of(recipe.eval))
    batched, t_batched = timed(lambda: greedy(args.batch_size))
    sequential, t_seq = timed(lambda: greedy(1))

    from lmforge.evaluate import question_prompts

    prompts = {
        ex.id: question_prompts(tok, ex, mode, model.cfg.block_size, max_new, "truncate")[0].ids for ex in examples
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, hf_tok = load_hf(export_hf(args.run, Path(tmp) / "hf"))  # loading is not timed
        first = dict(list(prompts.items())[:2])
        hf_answers(hf_model, hf_tok, first, max_new, 2, tok.pad_id, tok.eot_id)  # warm-up, as lmforge's
        hf, t_hf = timed(
            lambda: hf_answers(hf_model, hf_tok, prompts, max_new, args.batch_size, tok.pad_id, tok.eot_id)
        )

    n = len(examples)
    for name, preds, t in (
        ("lmforge batched", batched, t_batched),
        ("lmforge sequential", sequential, t_seq),
        ("hf generate batched", hf, t_hf),
    ):
        same = sum(preds[ex.id] == batched[ex.id] for ex in examples)
        f1 = squad_scores(preds, examples)["f1"]
        print(f"{name:22s} {n / t:7.2f} questions/s   F1 {f1:6.2f}   same answers as batched: {same}/{n}")
    span_ratio = ""
    if mode == "context":  # extractive answers, the run's span settings: questions together vs one at a time
        e, span = recipe.eval, SpanOptions.of(recipe.eval)
        if args.span_max_starts is not None:
            span = dataclasses.replace(span, max_starts=args.span_max_starts)

        def spans(batch_size: int):
            return predict_answers(
                model,
                tok,
                examples,
                mode,
                max_new,
                batch_size,
                e.long_context,
                recipe.answer_context_tokens,
                "span",
                span,
            )[0]

        span_batched, t_span_batched = timed(lambda: spans(args.batch_size))
        span_seq, t_span_seq = timed(lambda: spans(1))
        same = sum(span_seq[ex.id] == span_batched[ex.id] for ex in examples)
        print(
            f"{'span batched':22s} {n / t_span_batched:7.2f} questions/s   F1 "
            f"{squad_scores(span_batched, examples)['f1']:6.2f}   ({span})"
        )
        print(f"{'span sequential':22s} {n / t_span_seq:7.2f} questions/s   same answers as batched: {same}/{n}")
        span_ratio = f", span batched/sequential {t_span_seq / t_span_batched:.2f}"
    print(f"qa_eval: batched/sequential {t_seq / t_batched:.2f}, lmforge/hf {t_hf / t_batched:.2f}{span_ratio}")


if __name__ == "__main__":
    main()
