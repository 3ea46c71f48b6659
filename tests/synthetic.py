"""A tiny synthetic training task (no tokenizer or shards) that drives the real training loop in a second or
two: used in-process by the live-control tests and by the child processes of the torchrun tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.config import TrainConfig
from lmforge.model import GPT, GPTConfig
from lmforge.rundir import RunDir
from lmforge.train.loop import StageResult, train_stage

Batch = tuple[torch.Tensor, torch.Tensor]
Hooks = dict[int, Callable[[], object]]

VOCAB, BLOCK, BATCH = 64, 16, 4


class Progressions:
    """Arithmetic progressions mod VOCAB: learnable, seeded, with a restorable position.

    `hooks[k]` runs just before the k-th training batch (1-based) is drawn, i.e. during step k's
    forward pass for grad_accum = 1.
    """

    def __init__(self, seed: int = 0, hooks: Hooks | None = None):
        self.g = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.hooks = hooks or {}

    def _batch(self, g: torch.Generator) -> Batch:
        a = torch.randint(VOCAB, (BATCH, 1), generator=g)
        b = torch.randint(1, 7, (BATCH, 1), generator=g)
        seq = (a + b * torch.arange(BLOCK + 1)) % VOCAB
        return seq[:, :-1], seq[:, 1:]

    def next_batch(self) -> Batch:
        self.calls += 1
        if self.calls in self.hooks:
            self.hooks[self.calls]()
        return self._batch(self.g)

    def fixed_batches(self, n: int) -> list[Batch]:
        g = torch.Generator().manual_seed(999)
        return [self._batch(g) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"generator": self.g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["generator"])


def make_run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True, exist_ok=True)
    run.config.write_text("name = 'synthetic'\n")
    return run


def cfg(**kw: object) -> TrainConfig:
    base = dict(
        max_steps=12,
        batch_size=BATCH,
        lr=1e-2,
        warmup_steps=2,
        eval_interval=4,
        eval_batches=2,
        checkpoint_interval=4,
        log_interval=1,
        device="cpu",
        dtype="float32",
    )
    return TrainConfig(**{**base, **kw})


def train(
    run: RunDir, c: TrainConfig, hooks: Hooks | None = None, resume: bool = False, val: Progressions | None = None
) -> tuple[StageResult, GPT]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=BLOCK))
    return train_stage(
        model, Progressions(0, hooks), val or Progressions(1), c, run, "pretrain", c.max_steps, resume=resume
    ), model
