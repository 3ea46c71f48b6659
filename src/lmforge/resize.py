"""Vocabulary resize: move a run to a new tokenizer, keeping what the model learned.

Every checkpoint of the run gets an embedding (and tied output) matrix of the new size. A token
that both tokenizers have keeps its learned row (and its optimizer moments), matched by token
string, so a retrained tokenizer whose ids moved still maps correctly; new tokens start at the mean
embedding. The token shards are re-tokenized, config.toml and tokenizer.json are updated, and
training continues with `--resume` from where it was (step, schedule, optimizer, data position).

Each file is replaced atomically and checkpoints already resized are skipped (they carry the new
tokenizer's hash), so an interrupted resize is finished by running the same command again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from lmforge.config import Recipe, save_recipe, validate
from lmforge.data.shards import prepare_shards, shards_fingerprint, tokenizer_hash
from lmforge.data.sources import data_dir_from_env
from lmforge.errors import ConfigError, LmforgeError
from lmforge.model import GPT, GPTConfig
from lmforge.rundir import RunDir
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.checkpoint import (
    list_checkpoints,
    load_trainer_state,
    load_weights,
    read_state,
    save_checkpoint,
)
from lmforge.train.metrics import MetricsLogger, plot_losses

log = logging.getLogger("lmforge")

EMBEDDING = "tok_emb.weight"  # the tied input/output matrix, the only parameter whose shape follows the vocabulary


def token_row_map(old: Tokenizer, new: Tokenizer, new_rows: int) -> list[int]:
    """For each row of the new embedding, the old row of the same token string, or -1 (a new token)."""
    old_ids = old.hf.get_vocab()
    rows = [old_ids.get(new.id_to_token(i), -1) for i in range(new.vocab_size)]
    return rows + [-1] * (new_rows - len(rows))  # rows past the tokenizer (a padded vocabulary)


def _resize_rows(t: torch.Tensor, rows: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    out = fill.expand(len(rows), *t.shape[1:]).clone()
    kept = rows >= 0
    out[kept] = t[rows[kept]]
    return out


def _resize_optimizer(opt_state: dict, old_rows: int, rows: list[int]) -> dict:
    """Optimizer state (keyed by parameter name) after the embedding is resized: its moments follow
    their rows, new rows start at zero as a fresh parameter's would; every other parameter keeps its state."""
    index = torch.tensor(rows, dtype=torch.long)
    emb = opt_state["state"].get(EMBEDDING)
    if emb is not None:
        opt_state["state"][EMBEDDING] = {
            k: _resize_rows(v, index, torch.zeros(1, *v.shape[1:], dtype=v.dtype))
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == old_rows else v
            for k, v in emb.items()}
    return opt_state


def resize_checkpoint(path: Path, rows: list[int], new_hash: str, shards: str = "") -> bool:
    """Resize one checkpoint in place (atomically); a pretraining checkpoint's shards become `shards` (the
    fingerprint of the re-tokenized ones). False when it already has the new vocabulary."""
    state = read_state(path)
    if state.get("tokenizer_hash") == new_hash:
        return False
    model = GPT(GPTConfig(**state["model_config"]))
    load_weights(model, path)
    trainer = None
    if "trainer" in state:
        trainer = load_trainer_state(path, state)
        trainer["optimizer"] = _resize_optimizer(trainer["optimizer"], model.cfg.vocab_size, rows)
        # losses under another tokenizer are not comparable: early stopping starts over
        state["best_val_loss"], state["bad_evals"] = math.inf, 0
    model.resize_vocab(len(rows), rows)
    state = {k: v for k, v in state.items() if k not in ("trainer", "model_config")}
    state["tokenizer_hash"] = new_hash
    if state.get("shards") and shards:
        state["shards"] = shards
    save_checkpoint(path, model, state, trainer)
    return True


def resized_recipe(recipe: Recipe, vocab_size: int) -> Recipe:
    """The run's recipe for a tokenizer of `vocab_size` tokens (the model's vocabulary follows it), validated:
    an impossible one is refused before anything is changed."""
    new = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=0),
                              tokenizer=dataclasses.replace(recipe.tokenizer, vocab_size=vocab_size))
    try:
        return validate(new)
    except ConfigError as exc:
        raise LmforgeError(f"cannot resize the vocabulary to {vocab_size} tokens: {exc}") from None


def retrain_tokenizer(recipe: Recipe, vocab_size: int, data_dir: str | Path | None = None) -> Tokenizer:
    """A tokenizer trained like the run's (same sources and sample) with another vocabulary size."""
    from lmforge.pipeline import tokenizer_sample

    t = resized_recipe(recipe, vocab_size).tokenizer
    return train_tokenizer(tokenizer_sample(recipe, data_dir_from_env(data_dir)), t.vocab_size, t.sample_chars,
                           t.min_frequency)


def resize_vocab(recipe: Recipe, run: RunDir, new_tok: Tokenizer, data_dir: str | Path | None = None) -> dict:
    """Move run `run` to tokenizer `new_tok`: shards, every checkpoint, tokenizer.json, config.toml, a plot marker."""
    from lmforge.pipeline import model_config

    run.require()
    old_tok = Tokenizer.load(run.tokenizer)
    new_hash = tokenizer_hash(new_tok)
    if new_hash == tokenizer_hash(old_tok):
        raise LmforgeError(f"{run.tokenizer}: the new tokenizer is the same as the run's")
    new_recipe = resized_recipe(recipe, new_tok.vocab_size)
    new_rows = model_config(new_recipe, new_tok).vocab_size
    rows = token_row_map(old_tok, new_tok, new_rows)
    kept = sum(r >= 0 for r in rows)
    checkpoints = list_checkpoints(run.checkpoints)
    old_rows = read_state(checkpoints[0])["model_config"]["vocab_size"] if checkpoints else old_tok.vocab_size
    log.info("resize-vocab: %d -> %d rows, %d tokens keep their learned rows", old_rows, new_rows, kept)
    manifest = prepare_shards(new_recipe.data, new_tok, data_dir_from_env(data_dir), run.data)
    resized = [p.name for p in checkpoints if resize_checkpoint(p, rows, new_hash, shards_fingerprint(manifest))]
    new_tok.save(run.tokenizer)
    save_recipe(new_recipe, run.config)
    last = read_state(run.checkpoint("last")) if (run.checkpoint("last") / "model.safetensors").is_file() else {}
    metrics = MetricsLogger(run.metrics, run.tensorboard)
    metrics.log({"event": "resize_vocab", "stage": last.get("stage", "pretrain"), "step": last.get("step", 0),
                 "label": f"vocab {old_rows} -> {new_rows}", "old_vocab": old_rows, "new_vocab": new_rows,
                 "kept_rows": kept})
    metrics.close()
    plot_losses(run.metrics, run.plots / "loss.png", title=run.root.name)
    return {"old_vocab": old_rows, "new_vocab": new_rows, "kept_rows": kept, "checkpoints": resized}
