"""What live control and kept checkpoints cost, as ratios against work measured in the same run.

- poll/step: one `control.toml` poll (the loop does one per optimizer step; the file exists and is
  unchanged) against one tiny-recipe training step (forward, backward, AdamW).
- snapshot/save: keeping a checkpoint as `<stage>-step-N` (hard links) against writing it
  (`save_checkpoint` with optimizer state), for the cpu-small model.

Usage: python bench/control.py
Ends with one line: `control: poll/step X, snapshot/save X`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import TrainConfig
from lmforge.model import GPT, GPTConfig, lm_loss
from lmforge.rundir import RunDir
from lmforge.train.checkpoint import keep_recent, rng_state, save_checkpoint
from lmforge.train.control import LiveControl, write_controls
from lmforge.train.metrics import MetricsLogger
from lmforge.train.optim import make_optimizer


def best_of(fn, repeats: int, number: int) -> float:
    """Seconds per call: the best of `repeats` timings of `number` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return min(times)


def step_seconds() -> float:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, n_layer=2, n_head=2, n_embd=64, block_size=128))
    opt = make_optimizer(model, TrainConfig(device="cpu"), torch.device("cpu"))
    x = torch.randint(2048, (16, 128))

    def step():
        lm_loss(model(x), x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return best_of(step, 5, 5)


def poll_seconds(root: Path) -> float:
    run = RunDir(root / "run")
    run.root.mkdir()
    run.config.write_text("name = 'bench'\n")
    write_controls(run, {"lr": 1e-4})
    control = LiveControl(run, TrainConfig())
    metrics = MetricsLogger(root / "metrics.jsonl")
    control.poll(metrics, "pretrain", 0)  # the first poll applies the file; later ones find it unchanged
    seconds = best_of(lambda: control.poll(metrics, "pretrain", 1), 5, 2000)
    metrics.close()
    return seconds


def checkpoint_seconds(root: Path) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, n_layer=6, n_head=6, n_embd=384, block_size=256))
    opt = make_optimizer(model, TrainConfig(device="cpu"), torch.device("cpu"))
    lm_loss(model(torch.randint(8192, (1, 16))), torch.randint(8192, (1, 16))).backward()
    opt.step()
    trainer = {"optimizer": opt.state_dict(), "rng": rng_state()}
    last = root / "checkpoints" / "last"
    save = best_of(lambda: save_checkpoint(last, model, {"stage": "pretrain", "step": 1}, trainer), 3, 1)
    steps = iter(range(1, 10_000))
    snapshot = best_of(lambda: keep_recent(last.parent, "pretrain", next(steps), 2), 3, 3)
    return snapshot, save


def main() -> None:
    torch.set_num_threads(1)  # comparable on a shared machine; both sides of each ratio run alike
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        step, poll = step_seconds(), poll_seconds(root)
        snapshot, save = checkpoint_seconds(root)
    print(f"tiny training step {step * 1e3:.2f} ms, control poll {poll * 1e6:.1f} us")
    print(f"cpu-small checkpoint save {save * 1e3:.0f} ms, snapshot (hard links) {snapshot * 1e3:.2f} ms")
    print(f"control: poll/step {poll / step:.5f}, snapshot/save {snapshot / save:.4f}")


if __name__ == "__main__":
    main()
