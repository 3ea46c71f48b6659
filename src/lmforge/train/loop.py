"""The training loop, one for pretraining and fine-tuning.

AdamW with decoupled weight decay on matrices only, linear warmup + cosine decay, gradient
accumulation and clipping, periodic evaluation on a fixed validation set, early stopping, best/last
checkpoints (plus the newest K as <stage>-step-N), exact resume, a graceful stop on Ctrl-C, SIGTERM
or a STOP file in the run dir, and live changes from RUN/control.toml (train/control.py), polled once
per step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.rundir import RunDir, run_lock
from lmforge.torchrun_env import torchrun_rank
from lmforge.train.checkpoint import (
    SHARDED_OPTIMIZER,
    checkpoint_dir,
    keep_recent,
    load_trainer_state,
    load_weights,
    read_state,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from lmforge.train.control import LiveControl, describe
from lmforge.train.distributed import Parallel, clip_grad_norm
from lmforge.train.metrics import MetricsLogger, NullMetrics, memory_mb, plot_losses
from lmforge.train.optim import make_optimizer
from lmforge.train.precision import MFUMeter, autocast, enable_tf32, keep_freed_memory, resolve_dtype
from lmforge.train.schedule import lr_at

log = logging.getLogger("lmforge")

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    """Training or validation batches. Optional: a `pad_id` attribute (padded QA batches: only the other
    tokens count in tokens, tokens/s and MFU) and the hooks _data_hook calls."""

    def next_batch(self) -> Batch: ...
    def fixed_batches(self, n: int) -> list[Batch]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def _data_hook(data: BatchSource, name: str) -> Any:
    """Optional BatchSource hooks (the pretraining mixture has them): pop_events, checkpoint_saved, close."""
    hook = getattr(data, name, None)
    return hook() if hook is not None else None


@dataclass
class StageResult:
    stage: str
    steps: int
    tokens: int
    best_val_loss: float
    last_val_loss: float
    stop_reason: str  # completed | early_stopping | interrupted | stop_file


STOP_REQUESTS = ("interrupted", "stop_file")  # the stop reasons a user asked for (signal, STOP file)


# --------------------------------------------------------------------------- devices and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"device '{name}' requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError("device 'mps' requested but MPS is not available")
    return torch.device(name)


# --------------------------------------------------------------------------- pieces of a step


def batch_loss(model, x: torch.Tensor, y: torch.Tensor, sparse_targets: bool) -> torch.Tensor:
    """`lm_loss` of a batch. With `sparse_targets` (a QA batch: most targets are -100) the model computes
    logits at the scored positions only, which is much cheaper and gives the same loss. A batch with nothing
    scored (a rank's filler row, see `Parallel.local_rows`) has loss 0 and zero gradients, not NaN."""
    if not sparse_targets:
        return model(x, targets=y)  # the loss inside forward: compiled with the model when train.compile
    scored = y != -100
    targets = y[scored]
    logits = model(x, output_mask=scored).float()
    if targets.numel() == 0:  # every parameter stays in the graph (as DDP needs), with zero gradients
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets)


def scored_positions(y: torch.Tensor) -> tuple[int, bool]:
    """(how many targets are scored, whether that is under half of the batch: sparse, as in a QA batch).
    Counted on the CPU copy of the targets, so no device sync."""
    scored = int((y != -100).sum())
    return scored, scored * 2 < y.numel()


@dataclass
class MicroBatch:
    x: torch.Tensor
    y: torch.Tensor
    scored: int  # targets that count in the loss
    sparse: bool  # scored at under half of the positions (a QA batch): logits at those only
    read: int  # tokens the model reads (padding left out)

    @classmethod
    def of(cls, batch: Batch, pad_id: int | None) -> MicroBatch:
        x, y = batch
        scored, sparse = scored_positions(y)
        return cls(x, y, scored, sparse, x.numel() if pad_id is None else int((x != pad_id).sum()))

    @property
    def outputs(self) -> int:
        """Positions whose output layer runs."""
        return self.scored if self.sparse else self.y.numel()


@dataclass
class StepShares:
    weights: list[float]  # what each micro-batch's mean loss is multiplied by
    tokens: int  # tokens the step read, every rank's
    outputs: int  # output-layer positions the step ran, every rank's


