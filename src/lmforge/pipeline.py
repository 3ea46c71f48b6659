"""The stages of the pipeline as plain functions (the CLI is a thin layer over these).

tokenizer -> prepare (token shards) -> pretrain -> finetune (QA) -> evaluate, plus generate and
`run_recipe`, which chains all of them and can resume an interrupted run where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from lmforge.config import DataConfig, Recipe, TrainConfig, load_recipe, save_recipe
from lmforge.data.loader import TokenBatcher, log_phase_plan, resolve_phases
from lmforge.data.qa import QABatcher, clean_examples, encode_examples, encode_for_inference
from lmforge.data.shards import (
    changed_sources,
    has_shards,
    load_manifest,
    prepare_shards,
    shards_fingerprint,
    tokenizer_hash,
)
from lmforge.data.sources import QAExample, data_dir_from_env, iter_documents, iter_qa_examples
from lmforge.errors import LmforgeError
from lmforge.evaluate import SpanOptions, dropped_text, report_markdown, span_answer, squad_eval, text_metrics
from lmforge.generate import SamplingParams, generate
from lmforge.io import atomic_write_json, atomic_write_text, existing_dir
from lmforge.model import GPT, GPTConfig, build_model
from lmforge.rundir import RunDir
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.checkpoint import (
    checkpoint_dir,
    copy_checkpoint,
    list_checkpoints,
    model_from_checkpoint,
    read_state,
)
from lmforge.train.distributed import (
    barrier,
    from_main,
    is_main,
    join_torchrun,
    launched_by_torchrun,
    on_main,
)
from lmforge.train.loop import StageResult, resolve_device, train_stage
from lmforge.train.precision import autocast, keep_freed_memory, model_autocast, resolve_dtype

log = logging.getLogger("lmforge")

PRETRAINED = "pretrained"  # frozen copy of the best pretraining checkpoint, the start of fine-tuning


# --------------------------------------------------------------------------- run directory


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run(recipe: Recipe, run_dir: str | Path | None, fresh: bool = False) -> RunDir:
    """Create (or reuse) the run directory; a new run gets the resolved config.toml at once.

    An existing run keeps its config.toml until a stage has accepted the recipe (`record_recipe`), so an
    override the stage refuses (another model shape on --resume) is never saved. With fresh=True an existing
    non-empty directory is refused, so a new run never overwrites what an earlier one wrote; without it, a
    non-empty directory that is not a run (no config.toml) is refused, so a run is never built among a
    user's files. A missing or empty one becomes a new run either way (a relaunched `run --resume` starts).
    """
    run = RunDir(Path(run_dir) if run_dir else default_run_dir(recipe))
    if run.root.is_dir() and any(run.root.iterdir()):
        if fresh:
            raise LmforgeError(
                f"run directory {run.root} already exists and is not empty (use --resume to continue "
                "it, or choose another --run-dir)"
            )
        run.require()
    run.root.mkdir(parents=True, exist_ok=True)
    if not run.config.is_file():
        save_recipe(recipe, run.config)
    return run


def record_recipe(recipe: Recipe, run: RunDir) -> None:
    """Save the recipe (overrides included) that a stage has accepted as the run's config.toml."""
    if is_main():  # under torchrun, rank 0 alone writes the run directory
        save_recipe(recipe, run.config)


def _progress(run: RunDir) -> dict:
    path = run.root / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def mark_done(run: RunDir, stage: str, **info) -> None:
    progress = _progress(run)
    progress[stage] = {"done": True, **info}
    atomic_write_json(run.root / "progress.json", progress)


def is_done(run: RunDir, stage: str) -> bool:
    return bool(_progress(run).get(stage, {}).get("done"))


def run_data_dir(run: RunDir, data_dir: str | Path | None) -> Path | None:
    """Where a stage reads its local data: --data-dir (else $LMFORGE_DATA_DIR), which the run then remembers,
    or the folder the run remembers, so that `run --resume`, `finetune` and `eval` find the data the run was
    made from without repeating --data-dir (None: every source from the Hugging Face Hub)."""
    given = data_dir_from_env(data_dir)
    progress = _progress(run)
    if given is not None:
        absolute = str(given.resolve())
        if is_main() and run.root.is_dir() and progress.get("data_dir") != absolute:
            atomic_write_json(run.root / "progress.json", {**progress, "data_dir": absolute})
        return given
    remembered = progress.get("data_dir")
    if remembered and Path(remembered).is_dir():
        log.info("data directory: %s, as this run was made with (--data-dir to use another)", remembered)
        return Path(remembered)
    return None


