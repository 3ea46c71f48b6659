"""Vocabulary resize: move a run to a new tokenizer, keeping what the model learned.

Every checkpoint of the run gets an embedding (and tied output) matrix of the new size. A token
that both tokenizers have keeps its learned row (and its optimizer moments), matched by token
string, so a retrained tokenizer whose ids moved still maps correctly; new tokens start at the mean
embedding. The token shards are re-tokenized, config.toml and tokenizer.json are updated, and
training continues with `--resume` from where it was (step, schedule, optimizer, data position).

Nothing in the run changes until every checkpoint has been resized and the shards made under staging
names; then each is swapped into place atomically, tokenizer.json last. Checkpoints and shards already
moved carry the new tokenizer's hash and are skipped, so an interrupted resize is finished by running the
same command again. FSDP checkpoints (optimizer state in DCP shards) are read whole in this one process and
written in the full format, which a resume reads in any world size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path

import torch

from lmforge.config import Recipe, save_recipe, validate
from lmforge.data.shards import has_shards, load_manifest, prepare_shards, shards_fingerprint, tokenizer_hash
from lmforge.data.sources import data_dir_from_env
from lmforge.errors import ConfigError, LmforgeError
from lmforge.io import atomic_write_json, replace_dir
from lmforge.model import GPT, GPTConfig
from lmforge.rundir import RunDir, run_lock
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.checkpoint import (
    SHARDED_OPTIMIZER,
    checkpoint_dir,
    list_checkpoints,
    load_trainer_state,
    load_weights,
    read_state,
    save_checkpoint,
)
from lmforge.train.metrics import MetricsLogger, plot_losses
from lmforge.train.optim import read_sharded

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
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == old_rows
            else v
            for k, v in emb.items()
        }
    return opt_state


def resized_checkpoint(
    path: Path, rows: list[int], old_hash: str, new_hash: str
) -> tuple[GPT, dict, dict | None] | None:
    """Checkpoint `path` resized in memory: (model, state, trainer state), or None when it already has the new
    vocabulary. Reads and checks everything it needs first, so a checkpoint that cannot be resized is a one-line
    error naming it. Sharded (FSDP) optimizer state is read whole and comes back in the full format, which a
    resume reads in any world size."""
    state = read_state(path)
    trained_with = state.get("tokenizer_hash")
    if trained_with == new_hash:
        return None
    if trained_with is not None and trained_with != old_hash:
        raise LmforgeError(
            f"{path}: trained with another tokenizer than the run's tokenizer.json (hash "
            f"{trained_with}, the run's is {old_hash}); cannot map its rows"
        )
    try:
        model = GPT(GPTConfig(**state["model_config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise LmforgeError(f"{path}: unreadable model config in state.json ({type(exc).__name__}: {exc})") from None
    load_weights(model, path)
    if max(rows) >= model.cfg.vocab_size:
        raise LmforgeError(
            f"{path}: {model.cfg.vocab_size} embedding rows, fewer than the run's tokenizer has "
            f"({max(rows) + 1}); cannot map its rows"
        )
    trainer = None
    if "trainer" in state:
        trainer = load_trainer_state(path, state)
        if state.get("optimizer_format") == "sharded":
            trainer["optimizer"] = read_sharded(
                checkpoint_dir(path) / SHARDED_OPTIMIZER, state.get("optimizer", "adamw")
            )
        if not isinstance(trainer.get("optimizer"), dict) or "state" not in trainer["optimizer"]:
            raise LmforgeError(f"{path}: no optimizer state in this checkpoint (written by another lmforge version?)")
        trainer["optimizer"] = _resize_optimizer(trainer["optimizer"], model.cfg.vocab_size, rows)
        # losses under another tokenizer are not comparable: early stopping starts over
        state["best_val_loss"], state["bad_evals"] = math.inf, 0
        state["optimizer_format"] = "full"
    model.resize_vocab(len(rows), rows)
    state = {k: v for k, v in state.items() if k not in ("trainer", "model_config")}
    state["tokenizer_hash"] = new_hash
    return model, state, trainer


def resized_recipe(recipe: Recipe, vocab_size: int) -> Recipe:
    """The run's recipe for a tokenizer of `vocab_size` tokens (the model's vocabulary follows it), validated:
    an impossible one is refused before anything is changed."""
    new = dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, vocab_size=0),
        tokenizer=dataclasses.replace(recipe.tokenizer, vocab_size=vocab_size),
    )
    try:
        return validate(new)
    except ConfigError as exc:
        raise LmforgeError(f"cannot resize the vocabulary to {vocab_size} tokens: {exc}") from None


def retrain_tokenizer(recipe: Recipe, vocab_size: int, data_dir: str | Path | None = None) -> Tokenizer:
    """A tokenizer trained like the run's (same sources and sample) with another vocabulary size."""
    from lmforge.pipeline import tokenizer_sample

    t = resized_recipe(recipe, vocab_size).tokenizer
    return train_tokenizer(
        tokenizer_sample(recipe, data_dir_from_env(data_dir)), t.vocab_size, t.sample_chars, t.min_frequency
    )


