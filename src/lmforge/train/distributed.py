"""Scale-out on PyTorch's own engines: DDP or FSDP2 (`fully_shard`) under `torchrun`.

The same recipe runs on one process or many: `torchrun --nproc-per-node N -m lmforge.cli pretrain
--distributed ddp|fsdp ...`. The recipe's `batch_size` stays the *global* batch: every rank draws the
same global batch from the same data stream and trains on its own rows of it, so N processes follow the
loss trajectory of one process with the same recipe, and the data position in a checkpoint is valid
for any world size. Only rank 0 writes metrics, plots and checkpoints' weights (full, gathered: what
evaluation, serving and export read); under FSDP the optimizer state (two thirds of a checkpoint) is
written sharded, each rank its own shards, with torch.distributed.checkpoint. Checkpoints load in any
world size, a single process included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.model import Block
from lmforge.torchrun_env import launched_by_torchrun, torchrun_processes
from lmforge.train.control import CONTROL_KEYS, LiveControl

log = logging.getLogger("lmforge")

MODES = ("none", "ddp", "fsdp")
LONG_WAIT = timedelta(days=1)  # how long ranks wait for rank 0's on_main work (tokenizer, shards)
_WAIT_GROUP: dist.ProcessGroup | None = None  # the gloo group with that timeout, made with the default group
STOP_REASONS = (None, "interrupted", "stop_file")  # a stop request's code in the per-step all_reduce (MAX wins)
Batch = tuple[torch.Tensor, torch.Tensor]


def stop_code(reason: str | None) -> int:
    """A stop reason as a number for the per-step all_reduce; an unknown reason counts as an interruption."""
    return STOP_REASONS.index(reason) if reason in STOP_REASONS else STOP_REASONS.index("interrupted")


def join_torchrun(*modes: str) -> None:
    """Join torchrun's process group for training stages of these `modes` (ddp/fsdp), before anything is shared
    between ranks. Several processes where a stage says `none` are refused: each would train the same run on
    its own, writing the same files."""
    processes = torchrun_processes()
    if processes > 1 and "none" in modes:
        raise LmforgeError(
            f"launched by torchrun with {processes} processes but distributed = none: add "
            "--distributed ddp or --distributed fsdp (otherwise every process trains the run on its own)"
        )
    init_distributed(next((m for m in modes if m != "none"), "none"))


def init_distributed(mode: str) -> None:
    """Join torchrun's process group (env:// rendezvous) for `ddp`/`fsdp`; nothing for `none`.

    The default group times out as torch's does (env LMFORGE_DIST_TIMEOUT_S changes it); `on_main` waits on a
    second, gloo group with a day's timeout, as rank 0 alone may tokenize and shard a corpus for hours."""
    global _WAIT_GROUP
    if mode not in MODES:
        raise LmforgeError(f"--distributed must be one of {', '.join(MODES)}, not '{mode}'")
    if mode == "none" or dist.is_initialized():
        return
    if not launched_by_torchrun():
        raise LmforgeError(
            f"--distributed {mode} needs the torchrun launcher, e.g. "
            f"torchrun --nproc-per-node 2 -m lmforge.cli pretrain --distributed {mode} --run-dir RUN"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # on GPUs, NCCL carries the CUDA tensors (gradients, shards) and gloo the small CPU ones (loss sums,
    # the per-step control/stop flags), which NCCL would reject
    timeout = os.environ.get("LMFORGE_DIST_TIMEOUT_S")
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
        timeout=timedelta(seconds=float(timeout)) if timeout else None,
    )
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    log.info("distributed (%s): rank %d of %d", mode, dist.get_rank(), dist.get_world_size())