# --------------------------------------------------------------------------- tokenizer and shards


SAMPLE_PIECE_CHARS = 8_000  # the tokenizer sample takes documents in pieces of at most this many characters
SAMPLE_POOL_DOCS = 64  # ... in turn from this many documents of a source at a time


def sample_shares(data: DataConfig) -> dict[str, float]:
    """Each source's share of the tokenizer sample: its weight in the mixture, averaged over the phases."""
    phases = resolve_phases(data)
    shares = dict.fromkeys((s.name for s in data.sources), 0.0)
    for phase in phases:
        total = sum(phase.weights.values())
        for name, weight in phase.weights.items():
            shares[name] += weight / total / len(phases)
    return shares


def _pieces(docs: Iterator[str]) -> Iterator[str]:
    """A source's documents in pieces, taken in turn from up to SAMPLE_POOL_DOCS documents (a document leaves the
    pool when used up): a 500K-character book is a share of its source like many pages, not one huge turn."""
    pool: deque[tuple[str, int]] = deque()
    while True:
        while len(pool) < SAMPLE_POOL_DOCS and (doc := next(docs, None)) is not None:
            pool.append((doc, 0))
        if not pool:
            return
        doc, start = pool.popleft()
        yield doc[start : start + SAMPLE_PIECE_CHARS]
        if start + SAMPLE_PIECE_CHARS < len(doc):
            pool.append((doc, start + SAMPLE_PIECE_CHARS))


def tokenizer_sample(recipe: Recipe, data_dir: Path | None) -> Iterator[str]:
    """Up to tokenizer.sample_chars characters of the sources' text, each source's characters in proportion to
    its mixture weight (the source furthest below its share gives the next piece; a source that runs out leaves
    its share to the others), so the tokenizer is fitted to the text the model sees."""
    shares = {name: share for name, share in sample_shares(recipe.data).items() if share > 0}
    streams = {s.name: _pieces(iter_documents(s, data_dir)) for s in recipe.data.sources if s.name in shares}
    taken = dict.fromkeys(streams, 0)
    budget = recipe.tokenizer.sample_chars
    while streams and budget > 0:
        name = min(streams, key=lambda n: taken[n] / shares[n])
        piece = next(streams[name], None)
        if piece is None:
            del streams[name]
            continue
        piece = piece[:budget]
        taken[name] += len(piece)
        budget -= len(piece)
        yield piece
    total = max(sum(taken.values()), 1)
    log.info("tokenizer sample: %s", ", ".join(f"{n} {c:,} chars ({c / total:.0%})" for n, c in taken.items()))


def _refuse_replacing_a_used_tokenizer(run: RunDir) -> None:
    """A new tokenizer.json under shards or checkpoints made with the old one would leave them unusable."""
    used_by = []
    if trained := list_checkpoints(run.checkpoints):
        used_by.append(f"checkpoints ({', '.join(p.name for p in trained)})")
    if has_shards(run.data):  # a finished preparation (an interrupted one is redone anyway)
        used_by.append(f"token shards in {run.data}")
    if used_by:
        raise LmforgeError(
            f"{run.root} already has {' and '.join(used_by)} made with its tokenizer: to change the "
            f"tokenizer of this run, use `lmforge resize-vocab {run.root} --vocab-size N` (or "
            "--tokenizer NEW.json), or train a tokenizer in a new run directory"
        )


def train_tokenizer_stage(recipe: Recipe, run: RunDir, data_dir: str | Path | None = None) -> Tokenizer:
    _refuse_replacing_a_used_tokenizer(run)
    if not recipe.data.sources:
        raise LmforgeError("recipe has no [[data.sources]] to train the tokenizer on")
    tok = train_tokenizer(
        tokenizer_sample(recipe, run_data_dir(run, data_dir)),
        recipe.tokenizer.vocab_size,
        recipe.tokenizer.sample_chars,
        recipe.tokenizer.min_frequency,
    )
    tok.save(run.tokenizer)
    record_recipe(recipe, run)
    log.info("tokenizer: %d tokens -> %s", tok.vocab_size, run.tokenizer)
    mark_done(run, "tokenizer", vocab_size=tok.vocab_size)
    return tok


