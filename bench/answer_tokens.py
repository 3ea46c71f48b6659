"""Where a fine-tuned model's answer-token loss comes from: the first answer token (which span to start,
what extractive F1 depends on) against the later ones (continuing a span once started).

The examples are the run's own fine-tuning validation batches (the same first N batches its logged dev
loss averages), so "all" reproduces that dev loss.

    python bench/answer_tokens.py RUN [RUN ...] [--data-dir ../shared/data] [--batches N]

One line per run: `answer_tokens: RUN first X.XXX (top-1 X.X%), later X.XXX, all X.XXX; N answers`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lmforge  # noqa: E402
from lmforge.config import load_recipe  # noqa: E402
from lmforge.data.sources import data_dir_from_env  # noqa: E402
from lmforge.pipeline import load_qa_splits, qa_batches  # noqa: E402


def first_answer_positions(targets: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the first scored target of each row (targets < 0 are not scored)."""
    scored = targets >= 0
    before = torch.cat([torch.zeros_like(scored[:, :1]), scored[:, :-1]], dim=1)
    return scored & ~before


def split_loss(run: str | Path, data_dir: Path | None, n_batches: int = 0) -> dict:
    """Mean loss of the first and of the later answer tokens over the first `n_batches` validation batches
    (0: the recipe's finetune.eval_batches, as the logged dev loss)."""
    recipe = load_recipe(Path(run) / "config.toml")
    model, tok = lmforge.load(run, "best")
    val = qa_batches(recipe, tok, model.cfg.block_size, load_qa_splits(recipe, data_dir).val, "validation")
    sums = {"first": 0.0, "later": 0.0, "first_n": 0, "later_n": 0, "top1": 0}
    with torch.no_grad():
        for x, y in val.fixed_batches(n_batches or recipe.finetune.eval_batches):
            logits = model(x).float()
            loss = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")
            first = first_answer_positions(y)
            later = (y >= 0) & ~first
            sums["first"] += loss[first].sum().item()
            sums["later"] += loss[later].sum().item()
            sums["first_n"] += int(first.sum())
            sums["later_n"] += int(later.sum())
            sums["top1"] += int((logits.argmax(-1)[first] == y[first]).sum())
    n1, n2 = sums["first_n"], sums["later_n"]
    return {
        "first": sums["first"] / n1,
        "later": sums["later"] / n2,
        "all": (sums["first"] + sums["later"]) / (n1 + n2),
        "top1": 100 * sums["top1"] / n1,
        "answers": n1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="fine-tuned run directories")
    parser.add_argument("--data-dir", help="local dataset copies (default: $LMFORGE_DATA_DIR)")
    parser.add_argument(
        "--batches", type=int, default=0, help="validation batches (default: the recipe's finetune.eval_batches)"
    )
    args = parser.parse_args()
    for run in args.runs:
        r = split_loss(run, data_dir_from_env(args.data_dir), args.batches)
        print(
            f"answer_tokens: {run} first {r['first']:.3f} (top-1 {r['top1']:.1f}%), later {r['later']:.3f}, "
            f"all {r['all']:.3f}; {r['answers']} answers"
        )


if __name__ == "__main__":
    main()