def shutdown_distributed() -> None:
    global _WAIT_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _WAIT_GROUP = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only (file-writing stages); every rank waits for it, however long it takes (should
    rank 0 fail, torchrun ends the others). Returns its result on rank 0."""
    result = fn(*args, **kwargs) if is_main() else None
    if dist.is_initialized():
        dist.barrier(group=_WAIT_GROUP)
    return result


def from_main(value):
    """Rank 0's value of a small picklable object (e.g. a timestamped run name) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Parallel:
    """How this process takes part in training: its rank, the world, and the engine wrapping the model."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    ddp: nn.Module | None = None

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> Parallel:
        if cfg.distributed != "none" and not launched_by_torchrun():
            # e.g. resuming a torchrun run's checkpoint on one machine: its config says ddp/fsdp
            log.warning("distributed = %s but not launched by torchrun: training in this one process", cfg.distributed)
            return cls()
        join_torchrun(cfg.distributed)
        if cfg.distributed == "none" or not dist.is_initialized():
            return cls()
        return cls(cfg.distributed, dist.get_rank(), dist.get_world_size())

    @property
    def active(self) -> bool:
        return self.world_size > 1 or self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each rank on its own GPU (torchrun's LOCAL_RANK); CPU ranks share the CPU."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    # ------------------------------------------------------------------ the model

    def wrap(self, model: nn.Module, cfg: TrainConfig, varying_shapes: bool = False) -> nn.Module:
        """Activation checkpointing, then DDP or FSDP2, then torch.compile; returns the module to train with.

        `model` itself stays the module whose parameters the optimizer and checkpoints use (FSDP2
        shards it in place; DDP and compile wrap it). With `varying_shapes` (fine-tuning's batches, whose
        length and, at an epoch's end, row count change) the model is compiled for symbolic shapes at once:
        by default torch.compile first specialises to the first batch's shape and then compiles again for each
        dimension that changes (on an H100 these two recompiles took 27 s and 36 s of a 4-minute fine-tuning).
        """
        if cfg.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
            )

            apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
        engine = model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            engine = self.ddp
        elif self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for tensor in model.state_dict().values():  # shards must come from one initialisation
                dist.broadcast(tensor, src=0)
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        if cfg.compile:
            engine = torch.compile(engine, dynamic=True if varying_shapes else None)
        return engine

    def grad_sync(self, model: nn.Module, enabled: bool):
        """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
        if self.mode == "ddp" and not enabled:
            return self.ddp.no_sync()
        if self.mode == "fsdp":
            model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Unsharded FSDP weights on CPU (on rank 0; collective, so every rank calls it); None when the
        model is not sharded (its own state_dict is already full)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.mode != "fsdp":
            return None
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def fresh_shared_dir(self, path: Path) -> Path:
        """An empty directory at `path` that every rank may write into (rank 0 clears it; all wait)."""
        if self.is_main:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        if self.active:
            dist.barrier()
        return path

    # ------------------------------------------------------------------ data and reductions

    def local_rows(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch, spread evenly. A batch with fewer rows than ranks (the last of a
        QA epoch) gives the ranks left over a copy of a row with nothing scored: every rank still runs a step
        (DDP and FSDP need each one in the collectives), and each scored token counts once."""
        if not self.active:
            return batch
        x, y = batch
        n = x.shape[0]
        if n >= self.world_size:
            return x.tensor_split(self.world_size)[self.rank], y.tensor_split(self.world_size)[self.rank]
        if self.rank < n:
            return x[self.rank : self.rank + 1], y[self.rank : self.rank + 1]
        return x[:1], torch.full_like(y[:1], -100)

    def sum(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, value: float) -> float:
        return self.sum(value)[0] / self.world_size

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` (a small picklable object, e.g. its RNG state) in rank order on rank 0, None on
        the others; a collective. One process: [value]."""
        if not self.active:
            return [value]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def between_steps(
        self, control: LiveControl, changes: dict[str, Any], stop: str | None
    ) -> tuple[dict[str, Any], str | None]:
        """Share what decides the next step: rank 0's control-file `changes` and any rank's `stop` request.

        Returns (the changes this rank applies, the stop reason every rank agrees on). One small tensor
        all_reduce per step carries [rank 0 changed control values, stop code]; rank 0 broadcasts its control
        values only in the steps where they changed. A stop seen by any rank stops every rank after the same
        step (else they would deadlock). One process shares nothing: no collective.
        """
        if not self.active:
            return changes, stop
        flags = torch.tensor([int(self.is_main and bool(changes)), stop_code(stop)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        changed, code = flags.tolist()
        if changed:
            changes = self._follow_main(control, changes)
        return changes, STOP_REASONS[code]

    def _follow_main(self, control: LiveControl, changes: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's control values on every rank, so that all change at the same step (a collective)."""
        values = from_main({k: getattr(control.cfg, k) for k in CONTROL_KEYS} if self.is_main else None)
        return changes if self.is_main else control.restore(values)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; works on plain and on FSDP2-sharded (DTensor) gradients. Returns the
    norm before clipping as a tensor on the device (reading it waits for the device: do so when logging)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.detach()