def source_weights(recipe: Recipe) -> dict[str, float]:
    """The recipe's source weights: the validation mixture (a recipe property, not a shard property)."""
    return {s.name: s.weight for s in recipe.data.sources}


def require_tokenizer(run: RunDir) -> None:
    if not run.tokenizer.is_file():
        raise LmforgeError(
            f"no tokenizer in {run.root}: run `lmforge tokenizer train RECIPE --run-dir {run.root}` "
            "first (prepare tokenizes the sources with it)"
        )


def _refuse_changing_used_shards(recipe: Recipe, run: RunDir, tok: Tokenizer, data_dir: Path | None) -> None:
    """New shards under checkpoints trained on the current ones would change the data a resumed pretraining and
    eval read, without a word (as a new tokenizer would: see _refuse_replacing_a_used_tokenizer)."""
    trained = list_checkpoints(run.checkpoints)
    if not (trained and has_shards(run.data)):
        return
    changed = changed_sources(recipe.data, tokenizer_hash(tok), data_dir, run.data)
    if not changed:
        return
    for src in recipe.data.sources:  # a mistyped path or an unreadable file is reported as what it is
        if src.name in changed:
            docs = iter_documents(src, data_dir)
            next(docs, None)
            docs.close()
    raise LmforgeError(
        f"{run.root} has checkpoints ({', '.join(p.name for p in trained)}) trained on its token "
        f"shards, and this preparation would change the shards of {', '.join(changed)}: prepare in a "
        f"new run directory (with a copy of {run.tokenizer}), or pass --force to replace them "
        "(pretraining then cannot --resume from those checkpoints)"
    )


def prepare_stage(recipe: Recipe, run: RunDir, data_dir: str | Path | None = None, force: bool = False) -> dict:
    """Tokenize the recipe's sources into the run's shards. Refused, unless `force`, when the run has checkpoints
    and a source's shards would change; a preparation that changes nothing is always fine."""
    require_tokenizer(run)
    tok = Tokenizer.load(run.tokenizer)
    data_dir = run_data_dir(run, data_dir)
    if not force:
        _refuse_changing_used_shards(recipe, run, tok, data_dir)
    manifest = prepare_shards(recipe.data, tok, data_dir, run.data)
    record_recipe(recipe, run)
    mark_done(run, "prepare", train_tokens=sum(s["train_tokens"] for s in manifest["sources"]))
    return manifest


# --------------------------------------------------------------------------- models


def model_config(recipe: Recipe, tokenizer: Tokenizer) -> GPTConfig:
    m = recipe.model
    vocab = m.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise LmforgeError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    return GPTConfig(
        vocab_size=vocab,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        block_size=m.block_size,
        dropout=m.dropout,
        mlp_hidden=m.mlp_hidden,
        rope_theta=m.rope_theta,
        norm_eps=m.norm_eps,
    )


def check_tokenizer(checkpoint: Path, tok: Tokenizer, tokenizer_file: Path) -> None:
    """Refuse a checkpoint trained with another tokenizer than `tok` (its hash is recorded when the checkpoint is
    saved; checkpoints written before that record none and pass): the model would read other tokens than it
    learned, and answer garbage without an error."""
    recorded = read_state(checkpoint).get("tokenizer_hash")
    if recorded and recorded != tokenizer_hash(tok):
        raise LmforgeError(
            f"{tokenizer_file} is not the tokenizer {checkpoint} was trained with (hash "
            f"{tokenizer_hash(tok)}, the checkpoint's {recorded}): put the run's own tokenizer.json "
            "back, or change it with `lmforge resize-vocab`"
        )


def _check_shape(checkpoint: Path, cfg: GPTConfig, action: str = "resume") -> None:
    """Refuse to `action` (resume, fine-tune from) `checkpoint` when the recipe's model has another shape."""
    saved = read_state(checkpoint)["model_config"]
    ours = {k: v for k, v in cfg.__dict__.items() if k != "dropout"}
    diff = [f"{k}: checkpoint {saved.get(k)} vs recipe {v}" for k, v in ours.items() if saved.get(k) != v]
    if diff:
        raise LmforgeError(f"cannot {action} {checkpoint}: model shape differs ({'; '.join(diff)})")