def _shards_hash(data: Path) -> str | None:
    """The tokenizer hash of finished shards in `data` (None: none, or unreadable)."""
    try:
        return load_manifest(data).get("tokenizer_hash") if has_shards(data) else None
    except LmforgeError:
        return None


def _staged(path: Path) -> Path:
    """Where a resized copy of checkpoint or data directory `path` is written before it replaces `path`."""
    return path.with_name(f".resized-{path.name}")


def resize_vocab(recipe: Recipe, run: RunDir, new_tok: Tokenizer, data_dir: str | Path | None = None) -> dict:
    """Move run `run` to tokenizer `new_tok`: shards, every checkpoint, tokenizer.json, config.toml, a plot marker.

    All or nothing: every checkpoint is resized and the shards are made under staging names (`.resized-*`)
    first, so a refusal or a failure there leaves the run as it was. Only then are they swapped into place,
    config.toml and tokenizer.json last; a run interrupted during the swaps still has its old tokenizer.json,
    and the same command finishes the job (what already has the new tokenizer is skipped). Holds the run's
    lock: no trainer writes the run meanwhile.
    """
    run.require()
    resized_recipe(recipe, new_tok.vocab_size)  # an impossible size is refused before the lock file is made
    with run_lock(run, "resize-vocab"):
        return _resize_vocab(recipe, run, new_tok, data_dir)


def _resize_vocab(recipe: Recipe, run: RunDir, new_tok: Tokenizer, data_dir: str | Path | None) -> dict:
    from lmforge.pipeline import model_config, run_data_dir

    old_tok = Tokenizer.load(run.tokenizer)
    old_hash, new_hash = tokenizer_hash(old_tok), tokenizer_hash(new_tok)
    if new_hash == old_hash:
        raise LmforgeError(f"{run.tokenizer}: the new tokenizer is the same as the run's")
    new_recipe = resized_recipe(recipe, new_tok.vocab_size)
    new_rows = model_config(new_recipe, new_tok).vocab_size
    rows = token_row_map(old_tok, new_tok, new_rows)
    kept = sum(r >= 0 for r in rows)
    checkpoints = list_checkpoints(run.checkpoints)
    pending = [p for p in checkpoints if read_state(p).get("tokenizer_hash") != new_hash]
    old_rows = read_state(pending[0])["model_config"]["vocab_size"] if pending else old_tok.vocab_size
    log.info("resize-vocab: %d -> %d rows, %d tokens keep their learned rows", old_rows, new_rows, kept)
    for stale in run.checkpoints.glob(_staged(Path("*")).name):  # from an interrupted attempt: made again
        shutil.rmtree(stale)
    # every checkpoint is resized under a staging name first (one that cannot be is refused before the long
    # re-tokenization), then the shards; nothing in the run changes until both are done
    staged: list[Path] = []
    staged_data = _staged(run.data)  # an interrupted attempt's shards there are resumed, not made again
    data_done = _shards_hash(run.data) == new_hash  # swapped in by an interrupted attempt
    try:
        for path in pending:
            model, state, trainer = resized_checkpoint(path, rows, old_hash, new_hash)
            save_checkpoint(_staged(path), model, state, trainer)
            staged.append(path)
        manifest = (
            load_manifest(run.data)
            if data_done
            else prepare_shards(new_recipe.data, new_tok, run_data_dir(run, data_dir), staged_data)
        )
        for path in staged:  # resized pretraining checkpoints record the new shards
            state = read_state(_staged(path))
            if state.get("shards"):
                atomic_write_json(
                    checkpoint_dir(_staged(path)) / "state.json", {**state, "shards": shards_fingerprint(manifest)}
                )
    except BaseException:  # refused, failed or interrupted before anything changed: the run is as it was
        for path in staged:
            shutil.rmtree(_staged(path), ignore_errors=True)
        raise
    if not data_done:
        replace_dir(staged_data, run.data)
    for path in staged:
        replace_dir(_staged(path), path)
    save_recipe(new_recipe, run.config)
    new_tok.save(run.tokenizer)  # last: until then a new attempt still starts from the old tokenizer
    last = read_state(run.checkpoint("last")) if (run.checkpoint("last") / "model.safetensors").is_file() else {}
    metrics = MetricsLogger(run.metrics, run.tensorboard)
    metrics.log(
        {
            "event": "resize_vocab",
            "stage": last.get("stage", "pretrain"),
            "step": last.get("step", 0),
            "label": f"vocab {old_rows} -> {new_rows}",
            "old_vocab": old_rows,
            "new_vocab": new_rows,
            "kept_rows": kept,
        }
    )
    metrics.close()
    plot_losses(run.metrics, run.plots / "loss.png", title=run.root.name)
    return {"old_vocab": old_rows, "new_vocab": new_rows, "kept_rows": kept, "checkpoints": [p.name for p in staged]}