def step_shares(micro: list[MicroBatch], parallel: Parallel, uneven: bool) -> StepShares:
    """How a step's micro-batches add up so that every scored token counts the same, across micro-batches and
    ranks, as in one batch of all their rows: a micro-batch's mean loss is weighed by its scored tokens over
    those of the whole step, times the world size, as data-parallel gradients are averaged over ranks. The
    step's totals come from one small all-reduce. Without `uneven` (every micro-batch on every rank scores and
    reads as many tokens: pretraining) that is 1/grad_accum, with no collective."""
    if not uneven:
        n = len(micro)
        return StepShares(
            [1.0 / n] * n,
            sum(m.read for m in micro) * parallel.world_size,
            sum(m.outputs for m in micro) * parallel.world_size,
        )
    scored, read, outputs = parallel.sum(
        float(sum(m.scored for m in micro)), float(sum(m.read for m in micro)), float(sum(m.outputs for m in micro))
    )
    return StepShares([m.scored * parallel.world_size / max(scored, 1.0) for m in micro], int(read), int(outputs))


@torch.no_grad()
def validation_loss(
    model: GPT, batches: list[Batch], device: torch.device, dtype: torch.dtype, parallel: Parallel | None = None
) -> float:
    """Token-weighted mean loss over a fixed list of batches (each rank takes its rows; sums are reduced)."""
    parallel = parallel or Parallel()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        x, y = parallel.local_rows(batch)
        n, sparse = scored_positions(y)
        if n == 0 and not parallel.active:  # under torchrun every rank runs the forward (FSDP gathers in it)
            continue
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            loss = batch_loss(model, x, y, sparse)
        total += float(loss) * n
        count += n
    model.train(was_training)
    total, count = parallel.sum(total, count)
    return total / max(count, 1)