def _stage_progress(run: RunDir, stage: str) -> str:
    """What shows that `stage` trained in this run ("" if nothing): it is marked done, or checkpoints hold its
    steps after step 0 (a step-0 `best` alone is what an attempt killed before its first checkpoint leaves)."""
    trained = []
    for path in list_checkpoints(run.checkpoints):
        try:
            state = read_state(path)
        except LmforgeError:
            state = {}
        if path.name.startswith(f"{stage}-step-") or (state.get("stage") == stage and state.get("step", 0) > 0):
            trained.append(path.name)
    found = ["progress.json says done"] if is_done(run, stage) else []
    found += [f"checkpoints {', '.join(trained)}"] if trained else []
    return "; ".join(found)


def _resume_advice(run: RunDir, stage: str) -> str:
    snapshots = [p.name for p in list_checkpoints(run.checkpoints) if p.name.startswith(f"{stage}-step-")]
    keep = f"to continue from {snapshots[-1]}, copy it to {run.checkpoint('last')}; " if snapshots else ""
    return f"{keep}to start {stage} over, run `lmforge {stage}` without --resume"


def _resumes(run: RunDir, stage: str) -> bool:
    """For --resume: True when checkpoints/last continues `stage`, False when the stage has not begun (it
    starts at step 0). A stage that made progress but has no readable `last` of its own is refused: starting
    it over would replace its best model and delete its kept snapshots."""
    last = run.checkpoint("last")
    try:
        state = read_state(last) if existing_dir(last) is not None else {}
    except LmforgeError as exc:
        raise LmforgeError(f"cannot resume {stage}: {exc}; {_resume_advice(run, stage)}") from None
    if state.get("stage") == stage:
        return True
    if stage == "pretrain" and state.get("stage") == "finetune":
        raise LmforgeError(
            f"{last} is a fine-tuning checkpoint: pretraining in this run is over (resuming it would "
            "overwrite the fine-tuned model); pretrain in a new run directory"
        )
    if found := _stage_progress(run, stage):
        raise LmforgeError(
            f"cannot resume {stage}: no {stage} checkpoint in {last}, but {stage} already trained "
            f"in this run ({found}); {_resume_advice(run, stage)}"
        )
    log.info("%s: nothing to resume yet, starting at step 0", stage)
    return False


def _exit_if_preempted(result: StageResult, cfg: TrainConfig, stage: str) -> None:
    """With on_signal = "exit", a stage a signal stopped stays unfinished (not marked done, `pretrained` not
    replaced) and the command ends, so that `--resume` continues the stage: how a preempted cluster job
    (SIGTERM, then SIGKILL) picks up where it was."""
    if result.stop_reason == "interrupted" and cfg.on_signal == "exit":
        raise LmforgeError(
            f"{stage} stopped by a signal at step {result.steps}, checkpoint saved "
            f"({stage}.on_signal = exit): continue with --resume"
        )


# --------------------------------------------------------------------------- pretraining


def pretrain_stage(recipe: Recipe, run: RunDir, resume: bool = False) -> StageResult:
    tok = Tokenizer.load(run.tokenizer)
    manifest = load_manifest(run.data)
    if manifest["tokenizer_hash"] != tokenizer_hash(tok):
        raise LmforgeError(f"{run.data}: shards were made with another tokenizer (run `lmforge prepare` again)")
    cfg = model_config(recipe, tok)
    resume = resume and _resumes(run, "pretrain")
    shards = shards_fingerprint(manifest)
    if resume:
        _check_shape(run.checkpoint("last"), cfg)
        recorded = read_state(run.checkpoint("last")).get("shards")
        if recorded and recorded != shards:  # checkpoints from before shards were recorded pass
            raise LmforgeError(
                f"cannot resume pretraining: {run.data} holds other token shards than "
                f"{run.checkpoint('last')} was trained on (shards {shards}, the checkpoint's "
                f"{recorded}; `lmforge prepare --force` changed them): pretrain without --resume to "
                "start over, or in a new run directory"
            )
    torch.manual_seed(recipe.seed)  # the initial weights are part of the recipe: two fresh runs are identical
    model = build_model(cfg)
    p = recipe.pretrain
    d = recipe.data
    phases = resolve_phases(d)
    log_phase_plan(phases, p.batch_size * p.grad_accum * cfg.block_size, p.max_steps)
    train = TokenBatcher(
        run.data,
        "train",
        cfg.block_size,
        p.batch_size,
        seed=recipe.seed,
        phases=phases,
        shuffle_buffer=d.shuffle_buffer,
        prefetch=d.prefetch,
        delete_consumed=d.delete_consumed,
    )
    val = TokenBatcher(
        run.data, "val", cfg.block_size, p.batch_size, seed=recipe.seed + 1, weights=source_weights(recipe)
    )
    if resume:
        check_tokenizer(run.checkpoint("last"), tok, run.tokenizer)
    result = train_stage(
        model,
        train,
        val,
        p,
        run,
        "pretrain",
        p.max_steps,
        resume=resume,
        seed=recipe.seed,
        on_start=lambda: record_recipe(recipe, run),
        checkpoint_info={"tokenizer_hash": tokenizer_hash(tok), "shards": shards},
    )
    _exit_if_preempted(result, p, "pretrain")
    if is_main():  # under torchrun, rank 0 alone writes the run directory
        copy_checkpoint(run.checkpoint("best"), run.checkpoint(PRETRAINED))
        mark_done(run, "pretrain", steps=result.steps, best_val_loss=result.best_val_loss, stop=result.stop_reason)
    barrier()
    return result


