"""Checkpoints: safetensors tensors + JSON state, never pickle; written atomically.

A checkpoint directory `checkpoints/<name>/` holds
  model.safetensors    the weights (the tied output matrix is stored once, as the embedding)
  trainer.safetensors  optimizer moments, RNG states and tensor-valued data positions (resume only)
  optimizer/           instead of the moments in trainer.safetensors, under FSDP: the optimizer state as
                       torch.distributed.checkpoint shards, one file per rank (resume only, any world size)
  state.json           stage, step, tokens, model config, optimizer hyper-parameters, data position,
                       early-stopping state
The directory is written under a staging name and swapped into place, so a crash mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_json, existing_dir, replace_dir
from lmforge.model import GPT, GPTConfig

TIED_KEY = "lm_head.weight"
SHARDED_OPTIMIZER = "optimizer"  # the directory of a checkpoint's optimizer shards (FSDP)


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor in a nested dict/list into `tensors` (keyed by path), leaving JSON-able data."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_state(trainer: dict[str, Any], rank: int, seed: int, step: int) -> int:
    """Continue this rank's RNG (dropout) stream from a checkpoint's trainer state; returns how many ranks'
    streams it holds. Distributed runs save every rank's (`rng_ranks`), since each draws its own dropout masks;
    a rank the checkpoint has no stream for (more ranks than wrote it, or a 1-process checkpoint) starts one
    seeded from (seed, rank, step): distinct per rank and deterministic."""
    saved = trainer.get("rng_ranks") or [trainer["rng"]]
    if rank < len(saved):
        set_rng_state(saved[rank])
    else:
        torch.manual_seed(seed + rank + 1_000_003 * step)
    return len(saved)


def model_weights(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(path: Path) -> None:
    """Delete staging directories that a killed writer of checkpoint `path` left behind."""
    for staging in path.parent.glob(f".staging-{path.name}-*"):
        pid = staging.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def save_checkpoint(
    path: Path,
    model: GPT,
    state: dict[str, Any],
    trainer: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    sharded_optimizer: Path | None = None,
) -> None:
    """Write checkpoint `path` atomically. `state` must be JSON-able apart from tensors inside `trainer`.

    `weights` are the model's full weights when they were gathered elsewhere (FSDP shards); by default
    they are read from `model`. `sharded_optimizer`: a directory of optimizer shards the ranks wrote
    (Optimizers.save_sharded); it moves into the checkpoint as `optimizer/`, published with the rest.
    """
    _remove_dead_staging(path)
    staging = path.with_name(f".staging-{path.name}-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if weights is None:
            weights = model_weights(model)
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items() if k != TIED_KEY}
        save_file(weights, staging / "model.safetensors")
        full_state = dict(state)
        full_state["model_config"] = dataclasses.asdict(model.cfg)
        if trainer is not None:
            tensors: dict[str, torch.Tensor] = {}
            full_state["trainer"] = _split_tensors(trainer, "trainer", tensors)
            save_file(tensors, staging / "trainer.safetensors")
        if sharded_optimizer is not None:
            sharded_optimizer.rename(staging / SHARDED_OPTIMIZER)
        atomic_write_json(staging / "state.json", full_state)
        for f in staging.rglob("*"):  # make the data durable before the rename publishes it
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def checkpoint_dir(path: Path) -> Path:
    found = existing_dir(path)
    if found is None or not (found / "model.safetensors").is_file():
        raise LmforgeError(f"no checkpoint at {path}")
    return found


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """The checkpoint directories in `checkpoints` (best, last, pretrained, snapshots), sorted by name."""
    if not checkpoints.is_dir():
        return []
    return sorted(
        p
        for p in checkpoints.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and not p.name.endswith(".old")
        and (p / "model.safetensors").is_file()
    )


def read_state(path: Path) -> dict[str, Any]:
    path = checkpoint_dir(path)
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"{path / 'state.json'}: unreadable checkpoint state ({exc})") from None


def load_trainer_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    path = checkpoint_dir(path)
    try:
        tensors = load_file(path / "trainer.safetensors")
    except (OSError, SafetensorError) as exc:
        raise LmforgeError(f"{path / 'trainer.safetensors'}: unreadable ({exc})") from None
    return _join_tensors(state["trainer"], tensors)


def load_weights(model: GPT, path: Path) -> None:
    """Load checkpoint weights into `model`, refusing a checkpoint of another shape with one clear line."""
    path = checkpoint_dir(path)
    file = path / "model.safetensors"
    try:
        weights = load_file(file)
    except (OSError, SafetensorError) as exc:
        raise LmforgeError(f"{file}: unreadable weights ({exc})") from None
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED_KEY}
    for key, shape in expected.items():
        if key not in weights:
            raise LmforgeError(f"{file}: missing tensor '{key}' (checkpoint from another model shape?)")
        if tuple(weights[key].shape) != tuple(shape):
            raise LmforgeError(
                f"{file}: tensor '{key}' has shape {tuple(weights[key].shape)}, the model expects "
                f"{tuple(shape)} (checkpoint from another model shape)"
            )
    extra = set(weights) - set(expected)
    if extra:
        raise LmforgeError(f"{file}: unexpected tensors {sorted(extra)[:3]} (checkpoint from another model shape)")
    model.load_state_dict(weights, strict=False)


def model_from_checkpoint(path: Path) -> GPT:
    state = read_state(path)
    cfg = GPTConfig(**state["model_config"])
    model = GPT(cfg)
    load_weights(model, path)
    return model.eval()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def copy_checkpoint(src: Path, dst: Path, link: bool = False) -> None:
    """Copy checkpoint `src` to `dst` atomically (weights and state).

    link=True hard-links the files instead: free, and safe because checkpoints are never modified in
    place (a new save writes new files and swaps the directory).
    """
    src = checkpoint_dir(src)
    staging = dst.with_name(f".staging-{dst.name}-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(src, staging, copy_function=_link_or_copy if link else shutil.copy2)
    replace_dir(staging, dst)


def snapshot_name(stage: str, step: int) -> str:
    return f"{stage}-step-{step:07d}"


def keep_recent(checkpoints: Path, stage: str, step: int, keep: int) -> None:
    """Keep `checkpoints/last` as snapshot `<stage>-step-N` and delete all but the `keep` newest snapshots.

    Snapshots of later steps than `step` come from an earlier attempt that this one overwrote (a
    fresh start in the same run directory), so they go too.
    """
    if keep <= 0:
        return
    copy_checkpoint(checkpoints / "last", checkpoints / snapshot_name(stage, step), link=True)
    steps = {
        p: int(p.name.rsplit("-", 1)[1])
        for p in checkpoints.glob(f"{stage}-step-*")
        if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()
    }
    stale = [p for p, s in steps.items() if s > step]
    current = sorted((p for p, s in steps.items() if s <= step), key=steps.get)
    for old in stale + current[:-keep]:
        shutil.rmtree(old)