class StopRequest:
    """Turns SIGINT/SIGTERM and the run's STOP file into a request to stop after the current step.

    A second Ctrl-C aborts at once.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if self.run.stop_file.exists():  # left from when nothing was training: it must not end this stage
            self.run.stop_file.unlink(missing_ok=True)
            log.warning("%s: ignoring a STOP file written before this stage started", self.run.stop_file)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.reason == "interrupted":
            raise KeyboardInterrupt
        self.reason = "interrupted"
        log.warning(
            "stop requested (%s): finishing this step and saving a checkpoint; press Ctrl-C again to abort",
            signal.Signals(signum).name,
        )

    def check(self) -> str | None:
        if self.reason is None and self.run.stop_file.exists():
            self.run.stop_file.unlink(missing_ok=True)  # consumed: the next stage starts normally
            self.reason = "stop_file"
            log.warning("STOP file found: finishing this stage after saving a checkpoint")
        return self.reason


# --------------------------------------------------------------------------- the loop


def train_stage(
    model: GPT,
    train_data: BatchSource,
    val_data: BatchSource,
    cfg: TrainConfig,
    run: RunDir,
    stage: str,
    total_steps: int,
    resume: bool = False,
    seed: int = 0,
    on_start: Callable[[], None] | None = None,
    checkpoint_info: dict[str, Any] | None = None,
) -> StageResult:
    """Train `model` for `total_steps` optimizer steps (or until early stopping / a stop request).

    `on_start` is called once the device, the optimizer and the resume point have been accepted, before the
    first step (the pipeline saves the run's config.toml there). `checkpoint_info` is added to every
    checkpoint's state (the pipeline records the tokenizer's hash there).

    Under torchrun (cfg.distributed = ddp | fsdp) every rank runs this; each trains on its rows of the
    global batch and only rank 0 writes metrics, plots and checkpoints. The process that writes (rank 0:
    torchrun's RANK, known before the process group is joined) holds the run's lock meanwhile, so a second
    trainer of the same run directory is refused.
    """
    with run_lock(run, stage) if torchrun_rank() == 0 else contextlib.nullcontext():
        return _train_stage(
            model, train_data, val_data, cfg, run, stage, total_steps, resume, seed, on_start, checkpoint_info
        )


def _train_stage(
    model: GPT,
    train_data: BatchSource,
    val_data: BatchSource,
    cfg: TrainConfig,
    run: RunDir,
    stage: str,
    total_steps: int,
    resume: bool,
    seed: int,
    on_start: Callable[[], None] | None,
    checkpoint_info: dict[str, Any] | None,
) -> StageResult:
    control = LiveControl(run, cfg)
    cfg = control.cfg  # a copy that control.toml changes in place
    parallel = Parallel.for_config(cfg)
    if cfg.batch_size % parallel.world_size:
        raise LmforgeError(
            f"{stage}.batch_size {cfg.batch_size} is not a multiple of the {parallel.world_size} "
            "processes: each trains an equal share of the global batch"
        )
    device = parallel.device(resolve_device(cfg.device))
    keep_freed_memory()  # every step reallocates the same tensors: keep the memory rather than fault it in again
    dtype = resolve_dtype(cfg.dtype, device)
    precision = str(dtype).removeprefix("torch.")  # what `auto` resolved to here: recorded in checkpoints and metrics
    enable_tf32(device)
    model.to(device)
    step, tokens, best, bad_evals, last_val = 0, 0, math.inf, 0, math.nan
    torch.manual_seed(seed + parallel.rank)  # distinct dropout masks per rank

    last_ckpt = run.checkpoint("last")
    if resume:
        state = read_state(last_ckpt)
        if state.get("stage") != stage:
            raise LmforgeError(f"{last_ckpt}: last checkpoint is from stage '{state.get('stage')}', not '{stage}'")
        load_weights(model, last_ckpt)  # full weights, before any sharding
    # padded QA batches (fine-tuning): their shapes vary from step to step, and only their real tokens count
    # in tokens, tokens/s and MFU
    pad_id = getattr(train_data, "pad_id", None)
    engine = parallel.wrap(model, cfg, varying_shapes=pad_id is not None)
    optimizer = make_optimizer(model, cfg, device)
    if resume:
        if state.get("optimizer", cfg.optimizer) != cfg.optimizer:
            raise LmforgeError(
                f"{last_ckpt}: trained with optimizer '{state['optimizer']}', the recipe says "
                f"{stage}.optimizer = '{cfg.optimizer}' (resume with the same optimizer)"
            )
        trainer = load_trainer_state(last_ckpt, state)
        try:
            if state.get("optimizer_format") == "sharded":
                optimizer.load_sharded(checkpoint_dir(last_ckpt) / SHARDED_OPTIMIZER)
            else:
                optimizer.load_state_dict(trainer["optimizer"])
            saved_ranks = restore_rng_state(trainer, parallel.rank, seed, state["step"])
            train_data.load_state_dict(trainer["data"])
            step, tokens = state["step"], state["tokens"]
            best, bad_evals = state["best_val_loss"], state["bad_evals"]
            last_val = state.get("val_loss", math.nan)  # shown until the next evaluation
        except (KeyError, ValueError, TypeError) as exc:  # a checkpoint of another lmforge version
            raise LmforgeError(
                f"{last_ckpt}: cannot resume from this checkpoint ({type(exc).__name__}: {exc}); it "
                "was written by another lmforge version (start a new run)"
            ) from None
        log.info("%s: resumed from %s at step %d", stage, last_ckpt, step)
        if saved_ranks != parallel.world_size and parallel.is_main:
            log.warning(
                "%s: the checkpoint holds the RNG (dropout) streams of %d rank(s), resuming on %d: %s",
                stage,
                saved_ranks,
                parallel.world_size,
                f"rank(s) {saved_ranks}..{parallel.world_size - 1} start new streams seeded from (seed, rank, step)"
                if saved_ranks < parallel.world_size
                else f"the streams of rank(s) {parallel.world_size}..{saved_ranks - 1} are not continued",
            )
        if restored := control.restore(state.get("control", {})):
            log.info("%s: control values in effect: %s", stage, describe(restored))
    if cfg.dropout >= 0:
        model.set_dropout(cfg.dropout)
    if on_start is not None:
        on_start()

    val_batches = val_data.fixed_batches(cfg.eval_batches)
    # TensorBoard hides what an earlier attempt logged from here on: a resume redoes the steps after its checkpoint
    purge = {stage: step + 1 if resume else 0}
    metrics = MetricsLogger(run.metrics, run.tensorboard, purge) if parallel.is_main else NullMetrics()
    mfu_meter = MFUMeter(model.cfg, model.num_parameters(), device, dtype, quiet=not parallel.is_main)
    if step == 0:
        metrics.log({"event": f"{stage}_start", "stage": stage, "step": 0, "label": f"{stage} start"})

    def checkpoint(name: str, with_trainer: bool) -> None:
        # gathering full weights and writing optimizer shards are collective under FSDP: every rank takes part
        weights = parallel.full_state_dict(model)
        trainer, shards = None, None
        if with_trainer:
            trainer = {"rng": rng_state(), "data": train_data.state_dict()}
            rngs = parallel.gather(rng_state())  # each rank's own dropout stream (a collective)
            if parallel.world_size > 1 and parallel.is_main:
                trainer["rng_ranks"] = rngs
            if parallel.mode == "fsdp":  # each rank writes its own optimizer shards: nothing is gathered
                shards = parallel.fresh_shared_dir(run.checkpoints / f".optimizer-{name}")
                optimizer.save_sharded(shards)
            else:
                trainer["optimizer"] = optimizer.state_dict()
        if not parallel.is_main:  # rank 0 alone writes the run directory
            return
        state = {
            "stage": stage,
            "step": step,
            "tokens": tokens,
            "best_val_loss": best,
            "bad_evals": bad_evals,
            "total_steps": total_steps,
            "val_loss": last_val,
            "control": control.overrides,
            "optimizer": cfg.optimizer,
            "optimizer_format": "sharded" if shards else "full",
            "dtype": precision,
            **(checkpoint_info or {}),
        }
        save_checkpoint(run.checkpoint(name), model, state, trainer, weights=weights, sharded_optimizer=shards)
        if with_trainer:  # ranks read the same stream in step: one deleter is enough
            _data_hook(train_data, "checkpoint_saved")  # e.g. shards consumed before this point may go
        if name == "last":
            keep_recent(run.checkpoints, stage, step, cfg.keep_checkpoints)

    evaluated_step = -1

    def evaluate_now(counts_for_patience: bool = True) -> bool:
        """Evaluate, keep the best checkpoint, return True when patience is exhausted."""
        nonlocal best, bad_evals, last_val, evaluated_step
        last_val = validation_loss(model, val_batches, device, dtype, parallel)
        evaluated_step = step
        improved = last_val < best
        if improved:
            best = last_val
            checkpoint("best", with_trainer=False)
        if counts_for_patience:
            bad_evals = 0 if improved else bad_evals + 1
        metrics.log(
            {
                "stage": stage,
                "step": step,
                "split": "val",
                "loss": last_val,
                "tokens": tokens,
                "perplexity": math.exp(min(last_val, 50)),
                "best": best,
            }
        )
        return cfg.patience > 0 and bad_evals >= cfg.patience

    def between_steps(requested: str | None) -> tuple[dict[str, Any], str | None]:
        """Rank 0 reads control.toml unless a stop is requested or the stage is over; every rank learns
        its changes and whether any rank was asked to stop (one collective under torchrun)."""
        changes: dict[str, Any] = {}
        if parallel.is_main and requested is None and step < total_steps:
            changes = control.poll(metrics, stage, step)
        return parallel.between_steps(control, changes, requested)

    model.train()
    stop_reason = "completed"
    bar = tqdm(
        total=total_steps, initial=step, desc=stage, unit="step", dynamic_ncols=True, disable=not parallel.is_main
    )
    window_tokens, window_outputs, window_start = 0, 0, time.time()
    try:
        with StopRequest(run) as stop:
            if step == 0:
                evaluate_now()
            changes, _ = between_steps(None)
            window_start = time.time()  # the first window starts with the first step, not before evaluation
            while step < total_steps:
                if "dropout" in changes:
                    model.set_dropout(cfg.dropout)
                if "eval_batches" in changes:
                    val_batches = val_data.fixed_batches(cfg.eval_batches)
                lr = lr_at(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
                optimizer.set_lr(cfg, lr / cfg.lr)
                loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per micro-step
                micro = [
                    MicroBatch.of(parallel.local_rows(train_data.next_batch()), pad_id) for _ in range(cfg.grad_accum)
                ]
                # padded QA batches score and read different numbers of tokens: weigh and count them by token
                shares = step_shares(micro, parallel, uneven=pad_id is not None)
                for i, (mb, weight) in enumerate(zip(micro, shares.weights, strict=True)):
                    x, y = mb.x.to(device, non_blocking=True), mb.y.to(device, non_blocking=True)
                    with parallel.grad_sync(model, i == cfg.grad_accum - 1), autocast(device, dtype):
                        loss = batch_loss(engine, x, y, mb.sparse) * weight
                    loss.backward()
                    loss_sum += loss.detach()
                tokens += shares.tokens
                window_tokens += shares.tokens
                window_outputs += shares.outputs
                grad_norm = None
                if cfg.grad_clip > 0:
                    grad_norm = clip_grad_norm(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum = parallel.mean(float(loss_sum))  # the step's one wait for the device
                for event in _data_hook(train_data, "pop_events") or []:  # e.g. a data phase change
                    metrics.log({"stage": stage, "step": step, **event})
                if not math.isfinite(loss_sum):
                    raise LmforgeError(f"{stage}: loss became {loss_sum} at step {step} (lower the learning rate)")
                if step % cfg.log_interval == 0 or step == total_steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    tok_s = window_tokens / elapsed
                    record = {
                        "stage": stage,
                        "step": step,
                        "split": "train",
                        "loss": loss_sum,
                        "tokens": tokens,
                        "lr": lr,
                        "tokens_per_s": round(tok_s, 1),
                        "memory_mb": memory_mb(device),
                        "dtype": precision,
                    }
                    if optimizer.kind == "muon":
                        record["muon_lr"] = lr / cfg.lr * cfg.muon_lr
                    mfu = mfu_meter.mfu(tok_s / parallel.world_size, window_outputs / max(window_tokens, 1))
                    if mfu is not None:
                        record["mfu"] = round(mfu, 4)
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    metrics.log(record)
                    bar.set_postfix(
                        loss=f"{loss_sum:.3f}",
                        val=f"{last_val:.3f}",
                        lr=f"{lr:.1e}",
                        tok_s=f"{tok_s:,.0f}",
                        **({"mfu": f"{mfu:.0%}"} if mfu is not None else {}),
                    )
                    window_tokens, window_outputs, window_start = 0, 0, time.time()
                bar.update(1)
                paused = time.time()  # evaluation and checkpoints stay out of the tokens/s window
                if step % cfg.eval_interval == 0 or step == total_steps:
                    if evaluate_now():
                        stop_reason = "early_stopping"
                        log.info(
                            "%s: early stopping at step %d (no improvement in %d evaluations)",
                            stage,
                            step,
                            cfg.patience,
                        )
                if step % cfg.checkpoint_interval == 0:
                    checkpoint("last", with_trainer=True)
                window_start += time.time() - paused
                if stop_reason == "completed":
                    changes, requested = between_steps(stop.check())
                    stop_reason = requested or stop_reason
                if stop_reason != "completed":
                    break
            if stop_reason in STOP_REQUESTS and evaluated_step != step:
                # the stopped model competes for `best` (what fine-tuning starts from); patience counts only
                # the scheduled evaluations, as in an uninterrupted run
                evaluate_now(counts_for_patience=False)
                log.info("%s: stopped at step %d: val loss %.4f (best %.4f)", stage, step, last_val, best)
            checkpoint("last", with_trainer=True)
        if parallel.is_main:
            control.archive(stage)
    finally:
        bar.close()
        _data_hook(train_data, "close")  # e.g. stop a prefetching thread
        metrics.log({"event": f"{stage}_end", "stage": stage, "step": step, "label": f"{stage} end: {stop_reason}"})
        metrics.close()
        if parallel.is_main:
            plot_losses(run.metrics, run.plots / "loss.png", title=run.root.name)
    return StageResult(stage, step, tokens, best, last_val, stop_reason)