# --------------------------------------------------------------------------- fine-tuning


@dataclass
class QASplits:
    train: list[QAExample]  # fine-tuning examples
    val: list[QAExample]  # examples for the fine-tuning validation loss (never the scored questions)
    eval: list[QAExample]  # dev questions scored with EM/F1 (eval.squad_subset of those before `val`)
    dropped_train: dict[str, int]  # unusable examples left out, per reason
    dropped_dev: dict[str, int]
    dev: list[QAExample]  # every usable dev example, in file order


def dev_validation_size(recipe: Recipe, n_dev: int) -> int:
    """How many examples at the end of the dev file the fine-tuning validation loss takes (0: it takes train
    examples, because every dev question is scored)."""
    qa = recipe.qa
    n_eval = recipe.eval.squad_questions or n_dev
    return min(qa.max_dev_examples, max(n_dev - n_eval, 0)) if qa.max_dev_examples else 0


@dataclass
class DevQuestions:
    dev: list[QAExample]  # every usable dev example, in file order
    eval: list[QAExample]  # those scored with EM/F1 (eval.squad_subset of those before the validation tail)
    n_val: int  # how many at the end of `dev` are fine-tuning's validation examples (0: it uses train ones)
    dropped: dict[str, int]  # unusable examples left out, per reason


def load_dev_questions(recipe: Recipe, data_dir: Path | None) -> DevQuestions:
    """The recipe's dev examples and the questions eval scores: evenly spaced through the dev file (or its
    first ones: eval.squad_subset), before the tail that fine-tuning's validation loss takes, so that early
    stopping does not select on the questions it is scored on. Reads only the dev file."""
    qa = recipe.qa
    malformed: Counter = Counter()
    dev, dropped = clean_examples(list(iter_qa_examples(qa.dev, data_dir, malformed)), f"QA source '{qa.dev.name}'")
    n_val = dev_validation_size(recipe, len(dev))
    scored = scored_questions(
        dev[: len(dev) - n_val], recipe.eval.squad_questions or len(dev), recipe.eval.squad_subset
    )
    return DevQuestions(dev, scored, n_val, dict(malformed + dropped))


