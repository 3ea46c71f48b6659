"""Optimizers: AdamW (the default, as the seed) or Muon for the hidden matrices with AdamW for the rest.

Muon (torch.optim.Muon) orthogonalizes the momentum of 2-D weight matrices; it is meant for the hidden
layers only, so, as in modded-nanogpt and nanochat, the embedding (tied to the output), the norms and
anything not 2-D stay with AdamW. Both optimizers are stepped together behind one small object.

Optimizer state is saved keyed by parameter name (torch.distributed.checkpoint's state-dict helpers), so
a checkpoint written in one world size loads in any other. One process (and DDP) saves it whole; FSDP
saves it sharded, each rank its own shards (save_sharded), which DCP reshards when it is loaded.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError

OPTIMIZERS = ("adamw", "muon")


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """2-D weights inside the transformer blocks (not the tied embedding / output matrix)."""
    return p.dim() == 2 and "tok_emb" not in name and "lm_head" not in name


def fused_adamw_available(device: torch.device, params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW kernel runs on CUDA and CPU for plain floating-point tensors."""
    from torch.distributed.tensor import DTensor

    if device.type not in ("cuda", "cpu"):
        return False
    # sharded (FSDP2) parameters take the foreach path: it is the one DTensor supports everywhere
    return not any(isinstance(p, DTensor) for p in params)


@contextlib.contextmanager
def _reading_shards(path: Path):
    """Missing or foreign optimizer shards as one clear line naming `path`."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (CheckpointException, OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, CheckpointException) and exc.failures:  # a rank's own error, not the wrapper's
            exc = next(iter(exc.failures.values()))[0]
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise LmforgeError(f"{path}: cannot read the optimizer shards ({type(exc).__name__}: {reason})") from None


def read_sharded(path: Path, kind: str) -> dict[str, Any]:
    """The optimizer state that Optimizers.save_sharded wrote under `path`, whole, in this one process and without
    a model or a process group (DCP's own single-process loader): the full format of Optimizers.state_dict(),
    keyed by parameter name, for tools that rewrite checkpoints (resize-vocab)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if not path.is_dir():
        raise LmforgeError(f"{path}: cannot read the optimizer shards (the directory is missing)")
    with _reading_shards(path), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        state = _load_state_dict_from_keys("optimizer", checkpoint_id=str(path))
    if not isinstance(state.get("optimizer"), dict) or not {"state", "param_groups"} <= set(state["optimizer"]):
        raise LmforgeError(f"{path}: cannot read the optimizer shards (no optimizer state in them)")
    return {"kind": kind, **state["optimizer"]}


class Optimizers:
    """One or two torch optimizers stepped together; each param group follows one peak-lr config field."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], kind: str):
        self.model = model
        self.optimizers = optimizers
        self.kind = kind

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr(self, cfg: TrainConfig, factor: float) -> None:
        """Every group's lr = its peak (cfg.lr or cfg.muon_lr, read now so live changes apply) * factor."""
        for group in self.param_groups:
            group["lr"] = getattr(cfg, group["lr_field"]) * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) state keyed by parameter name; collective under FSDP (call on every rank)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, self.optimizers, options=options)
        return {"kind": self.kind, **state}

    def save_sharded(self, path: Path) -> None:
        """Write the state with torch.distributed.checkpoint (DCP): under FSDP each rank writes its own
        shards, nothing is gathered; collective (call on every rank). Loads in any world size."""
        import torch.distributed.checkpoint as dcp

        dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizers)}, checkpoint_id=str(path))

    def load_sharded(self, path: Path) -> None:
        """Read state written by save_sharded, in this process's world size (one process included): DCP
        reshards it to this model's (sharded or whole) parameters."""
        import torch.distributed.checkpoint as dcp

        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizers)}  # allocated, to be filled
        with _reading_shards(path), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: meant
            dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(self.model, self.optimizers, state["optimizer"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        kind = state.pop("kind", "adamw")
        if kind != self.kind:
            raise LmforgeError(
                f"checkpoint optimizer is '{kind}' but the recipe asks for '{self.kind}' "
                "(resume with the same optimizer, or start a new stage)"
            )
        set_optimizer_state_dict(self.model, self.optimizers, state, options=StateDictOptions(full_state_dict=True))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW (weight decay on hidden matrices only) or Muon + AdamW, per `cfg.optimizer`."""
    if cfg.optimizer not in OPTIMIZERS:
        raise LmforgeError(f"optimizer '{cfg.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    hidden, other_matrices, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_hidden_matrix(name, p):
            hidden.append(p)
        elif p.dim() >= 2:
            other_matrices.append(p)
        else:
            rest.append(p)
    adamw_groups = [{"params": rest + other_matrices, "weight_decay": 0.0, "lr_field": "lr"}]
    optimizers: list[torch.optim.Optimizer] = []
    if cfg.optimizer == "muon":
        muon = torch.optim.Muon(
            [{"params": hidden, "lr_field": "muon_lr"}],
            lr=cfg.muon_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
        )
        optimizers.append(muon)
    else:
        adamw_groups.insert(0, {"params": hidden, "weight_decay": cfg.weight_decay, "lr_field": "lr"})
    params = [p for g in adamw_groups for p in g["params"]]
    fused = fused_adamw_available(device, params)
    optimizers.insert(0, torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused))
    return Optimizers(model, optimizers, cfg.optimizer)
