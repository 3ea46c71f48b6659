"""Typed recipe configuration: TOML in, validated dataclasses out, command-line overrides.

A recipe is one TOML file whose tables mirror the dataclasses below. Loading is strict: an unknown
key, a value of the wrong type or an impossible value raises ConfigError naming the key.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from lmforge.errors import ConfigError

DTYPES = (
    "auto",
    "float32",
    "bfloat16",
)  # train.dtype and eval.dtype: auto = bf16 where the device computes it natively
# the choices of eval.squad_subset, eval.long_context and eval.decoding (lmforge.evaluate describes each in reports)
SQUAD_SUBSETS = ("spread", "first")
LONG_CONTEXTS = ("truncate", "best_match", "sliding_window")
DECODINGS = ("greedy", "span")


# a source's name is its shard folder (RUN/data/<name>): one plain folder name, never a path
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RESERVED_SOURCE_NAMES = ("manifest.json",)  # the other entry of RUN/data


def _one_of(choices: tuple[str, ...]) -> str:
    return "must be " + ", ".join(f"'{c}'" for c in choices[:-1]) + f" or '{choices[-1]}'"


@dataclass
class SourceConfig:
    """One text source: a local glob under the data dir and/or a Hugging Face Hub dataset."""

    name: str = ""
    local: str = ""  # glob relative to the data dir (or absolute); used first when it matches
    hub: str = ""  # Hub dataset id, e.g. "HuggingFaceFW/fineweb-edu"; the fallback
    hub_config: str = ""  # Hub config name, e.g. "sample-10BT"
    split: str = "train"
    format: str = "auto"  # auto | txt | jsonl | json | parquet | csv | squad
    text_field: str = "text"
    # how a txt file is cut into documents: document (the whole file) | paragraph (blank-line separated) |
    # line | auto (the default: one document per file, paragraphs when the source is a single file)
    sample_by: str = "auto"
    template: str = ""  # joins record fields instead of text_field, e.g. "{title}\n\n{text}"
    weight: float = 1.0
    max_docs: int = 0  # 0 = no cap (counted after the filters)
    max_tokens: int = 0  # 0 = no cap; documents past this many tokens are not sharded
    min_chars: int = 0  # drop documents shorter than this
    max_chars: int = 0  # drop documents longer than this; 0 = no limit
    score_field: str = ""  # a numeric quality column, e.g. FineWeb-Edu's "int_score"
    min_score: float = 0.0  # keep records whose score_field >= this (records without the column are kept)
    language_field: str = ""  # a language column, e.g. "language"
    languages: list[str] = field(default_factory=list)  # keep only these values of language_field
    optional: bool = False  # skip (with a warning) when neither a local copy nor the Hub is available


@dataclass
class PhaseConfig:
    """One stretch of pretraining with its own source mixture, e.g. FineWeb-Edu alone, then a mix."""

    name: str = ""
    tokens: int = 0  # token budget of this phase; 0 = until training ends (last phase only)
    weights: dict[str, float] = field(default_factory=dict)  # source name -> weight; empty = the sources' weights


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    phases: list[PhaseConfig] = field(default_factory=list)  # empty = one phase with the sources' weights
    val_fraction: float = 0.02  # share of documents held out for validation (by document)
    shard_tokens: int = 16_777_216  # tokens per shard file (shards end at a document boundary past this)
    workers: int = 0  # tokenizer worker processes; 0 = all cores, 1 = encode in-process
    dedup: bool = True  # drop exact duplicate documents (by hash), across all sources
    shuffle_buffer: int = 1024  # windows per source held in the loader's shuffle buffer
    prefetch: int = 4  # batches the loader prepares ahead in a background thread; 0 = off
    delete_consumed: bool = False  # delete train shards once fully consumed (frees disk; no second epoch)


@dataclass
class QAConfig:
    mode: str = "context"  # context (reading comprehension) | closed_book (question -> answer)
    train: SourceConfig = field(
        default_factory=lambda: SourceConfig(name="squad-train", hub="rajpurkar/squad", split="train", format="squad")
    )
    dev: SourceConfig = field(
        default_factory=lambda: SourceConfig(
            name="squad-dev", hub="rajpurkar/squad", split="validation", format="squad"
        )
    )
    max_train_examples: int = 0  # 0 = all
    max_dev_examples: int = 500  # dev examples used for the fine-tuning validation loss
    max_answer_tokens: int = 32
    # context tokens in a prompt, 0 = as many as fit the block. Training cuts a longer context to a window
    # holding the answer; evaluation picks a window by eval.long_context (best_match: most like the question)
    context_tokens: int = 0
    # fine-tuning batches of similar length: examples are sorted by length within groups of this many
    # batches, less padding per batch (0: plain shuffled batches, padded to their longest example)
    group_by_length: int = 32


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    sample_chars: int = 20_000_000  # characters of training text the BPE is trained on
    min_frequency: int = 2


@dataclass
class ModelConfig:
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    vocab_size: int = 0  # 0 = take it from the trained tokenizer
    dropout: float = 0.0
    mlp_hidden: int = 0  # 0 = SwiGLU default (8/3 * n_embd rounded up to a multiple of 64)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (pretraining); an upper bound when epochs > 0
    epochs: float = 0.0  # > 0: train this many passes over the examples (fine-tuning)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    dropout: float = -1.0  # < 0 = keep the model's dropout
    eval_interval: int = 100
    eval_batches: int = 20
    patience: int = 0  # evaluations without improvement before stopping; 0 = off
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2  # recent checkpoints kept as checkpoints/<stage>-step-N (besides last and best)
    log_interval: int = 10
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 where the GPU/CPU computes it natively) | float32 | bfloat16
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for embedding and norms)
    muon_lr: float = 0.02  # peak lr of the Muon groups (follows the same warmup + cosine schedule)
    muon_momentum: float = 0.95
    compile: bool = False  # torch.compile the model (slow first step; faster after, mostly on GPU)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    distributed: str = "none"  # none | ddp | fsdp (launch with torchrun; `--distributed` sets it)
    # what SIGTERM/SIGINT do, after the step is finished and a checkpoint saved: "next_stage" ends the stage as
    # `lmforge stop` does (the chain moves on); "exit" leaves it unfinished for --resume (preemptible clusters)
    on_signal: str = "next_stage"


@dataclass
class EvalConfig:
    val_batches: int = 50
    squad_questions: int = 200  # dev questions for EM/F1; 0 = all
    # which ones: "spread" = evenly spaced through the dev file, so every article counts in proportion;
    # "first" = the file's first ones (SQuAD dev v1.1 is grouped by article: its first 810 are all Super Bowl 50)
    squad_subset: str = "spread"
    max_new_tokens: int = 24
    batch_size: int = 16
    n_examples: int = 20  # examples listed in the report
    long_context: str = "truncate"  # contexts longer than the room: truncate | best_match | sliding_window
    # greedy: generate the answer freely; span: pick the passage span the model finds likeliest (context mode)
    decoding: str = "greedy"
    # cap on passage tokens when answering (0: qa.context_tokens, as in fine-tuning); a smaller window around
    # the question's words leaves fewer wrong spans to choose from
    context_tokens: int = 0
    # span decoding: subtract this times each span's score without the question (0 = off), so that spans the
    # model likes whatever is asked lose to those this question makes likely (costs a second scoring pass)
    span_calibration: float = 0.0
    # span decoding: a span made only of words of the question (SQuAD-normalized) is no answer; the next best is
    span_skip_question_words: bool = False
    # span decoding: score only the spans starting at the words whose first token the model finds
    # likeliest as the answer's first token (0 = every word); the rest of the passage is passed over unscored
    span_max_starts: int = 0
    # float32 (default): scores that do not depend on the machine. auto / bfloat16: bf16 autocast where the
    # device computes it natively, as in training: 1.6-1.9x faster on a bf16 CPU, but a few answers change
    # (weights stay fp32; losses and answer scores are summed in fp32)
    dtype: str = "float32"


@dataclass
class GenerateConfig:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    checkpoint: str = "best"  # best | last | pretrained | PATH
    # requests generating at once (rows of the batched decode step, or threads without batching)
    max_concurrent: int = 32
    max_queue: int = 64  # requests waiting for a slot; beyond that the server answers 429
    batching: bool = True  # decode the concurrent requests of a checkpoint together in one batched step
    max_tokens: int = 512  # upper bound on a request's max_tokens
    max_request_bytes: int = 65536  # larger request bodies get 413
    max_attention_tokens: int = 256  # longest text /api/attention analyses


@dataclass
class Recipe:
    name: str = "recipe"
    seed: int = 1337
    sample_question: str = "What is the capital of France?"
    sample_context: str = ""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-4, epochs=1.0, warmup_steps=20, weight_decay=0.0, patience=2)
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def answer_context_tokens(self) -> int:
        """The passage cap when answering questions (evaluation, `generate --question`, the sample answer)."""
        return self.eval.context_tokens or self.qa.context_tokens


# --------------------------------------------------------------------------- typed loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) one TOML value against a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, options[0], key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}", key)
        _, value_tp = typing.get_args(tp)
        return {str(k): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}", key)
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}", key)
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):  # TOML and the CLI accept inf, nan
        raise ConfigError(f"{key}: must be a finite number, got {value!r}", key)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got a boolean {value!r}", key)
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}", key)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key '{full}' (known keys here: {known})")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}", key)


def validate_train(cfg: TrainConfig, key: str) -> None:
    _check(cfg.max_steps > 0, f"{key}.max_steps", "must be > 0")
    _check(cfg.epochs >= 0, f"{key}.epochs", "must be >= 0")
    _check(cfg.batch_size > 0, f"{key}.batch_size", "must be > 0")
    _check(cfg.grad_accum > 0, f"{key}.grad_accum", "must be > 0")
    _check(cfg.lr > 0, f"{key}.lr", "must be > 0")
    _check(0 <= cfg.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "must be in [0, 1]")
    _check(cfg.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
    _check(cfg.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
    _check(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, f"{key}.beta1/beta2", "must be in [0, 1)")
    _check(cfg.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0")
    _check(cfg.dropout < 1, f"{key}.dropout", "must be < 1")
    _check(cfg.eval_interval > 0, f"{key}.eval_interval", "must be > 0")
    _check(cfg.eval_batches > 0, f"{key}.eval_batches", "must be > 0")
    _check(cfg.patience >= 0, f"{key}.patience", "must be >= 0")
    _check(cfg.checkpoint_interval > 0, f"{key}.checkpoint_interval", "must be > 0")
    _check(cfg.keep_checkpoints >= 0, f"{key}.keep_checkpoints", "must be >= 0")
    _check(cfg.log_interval > 0, f"{key}.log_interval", "must be > 0")
    _check(
        cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:"),
        f"{key}.device",
        "must be auto, cpu, cuda[:N] or mps",
    )
    _check(cfg.dtype in DTYPES, f"{key}.dtype", _one_of(DTYPES))
    _check(cfg.optimizer in ("adamw", "muon"), f"{key}.optimizer", "must be adamw or muon")
    _check(cfg.muon_lr > 0, f"{key}.muon_lr", "must be > 0")
    _check(0 <= cfg.muon_momentum < 1, f"{key}.muon_momentum", "must be in [0, 1)")
    _check(cfg.distributed in ("none", "ddp", "fsdp"), f"{key}.distributed", "must be none, ddp or fsdp")
    _check(cfg.on_signal in ("next_stage", "exit"), f"{key}.on_signal", "must be next_stage or exit")
    _check(
        not (cfg.optimizer == "muon" and cfg.distributed == "fsdp"),
        f"{key}.optimizer",
        "muon needs whole matrices and does not run on FSDP shards (use distributed = 'ddp' or optimizer = 'adamw')",
    )


SAMPLE_BY = ("auto", "document", "paragraph", "line")


def validate_source(src: SourceConfig, key: str) -> None:
    _check(bool(src.local or src.hub), key, "names neither a local glob ('local') nor a Hub dataset ('hub')")
    formats = ("auto", "txt", "jsonl", "json", "parquet", "csv", "squad")
    _check(src.format in formats, f"{key}.format", f"must be one of {', '.join(formats)}")
    _check(src.sample_by in SAMPLE_BY, f"{key}.sample_by", f"must be one of {', '.join(SAMPLE_BY)}")
    _check(src.weight > 0, f"{key}.weight", "must be > 0")
    _check(src.max_docs >= 0, f"{key}.max_docs", "must be >= 0")
    _check(src.max_tokens >= 0, f"{key}.max_tokens", "must be >= 0")
    _check(src.min_chars >= 0, f"{key}.min_chars", "must be >= 0")
    _check(src.max_chars >= 0, f"{key}.max_chars", "must be >= 0 (0 = no limit)")
    _check(not src.max_chars or src.max_chars >= src.min_chars, f"{key}.max_chars", "must be >= min_chars")
    _check(not src.languages or bool(src.language_field), f"{key}.languages", "needs language_field")
    if src.template:
        try:
            src.template.format_map(collections.defaultdict(str))
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"{key}.template: not a valid template ({exc})") from None


def validate_data(data: DataConfig) -> None:
    _check(0 < data.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    _check(data.shard_tokens >= 1024, "data.shard_tokens", "must be >= 1024")
    _check(data.workers >= 0, "data.workers", "must be >= 0 (0 = all cores)")
    _check(data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    _check(data.prefetch >= 0, "data.prefetch", "must be >= 0")
    for i, src in enumerate(data.sources):
        validate_source(src, f"data.sources[{i}]")
        _check(
            bool(SOURCE_NAME.fullmatch(src.name)) and src.name.lower() not in RESERVED_SOURCE_NAMES,
            f"data.sources[{i}].name",
            f"{'required' if not src.name else f'{src.name!r} is not allowed'}: "
            "it names the source's shard folder, so letters, digits, '-', '_' and '.' only, starting with a "
            "letter or digit",
        )
    names = [s.name for s in data.sources]
    # compared ignoring case: on macOS and Windows "Books" and "books" would be the same folder
    counts = collections.Counter(n.lower() for n in names)
    dup = next((n for n in names if counts[n.lower()] > 1), None)
    _check(
        dup is None,
        "data.sources",
        f"source names must be unique: '{dup}' is used more than once "
        "(names are compared ignoring case: each is a folder)",
    )
    for i, phase in enumerate(data.phases):
        key = f"data.phases[{i}]"
        _check(phase.tokens >= 0, f"{key}.tokens", "must be >= 0")
        _check(
            phase.tokens > 0 or i == len(data.phases) - 1,
            f"{key}.tokens",
            "only the last phase may run until the end (tokens = 0)",
        )
        for source, weight in phase.weights.items():
            _check(source in names, f"{key}.weights.{source}", f"no such source (sources: {', '.join(names)})")
            _check(weight >= 0, f"{key}.weights.{source}", "must be >= 0")
        _check(not phase.weights or sum(phase.weights.values()) > 0, f"{key}.weights", "must not all be 0")


def validate(recipe: Recipe) -> Recipe:
    """Reject impossible values, naming the key. Returns the recipe for chaining."""
    m = recipe.model
    _check(m.n_layer > 0, "model.n_layer", "must be > 0")
    _check(m.n_head > 0, "model.n_head", "must be > 0")
    _check(m.n_embd > 0, "model.n_embd", "must be > 0")
    _check(m.n_embd % m.n_head == 0, "model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}")
    _check((m.n_embd // m.n_head) % 2 == 0, "model.n_embd", "head size (n_embd / n_head) must be even for RoPE")
    _check(m.block_size > 0, "model.block_size", "must be > 0")
    _check(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer)")
    _check(0 <= m.dropout < 1, "model.dropout", "must be in [0, 1)")
    _check(m.mlp_hidden >= 0, "model.mlp_hidden", "must be >= 0")
    _check(recipe.tokenizer.vocab_size >= 300, "tokenizer.vocab_size", "must be >= 300 (256 bytes + specials)")
    _check(recipe.tokenizer.sample_chars > 0, "tokenizer.sample_chars", "must be > 0")
    validate_data(recipe.data)
    _check(recipe.qa.mode in ("context", "closed_book"), "qa.mode", "must be 'context' or 'closed_book'")
    validate_source(recipe.qa.train, "qa.train")
    validate_source(recipe.qa.dev, "qa.dev")
    _check(recipe.qa.max_answer_tokens > 0, "qa.max_answer_tokens", "must be > 0")
    _check(recipe.qa.context_tokens >= 0, "qa.context_tokens", "must be >= 0 (0 = as many as fit the block)")
    _check(recipe.qa.group_by_length >= 0, "qa.group_by_length", "must be >= 0 (0 = off)")
    validate_train(recipe.pretrain, "pretrain")
    validate_train(recipe.finetune, "finetune")
    _check(recipe.eval.val_batches > 0, "eval.val_batches", "must be > 0")
    _check(recipe.eval.squad_questions >= 0, "eval.squad_questions", "must be >= 0")
    _check(recipe.eval.dtype in DTYPES, "eval.dtype", _one_of(DTYPES))
    _check(recipe.eval.squad_subset in SQUAD_SUBSETS, "eval.squad_subset", _one_of(SQUAD_SUBSETS))
    _check(recipe.eval.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0")
    _check(
        recipe.eval.max_new_tokens < m.block_size,
        "eval.max_new_tokens",
        f"must be < model.block_size ({m.block_size}): the question's prompt needs room in the block",
    )
    _check(recipe.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    _check(recipe.eval.long_context in LONG_CONTEXTS, "eval.long_context", _one_of(LONG_CONTEXTS))
    _check(recipe.eval.decoding in DECODINGS, "eval.decoding", _one_of(DECODINGS))
    _check(recipe.eval.context_tokens >= 0, "eval.context_tokens", "must be >= 0 (0 = qa.context_tokens)")
    _check(0 <= recipe.eval.span_calibration <= 2, "eval.span_calibration", "must be in [0, 2] (0 = off)")
    _check(recipe.eval.span_max_starts >= 0, "eval.span_max_starts", "must be >= 0 (0 = every word)")
    _check(
        recipe.eval.decoding != "span" or recipe.qa.mode == "context",
        "eval.decoding",
        "'span' picks a span of the passage, so it needs qa.mode = 'context'",
    )
    g = recipe.generate
    _check(g.temperature >= 0, "generate.temperature", "must be >= 0")
    _check(0 < g.top_p <= 1, "generate.top_p", "must be in (0, 1]")
    _check(g.top_k >= 0, "generate.top_k", "must be >= 0")
    _check(g.repetition_penalty > 0, "generate.repetition_penalty", "must be > 0")
    _check(0 < recipe.serve.port < 65536, "serve.port", "must be in 1..65535")
    for key in ("max_concurrent", "max_tokens", "max_request_bytes", "max_attention_tokens"):
        _check(getattr(recipe.serve, key) > 0, f"serve.{key}", "must be > 0")
    _check(recipe.serve.max_queue >= 0, "serve.max_queue", "must be >= 0")
    return recipe


# --------------------------------------------------------------------------- overrides


def _field_type(cls: type, name: str, dotted: str) -> Any:
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ConfigError(f"unknown key '{dotted}' (known keys here: {', '.join(sorted(hints))})")
    return hints[name]


def _parse_scalar(text: str, tp: Any, key: str) -> Any:
    if tp is str:
        return text
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text.replace("_", "")) if tp is float else int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {text!r}") from None
    try:  # lists and tables: TOML syntax
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{key}: could not parse {text!r} as TOML") from None


def apply_override(data: dict[str, Any], dotted: str, text: str) -> None:
    """Set `dotted` (e.g. "model.n_layer" or "data.sources.squad.weight") in raw recipe dict `data`."""
    parts = dotted.split(".")
    cls: Any = Recipe
    node: Any = data
    path = []
    i = 0
    while i < len(parts):
        part = parts[i]
        path.append(part)
        key = ".".join(path)
        tp = _field_type(cls, part, key)
        last = i == len(parts) - 1
        if typing.get_origin(tp) is list and not last:
            (item_cls,) = typing.get_args(tp)
            items = node.setdefault(part, [])
            selector = parts[i + 1]
            if selector.isdigit() and int(selector) < len(items):
                node = items[int(selector)]
            else:
                matches = [it for it in items if isinstance(it, dict) and it.get("name") == selector]
                if not matches:
                    raise ConfigError(f"{key}: no entry with index or name '{selector}'")
                node = matches[0]
            cls = item_cls
            path.append(selector)
            i += 2
            continue
        if last:
            node[part] = _parse_scalar(text, tp, key)
            return
        if typing.get_origin(tp) is dict and i == len(parts) - 2:  # e.g. data.phases.0.weights.<source>
            _, value_tp = typing.get_args(tp)
            node.setdefault(part, {})[parts[-1]] = _parse_scalar(text, value_tp, f"{key}.{parts[-1]}")
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown key '{dotted}' ('{key}' is not a table)")
        node = node.setdefault(part, {})
        cls = tp
        i += 1


# --------------------------------------------------------------------------- files


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def merge_tables(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it: tables merge key by key, anything else (lists included) replaces."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merge_tables(merged[key], value)
        merged[key] = value
    return merged


def read_recipe_data(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's tables; `extends = "other.toml"` (a path relative to the file) starts from another
    recipe and changes only what the file sets, e.g. a closed-book variant of a recipe in three lines."""
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a recipe file name, not {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in seen or parent_path == path.resolve():
        raise ConfigError(f"{path}: extends '{parent}' makes a cycle")
    return merge_tables(read_recipe_data(parent_path, (*seen, path.resolve())), data)


def load_recipe(path: str | Path, overrides: dict[str, str] | None = None) -> Recipe:
    """Read a recipe TOML (following `extends`), apply command-line overrides, validate, return a Recipe."""
    path = Path(path)
    data = read_recipe_data(path)
    data.setdefault("name", path.stem)
    return recipe_from_dict(data, overrides, origin=str(path))


def recipe_from_dict(data: dict[str, Any], overrides: dict[str, str] | None = None, origin: str = "recipe") -> Recipe:
    for dotted, text in (overrides or {}).items():
        try:
            apply_override(data, dotted, text)
        except ConfigError as exc:
            raise ConfigError(f"override --{dotted}: {exc}") from None
    try:
        return validate(from_dict(Recipe, data))
    except ConfigError as exc:
        blamed = next((dotted for dotted in overrides or {} if exc.key and _sets(dotted, exc.key, data)), None)
        if blamed:  # the value came from the command line, not the file
            raise ConfigError(f"override --{blamed}={overrides[blamed]}: {exc}") from None
        raise ConfigError(f"{origin}: {exc}") from None


def _sets(dotted: str, key: str, data: dict[str, Any]) -> bool:
    """Whether the override `dotted` (list entries by index or name: data.sources.books.weight) set the
    setting `key` (entries by index: data.sources[1].weight), or a table or list holding it."""
    wanted = key.replace("[", ".").replace("]", "").split(".")
    given = dotted.split(".")
    node: Any = data
    for part, want in zip(given, wanted, strict=False):
        if isinstance(node, list):
            entry = node[int(want)] if want.isdigit() and int(want) < len(node) else None
            if part != want and not (isinstance(entry, dict) and entry.get("name") == part):
                return False
            node = entry
        else:
            if part != want:
                return False
            node = node.get(want) if isinstance(node, dict) else None
    return len(given) <= len(wanted)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    from lmforge.io import atomic_write_text

    atomic_write_text(path, tomli_w.dumps(recipe_to_dict(recipe)))
