"""Fine-tuning step time (forward, backward and the AdamW update): logits at the answer tokens only (lmforge's
output_mask) vs at every position.

A SQuAD batch scores a handful of answer tokens per sequence; the loss is the same either way (printed),
the sparse step skips the output layer (n_embd x vocab) and its softmax at every other position.

    python bench/finetune_step.py [--recipe cpu-small] [--rounds 6]

Ends with: `finetune-step: cpu-small dense/sparse X.XXx` (median over rounds of the per-round ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import gpt_config  # noqa: E402

from lmforge.model import GPT  # noqa: E402
from lmforge.train.loop import batch_loss  # noqa: E402
from lmforge.train.precision import autocast, resolve_dtype  # noqa: E402

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="cpu-small")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=170, help="tokens per sequence (SQuAD prompt + answer)")
    parser.add_argument("--answer-tokens", type=int, default=6)
    args = parser.parse_args()
    cfg = gpt_config(args.recipe)
    if args.length > cfg.block_size:
        print(f"--length {args.length} exceeds {args.recipe}'s block: {cfg.block_size} tokens per sequence")
        args.length = cfg.block_size
    dtype = resolve_dtype("auto", CPU)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    # the trainer's AdamW, at lr 0 so that every round computes the same loss (its cost does not depend on lr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.length))
    y = torch.full_like(x, -100)
    end = args.length - 4
    y[:, end - args.answer_tokens : end] = x[:, end - args.answer_tokens + 1 : end + 1]

    def step(sparse: bool) -> tuple[float, float]:
        start = time.perf_counter()
        with autocast(CPU, dtype):
            loss = batch_loss(model, x, y, sparse)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    step(True), step(False)  # warm-up
    ratios, losses = [], (0.0, 0.0)
    for i in range(args.rounds):  # the order alternates, so neither variant always runs second
        if i % 2:
            (sparse_s, sparse_loss), (dense_s, dense_loss) = step(True), step(False)
        else:
            (dense_s, dense_loss), (sparse_s, sparse_loss) = step(False), step(True)
        ratios.append(dense_s / sparse_s)
        losses = (dense_loss, sparse_loss)
    print(
        f"{args.recipe}: batch {args.batch} x {args.length}, {args.answer_tokens} answer tokens per row, {dtype}; "
        f"loss dense {losses[0]:.5f} / sparse {losses[1]:.5f}"
    )
    print(f"finetune-step: {args.recipe} dense/sparse {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