def load_qa_splits(recipe: Recipe, data_dir: Path | None) -> QASplits:
    """The QA examples of a recipe, with unusable ones (empty answers, answers not in the context, ...)
    left out and counted.

    The validation-loss examples come from the end of the dev file and the EM/F1 questions from the rest
    (load_dev_questions). When every dev question is scored (eval.squad_questions = 0), they are held out of
    the start of the train set instead.
    """
    qa = recipe.qa
    questions = load_dev_questions(recipe, data_dir)
    malformed_train: Counter = Counter()
    raw_train = list(islice(iter_qa_examples(qa.train, data_dir, malformed_train), qa.max_train_examples or None))
    train, dropped_train = clean_examples(raw_train, f"QA source '{qa.train.name}'")
    dev, n_val = questions.dev, questions.n_val
    if n_val:
        val = dev[len(dev) - n_val :]
    else:
        n_hold = max(1, min(qa.max_dev_examples, len(train) // 10))
        val, train = train[:n_hold], (train[n_hold:] if len(train) > n_hold else train)
        log.info("every dev question is scored: %d train examples held out for the validation loss", len(val))
    return QASplits(train, val, questions.eval, dict(malformed_train + dropped_train), questions.dropped, dev)


def scored_validation_questions(questions: DevQuestions, trained: Recipe) -> int:
    """How many of the scored questions were validation examples of a fine-tuning run with the `trained`
    recipe, the examples it selected its checkpoint on (an eval scoring more questions than the run's
    eval.squad_questions reaches into them)."""
    n_val = dev_validation_size(trained, len(questions.dev))
    held = {ex.id for ex in questions.dev[len(questions.dev) - n_val :]} if n_val else set()
    return sum(ex.id in held for ex in questions.eval)


def scored_questions(pool: list[QAExample], n: int, subset: str) -> list[QAExample]:
    """n questions of `pool`: its first n, or ("spread") n evenly spaced through it, in file order."""
    if subset == "first" or n >= len(pool):
        return pool[:n]
    return [pool[i * len(pool) // n] for i in range(n)]


def qa_batches(
    recipe: Recipe, tok: Tokenizer, block_size: int, examples: list[QAExample], split: str, group_by_length: int = 0
) -> QABatcher:
    """Fine-tuning's batches of one split ("training" or "validation") of QA examples, encoded as the recipe
    says; the validation loss is the mean over the first finetune.eval_batches of them."""
    qa = recipe.qa
    items = encode_examples(
        tok, examples, qa.mode, block_size, qa.max_answer_tokens, f"fine-tuning {split}", qa.context_tokens
    )
    if not items:
        raise LmforgeError(f"no usable QA {split} examples (all too long for the block or without answers)")
    return QABatcher(items, recipe.finetune.batch_size, tok.pad_id, seed=recipe.seed, group_by_length=group_by_length)


def finetune_stage(
    recipe: Recipe, run: RunDir, data_dir: str | Path | None = None, resume: bool = False
) -> StageResult:
    tok = Tokenizer.load(run.tokenizer)
    resume = resume and _resumes(run, "finetune")
    cfg = model_config(recipe, tok)
    if not resume:
        start = run.checkpoint(PRETRAINED)
        if not (start / "model.safetensors").is_file():
            raise LmforgeError(f"no pretrained model in {run.root} (run `lmforge pretrain` first)")
        _check_shape(start, cfg, "fine-tune from")
        check_tokenizer(start, tok, run.tokenizer)
        model = model_from_checkpoint(start)
    else:
        _check_shape(run.checkpoint("last"), cfg)
        check_tokenizer(run.checkpoint("last"), tok, run.tokenizer)
        model = GPT(GPTConfig(**read_state(run.checkpoint("last"))["model_config"]))
    f = recipe.finetune
    splits = load_qa_splits(recipe, run_data_dir(run, data_dir))
    train = qa_batches(recipe, tok, model.cfg.block_size, splits.train, "training", recipe.qa.group_by_length)
    val = qa_batches(recipe, tok, model.cfg.block_size, splits.val, "validation")
    total = f.max_steps
    if f.epochs > 0:
        total = min(f.max_steps, math.ceil(f.epochs * train.steps_per_epoch / f.grad_accum))
    log.info("fine-tuning (%s): %d examples, %d steps", recipe.qa.mode, len(train.items), total)
    result = train_stage(
        model,
        train,
        val,
        f,
        run,
        "finetune",
        total,
        resume=resume,
        seed=recipe.seed,
        on_start=lambda: record_recipe(recipe, run),
        checkpoint_info={"tokenizer_hash": tokenizer_hash(tok)},
    )
    _exit_if_preempted(result, f, "finetune")
    if is_main():
        mark_done(run, "finetune", steps=result.steps, best_val_loss=result.best_val_loss, stop=result.stop_reason)
    barrier()
    return result


# --------------------------------------------------------------------------- loading, evaluation, generation


def resolve_checkpoint(run: RunDir, checkpoint: str) -> Path:
    """'best', 'last', 'pretrained' or a path to a checkpoint directory."""
    candidate = Path(checkpoint)
    if candidate.is_dir() and (candidate / "model.safetensors").is_file():
        return candidate
    return checkpoint_dir(run.checkpoint(checkpoint))


def load(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """The model (eval mode) and tokenizer of a run: `model(input_ids)` returns (B, T, vocab) logits."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise LmforgeError(f"run directory not found: {run.root}")
    tok = Tokenizer.load(run.tokenizer)
    path = resolve_checkpoint(run, checkpoint)
    check_tokenizer(path, tok, run.tokenizer)
    model = model_from_checkpoint(path)
    return model.to(device).eval(), tok


def held_out_text_metrics(recipe: Recipe, run: RunDir, model: GPT, tok: Tokenizer) -> dict:
    """Loss, perplexity and bits per byte on the run's held-out token shards; a run without shards (one made
    by `lmforge import-hf`) is scored on questions alone, and the report says why and how to get them."""
    if not has_shards(run.data):
        why = (
            f"no token shards in {run.data} (`lmforge prepare --run-dir {run.root} --data-dir DIR` makes them "
            "from the recipe's [[data.sources]])"
        )
        log.warning("held-out text metrics not measured: %s", why)
        return {"text_metrics_skipped": why}
    val = TokenBatcher(
        run.data,
        "val",
        model.cfg.block_size,
        recipe.pretrain.batch_size,
        seed=recipe.seed + 1,
        weights=source_weights(recipe),
    )
    return text_metrics(model, val.fixed_batches(recipe.eval.val_batches), tok.token_byte_lengths())


def eval_stage(recipe: Recipe, run: RunDir, data_dir: str | Path | None = None, checkpoint: str = "best") -> dict:
    device = resolve_device(recipe.pretrain.device)
    keep_freed_memory()
    model, tok = load(run.root, checkpoint, device=str(device))
    e = recipe.eval
    dtype = resolve_dtype(e.dtype, device)
    checkpoint_path = resolve_checkpoint(run, checkpoint)
    report: dict = {
        "run": str(run.root),
        "checkpoint": str(checkpoint_path),
        "stage": read_state(checkpoint_path).get("stage"),
        "dtype": str(dtype).removeprefix("torch."),
    }
    questions = load_dev_questions(recipe, run_data_dir(run, data_dir))
    if not questions.eval:
        raise LmforgeError(
            f"QA source '{recipe.qa.dev.name}' has no usable dev question to score (left out: "
            f"{dropped_text(questions.dropped)}); the previous report is kept"
        )
    overlap = scored_validation_questions(questions, load_recipe(run.config)) if run.config.is_file() else 0
    if overlap:
        log.warning(
            "%d of the %d scored questions are validation examples fine-tuning selected its checkpoint on "
            "(eval.squad_questions %d scores more than the run's recipe): their scores are optimistic",
            overlap,
            len(questions.eval),
            e.squad_questions,
        )
    with autocast(device, dtype):
        report.update(held_out_text_metrics(recipe, run, model, tok))
        report["squad"] = squad_eval(
            model,
            tok,
            questions.eval,
            recipe.qa.mode,
            e.max_new_tokens,
            e.batch_size,
            e.n_examples,
            e.long_context,
            recipe.answer_context_tokens,
            e.decoding,
            SpanOptions.of(e),
        )
    report["squad"]["invalid_skipped"] = questions.dropped
    report["squad"]["subset"] = e.squad_subset
    report["squad"]["validation_questions_scored"] = overlap
    # every scored question's answer, in the format the official evaluate-v1.1.py reads (it averages over the
    # whole dev file, counting questions outside the subset as unanswered)
    atomic_write_json(run.eval / "predictions.json", report["squad"].pop("predictions"))
    atomic_write_json(run.eval / "report.json", report)
    atomic_write_text(run.eval / "report.md", report_markdown(report))
    mark_done(run, "eval", em=report["squad"]["em"], f1=report["squad"]["f1"])
    return report


def answer_question(
    model: GPT,
    tok: Tokenizer,
    question: str,
    context: str | None = None,
    max_new_tokens: int = 32,
    context_tokens: int = 0,
    decoding: str = "greedy",
    span: SpanOptions | None = None,
    dtype: str = "float32",
) -> str:
    """The answer in the fine-tuning prompt format (a long context is cut to its best-matching window):
    generated greedily, or with decoding="span" and a context, the passage span the model finds likeliest
    (chosen as `span` says: the recipe's eval.span_* settings), computed in `dtype` (eval.dtype)."""
    if max_new_tokens >= model.cfg.block_size:
        raise LmforgeError(
            f"max new tokens {max_new_tokens} leave no room for the question in the model's "
            f"{model.cfg.block_size}-token block"
        )
    enc = encode_for_inference(tok, question, context or None, model.cfg.block_size, max_new_tokens, context_tokens)
    if enc is None:
        raise LmforgeError("question is longer than the model's block size")
    with model_autocast(model, dtype):
        if decoding == "span" and context:
            answer = span_answer(model, tok, enc.ids, max_new_tokens, span or SpanOptions())[0]
        else:
            answer = generate(
                model, enc.ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids={tok.eot_id})
            )
    return tok.decode(answer).strip()


def answer_as_evaluated(
    model: GPT,
    tok: Tokenizer,
    recipe: Recipe,
    question: str,
    context: str | None = None,
    max_new_tokens: int | None = None,
) -> str:
    """One answer computed as `lmforge eval` scores the recipe's run: its eval.max_new_tokens (unless
    `max_new_tokens` is given), passage window, decoding, span settings and dtype. A closed-book run is asked
    without the context, in the prompt format it was fine-tuned on (as eval asks it)."""
    if context and recipe.qa.mode != "context":
        log.warning("closed-book run (qa.mode = %r): the context is left out of the prompt", recipe.qa.mode)
        context = None
    e = recipe.eval
    limit = e.max_new_tokens if max_new_tokens is None else max_new_tokens
    return answer_question(
        model, tok, question, context, limit, recipe.answer_context_tokens, e.decoding, SpanOptions.of(e), e.dtype
    )


def sample_answer(recipe: Recipe, run: RunDir) -> dict:
    """The recipe's sample question answered by the run's best model, as `lmforge eval` would answer it."""
    model, tok = load(run.root, "best")
    context = (recipe.sample_context or None) if recipe.qa.mode == "context" else None
    return {
        "question": recipe.sample_question,
        "context": context,
        "answer": answer_as_evaluated(model, tok, recipe, recipe.sample_question, context),
    }


def generate_text(
    run_dir: str | Path, prompt: str, params: SamplingParams, checkpoint: str = "best", device: str = "cpu"
) -> str:
    model, tok = load(run_dir, checkpoint, device)
    ids = tok.encode(prompt)
    if not ids:
        raise LmforgeError("empty prompt")
    params.stop_ids = params.stop_ids or {tok.eot_id}
    return tok.decode(generate(model, ids, params))


# --------------------------------------------------------------------------- everything


def run_recipe(
    recipe: Recipe, run_dir: str | Path | None = None, data_dir: str | Path | None = None, resume: bool = False
) -> dict:
    """All stages in order; with resume=True, finished stages are skipped and an interrupted one continues.

    Under torchrun every rank calls this: rank 0 alone prepares the run and evaluates (the others wait),
    all ranks train. Ranks other than 0 return an empty report.
    """
    if launched_by_torchrun():  # every rank joins before they share anything (the run's name, its preparation)
        join_torchrun(recipe.pretrain.distributed, recipe.finetune.distributed)
    run_dir = from_main(run_dir or default_run_dir(recipe))  # one (timestamped) name for every rank
    on_main(open_run, recipe, run_dir, fresh=not resume)
    run = RunDir(Path(run_dir))
    log.info("run directory: %s", run.root)
    if not (resume and is_done(run, "tokenizer")):
        on_main(train_tokenizer_stage, recipe, run, data_dir)
    if not (resume and is_done(run, "prepare")):
        on_main(prepare_stage, recipe, run, data_dir)
    # A graceful stop (STOP file, `lmforge stop`, a first Ctrl-C or SIGTERM) ends only the stage it hits:
    # the chain moves on, as the seed moved from pretraining to fine-tuning. A second Ctrl-C aborts.
    if not (resume and is_done(run, "pretrain")):
        pretrain_stage(recipe, run, resume=resume)
    if not (resume and is_done(run, "finetune")):
        finetune_stage(recipe, run, data_dir, resume=resume)
    if not is_main():
        return {}
    report = eval_stage(recipe, run, data_dir)
    report["sample"] = sample_answer(recipe, run)
    report["run_dir"] = str(run.root)
    return report
