"""The training loop, checkpoints and resume, on the tiny run's real token shards."""

import json
import shutil

import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.data.loader import TokenBatcher
from lmforge.errors import LmforgeError
from lmforge.model import GPT, GPTConfig
from lmforge.rundir import RunDir
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import resolve_device, train_stage
from lmforge.train.metrics import read_metrics
from lmforge.train.schedule import lr_at


def fresh_run(tiny_run, tmp_path, name) -> RunDir:
    """A run dir sharing the tiny run's tokenizer and shards, with no checkpoints or metrics."""
    run = RunDir(tmp_path / name)
    run.root.mkdir()
    shutil.copy(tiny_run / "tokenizer.json", run.tokenizer)
    shutil.copytree(tiny_run / "data", run.data)
    shutil.copy(tiny_run / "config.toml", run.config)
    return run


def small_model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.1))


CFG = TrainConfig(
    max_steps=30,
    batch_size=4,
    lr=2e-3,
    warmup_steps=3,
    eval_interval=10,
    eval_batches=2,
    checkpoint_interval=10,
    log_interval=1,
)


def batchers(run):
    return (TokenBatcher(run.data, "train", 32, 4, seed=1), TokenBatcher(run.data, "val", 32, 4, seed=2))


class InterruptAfter:
    """Wraps a batch source; raises KeyboardInterrupt (a hard Ctrl-C) on the n-th batch."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def next_batch(self):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.inner.next_batch()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def train_losses(run):
    losses = {}
    for rec in read_metrics(run.metrics):
        if rec.get("split") == "train":
            losses[rec["step"]] = rec["loss"]  # a resumed run rewrites steps after its checkpoint
    return losses


def test_schedule_warmup_and_cosine():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "device, message",
    [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"), ("mps", "MPS is not available")],
)
def test_an_unavailable_device_is_one_line(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(LmforgeError, match=f"^device '{device}' requested but {message}$"):
        resolve_device(device)


def test_interrupted_run_resumes_exactly_and_checkpoint_reloads(tiny_run, tmp_path):
    vocab = Tokenizer.load(tiny_run / "tokenizer.json").vocab_size
    ref = fresh_run(tiny_run, tmp_path, "ref")
    model = small_model(vocab)
    train, val = batchers(ref)
    result = train_stage(model, train, val, CFG, ref, "pretrain", CFG.max_steps, seed=5)
    assert result.steps == 30 and result.stop_reason == "completed"
    # the saved checkpoint gives bit-identical logits
    x = torch.randint(0, vocab, (2, 32))
    model.eval()
    reloaded = ckpt.model_from_checkpoint(ref.checkpoint("last"))
    assert torch.equal(model(x), reloaded(x))

    run = fresh_run(tiny_run, tmp_path, "interrupted")
    train, val = batchers(run)
    with pytest.raises(KeyboardInterrupt):
        train_stage(small_model(vocab), InterruptAfter(train, 25), val, CFG, run, "pretrain", CFG.max_steps, seed=5)
    assert ckpt.read_state(run.checkpoint("last"))["step"] == 20
    train, val = batchers(run)
    resumed = train_stage(small_model(vocab), train, val, CFG, run, "pretrain", CFG.max_steps, resume=True, seed=5)
    assert resumed.steps == 30
    ref_losses, run_losses = train_losses(ref), train_losses(run)
    for step in range(21, 31):
        assert run_losses[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    assert (run.plots / "loss.png").stat().st_size > 0


def test_stop_file_ends_the_stage_gracefully(tiny_run, tmp_path):
    run = fresh_run(tiny_run, tmp_path, "stop")
    vocab = Tokenizer.load(run.tokenizer).vocab_size
    train, val = batchers(run)

    class StopAt:
        def __init__(self):
            self.calls = 0

        def next_batch(self):
            self.calls += 1
            if self.calls == 4:
                run.stop_file.write_text("")
            return train.next_batch()

        def __getattr__(self, name):
            return getattr(train, name)

    result = train_stage(small_model(vocab), StopAt(), val, CFG, run, "pretrain", CFG.max_steps, seed=5)
    assert result.stop_reason == "stop_file" and result.steps == 4
    assert ckpt.read_state(run.checkpoint("last"))["step"] == 4
    assert not run.stop_file.exists()  # consumed, so the next stage runs


def test_early_stopping_with_patience(tiny_run, tmp_path):
    run = fresh_run(tiny_run, tmp_path, "patience")
    vocab = Tokenizer.load(run.tokenizer).vocab_size
    train, val = batchers(run)
    cfg = TrainConfig(
        max_steps=200,
        batch_size=4,
        lr=5.0,
        warmup_steps=0,
        eval_interval=2,
        eval_batches=1,
        patience=2,
        checkpoint_interval=50,
        log_interval=10,
        grad_clip=0.0,
    )
    try:
        result = train_stage(small_model(vocab), train, val, cfg, run, "pretrain", cfg.max_steps, seed=5)
    except LmforgeError as exc:  # a diverging run may hit the non-finite loss guard first: also a clear stop
        assert "lower the learning rate" in str(exc)
        return
    assert result.stop_reason == "early_stopping" and result.steps < 200


def test_checkpoint_from_another_shape_is_a_clear_error(tiny_run):
    model = GPT(GPTConfig(vocab_size=2048, n_layer=2, n_head=2, n_embd=32, block_size=128))
    with pytest.raises(LmforgeError, match="has shape .* the model expects .*another model shape"):
        ckpt.load_weights(model, tiny_run / "checkpoints" / "best")


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16))
    path = tmp_path / "checkpoints" / "last"
    ckpt.save_checkpoint(path, model, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, model, {"step": 2})
    assert ckpt.read_state(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last"]
    # a swap that died between its two renames: readers fall back to the intact '.old' copy
    path.rename(path.with_name("last.old"))
    assert ckpt.read_state(path)["step"] == 1
    monkeypatch.undo()
    ckpt.save_checkpoint(path, model, {"step": 3})
    assert ckpt.read_state(path)["step"] == 3 and not path.with_name("last.old").exists()


def test_checkpoints_hold_no_pickle(tiny_run):
    best = tiny_run / "checkpoints" / "best"
    assert sorted(p.name for p in best.iterdir()) == ["model.safetensors", "state.json"]
    state = json.loads((best / "state.json").read_text())
    assert state["stage"] == "finetune" and state["model_config"]["n_layer"] == 2


def test_padded_batches_count_only_their_real_tokens(tmp_path):
    """Fine-tuning batches are padded to their longest example: tokens, tokens/s and MFU count the tokens the
    model read, not the padding."""
    from lmforge.data.qa import EncodedQA, QABatcher

    items = [EncodedQA(list(range(1, n + 1)), prompt_len=n - 2) for n in (5, 9, 14, 20, 7, 11, 16, 6)]
    reference = QABatcher(items, batch_size=4, pad_id=0, seed=1, group_by_length=0)
    batches = [reference.next_batch()[0] for _ in range(4)]
    real, padded = sum(int((x != 0).sum()) for x in batches), sum(x.numel() for x in batches)
    assert real < padded
    run = RunDir(tmp_path / "qa")
    run.root.mkdir()
    cfg = TrainConfig(
        max_steps=4,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        eval_interval=100,
        eval_batches=1,
        checkpoint_interval=100,
        log_interval=1,
    )
    train = QABatcher(items, batch_size=4, pad_id=0, seed=1, group_by_length=0)
    result = train_stage(small_model(32), train, QABatcher(items, 4, 0, seed=2), cfg, run, "finetune", 4, seed=5)
    assert result.tokens == real
    logged = [r for r in read_metrics(run.metrics) if r.get("split") == "train"]
    assert logged[-1]["tokens"] == real


def test_every_answer_token_of_a_step_weighs_the_same_across_micro_batches(tmp_path):
    """Gradient accumulation over padded QA batches equals one batch of all their rows: each micro-batch's
    mean loss is weighed by its answer tokens (before, each micro-batch counted 1/grad_accum, so a token of a
    batch with few answer tokens weighed more)."""
    from lmforge.data.qa import EncodedQA, QABatcher

    # 8 examples, 2 to 9 answer tokens each: the two halves of the one batch score 14 and 30 tokens
    items = [
        EncodedQA(list(range(1, n + 1)), prompt_len=n - a)
        for n, a in ((12, 2), (9, 3), (14, 2), (11, 7), (13, 8), (10, 5), (16, 9), (12, 1))
    ]
    base = TrainConfig(
        max_steps=3,
        batch_size=8,
        lr=1e-2,
        warmup_steps=1,
        eval_interval=100,
        eval_batches=1,
        checkpoint_interval=100,
        log_interval=1,
        dropout=0.0,
        dtype="float32",
    )
    models = {}
    for grad_accum in (1, 2):
        run = RunDir(tmp_path / f"accum{grad_accum}")
        run.root.mkdir()
        rows = 8 // grad_accum
        cfg = TrainConfig(**{**base.__dict__, "batch_size": rows, "grad_accum": grad_accum})
        models[grad_accum] = small_model(32)
        models[grad_accum].set_dropout(0.0)
        train_stage(
            models[grad_accum],
            QABatcher(items, rows, 0, seed=1),
            QABatcher(items, rows, 0, seed=2),
            cfg,
            run,
            "finetune",
            3,
            seed=5,
        )
    one, accumulated = models[1].state_dict(), models[2].state_dict()
    for key, value in one.items():
        # rounding only: the math attention kernel of CPU training rounds the two batch widths differently
        # (up to 3e-6 after Adam's normalisation); weighing micro-batches equally moves weights by ~lr
        torch.testing.assert_close(accumulated[key], value, rtol=0, atol=1e-5, msg=key)


def test_a_distributed_step_weighs_and_counts_every_rank_s_tokens():
    """Under data parallelism each rank sees its own rows: the weights use the whole step's scored tokens (one
    all-reduce), and the step's tokens are every rank's, not rank 0's times the world size."""
    from lmforge.train.distributed import Parallel
    from lmforge.train.loop import MicroBatch, step_shares

    class TwoRanks(Parallel):  # this rank, with the other rank's totals added as an all-reduce would
        def sum(self, *values: float) -> list[float]:
            return [v + other for v, other in zip(values, (30.0, 70.0, 30.0), strict=True)]

    def micro(answer_tokens: int, real: int, pad_id: int | None = 0) -> MicroBatch:
        x = torch.zeros(2, 50, dtype=torch.long)
        x[0, :real] = 1  # pad id 0
        y = torch.full((2, 50), -100)
        y[0, :answer_tokens] = 5
        return MicroBatch.of((x, y), pad_id=pad_id)

    shares = step_shares([micro(4, 20), micro(6, 10)], TwoRanks("ddp", 0, 2), uneven=True)
    # the step scores 4 + 6 here and 30 on the other rank: DDP averages over 2 ranks, so each weight is
    # its tokens x 2 / 40, and the gradients of all 40 tokens end up weighed 1/40 each
    assert shares.weights == pytest.approx([4 * 2 / 40, 6 * 2 / 40])
    assert shares.tokens == 30 + 70 and shares.outputs == 10 + 30
    # pretraining: no padding, every rank reads as much: no all-reduce needed
    even = step_shares([micro(4, 20, None), micro(6, 10, None)], TwoRanks("ddp", 0, 2), uneven=False)
    assert even.weights == [0.5, 0.5] and even.tokens == 2 * (100 + 100)


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_the_precision_trained_in_is_recorded_and_resume_shows_the_last_validation_loss(tmp_path, dtype):
    from lmforge.train.precision import resolve_dtype

    from .synthetic import cfg, make_run, train

    run = make_run(tmp_path)
    trained_in = str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")  # what `auto` is here
    first, _ = train(run, cfg(max_steps=4, dtype=dtype))
    state = ckpt.read_state(run.checkpoint("last"))
    assert state["dtype"] == trained_in
    rows = [r for r in read_metrics(run.metrics) if r.get("split") == "train"]
    assert rows and all(r["dtype"] == trained_in for r in rows)
    # resumed where nothing is left to train: no evaluation, yet the last validation loss is known
    again, _ = train(run, cfg(max_steps=4, dtype=dtype), resume=True)
    assert again.last_val_loss == first.last_val_loss == state["val_loss"]


HOLDER = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from lmforge.rundir import RunDir
from tests.synthetic import cfg, train

train(RunDir(Path(sys.argv[1])), cfg(), {2: lambda: (print("training", flush=True), time.sleep(120))})
"""


def test_a_second_trainer_of_a_run_is_refused_until_the_first_one_dies(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .synthetic import cfg, make_run, train

    repo = Path(__file__).resolve().parents[1]
    run = make_run(tmp_path)
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo)]), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, str(script), str(run.root)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "training"  # in its second step, holding the lock
        with pytest.raises(LmforgeError) as refused:
            train(run, cfg())
        message = str(refused.value)
        assert f"lmforge pretrain (pid {holder.pid} on " in message and "\n" not in message, message
        starts = [r for r in read_metrics(run.metrics) if r.get("event") == "pretrain_start"]
        assert len(starts) == 1  # the refused trainer wrote nothing
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
    result, _ = train(run, cfg(max_steps=2))
    assert result.steps == 2
