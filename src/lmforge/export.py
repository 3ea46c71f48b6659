"""Hugging Face export and import.

lmforge's model is the Llama architecture on purpose (RoPE in the rotate-half layout, RMSNorm, SwiGLU
gate/up/down, tied embeddings, no biases), so exporting is renaming tensors: the output directory loads
with `AutoModelForCausalLM` / `AutoTokenizer` and gives the same logits. `import_hf` reads such a
directory back into a run directory, for models of the same architecture.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tomllib
from pathlib import Path

import torch

from lmforge.config import Recipe, load_recipe, recipe_from_dict, save_recipe, validate
from lmforge.data.shards import tokenizer_hash
from lmforge.errors import LmforgeError
from lmforge.evaluate import decoding_text, precision_text, subset_text
from lmforge.io import atomic_write_text, move_files_into
from lmforge.model import GPT, GPTConfig
from lmforge.rundir import RunDir
from lmforge.tokenizer import ANSWER, CONTEXT, EOT, PAD, QUESTION, Tokenizer
from lmforge.train.checkpoint import model_weights, save_checkpoint

log = logging.getLogger("lmforge")

# lmforge tensor name -> Hugging Face Llama tensor name ("{i}" is the layer index)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LmforgeError("Hugging Face export needs `transformers` (pip install 'lmforge[hf]')") from None
    return transformers


def to_hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)  # layers.{i}.{rest}
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def from_hf_name(name: str) -> str:
    for ours, theirs in _GLOBAL_NAMES.items():
        if name == theirs:
            return ours
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        for ours, theirs in _LAYER_NAMES.items():
            if rest == theirs:
                return f"layers.{layer}.{ours}"
    raise LmforgeError(f"tensor '{name}' has no counterpart in lmforge's model (not a plain Llama model?)")


def llama_config(cfg: GPTConfig, tok: Tokenizer | None = None):
    """The `LlamaConfig` that describes an lmforge model exactly (special-token ids when `tok` is given)."""
    transformers = _transformers()
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.eot_id if tok else None,
        eos_token_id=tok.eot_id if tok else None,
        pad_token_id=tok.pad_id if tok else None,
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
    )


def to_hf_model(model: GPT, tok: Tokenizer | None = None):
    """A `transformers` LlamaForCausalLM holding exactly `model`'s weights (eval mode)."""
    hf_model = _transformers().LlamaForCausalLM(llama_config(model.cfg, tok))
    weights = {to_hf_name(k): v for k, v in model_weights(model).items()}
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise LmforgeError(f"export mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf_model.tie_weights()
    return hf_model.eval()


def hf_tokenizer(tok: Tokenizer, block_size: int):
    """The tokenizer as a `PreTrainedTokenizerFast` with lmforge's special tokens named."""
    transformers = _transformers()
    return transformers.PreTrainedTokenizerFast(
        model_max_length=block_size,
        tokenizer_object=tok.hf,
        eos_token=EOT,
        bos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[CONTEXT, QUESTION, ANSWER],
        padding_side="left",  # decoder-only batched generation pads on the left
        clean_up_tokenization_spaces=False,
    )


def _portable_tokenizer_class(path: Path) -> None:
    """Name the tokenizer class every transformers version knows (v5 writes its new backend's name)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def _training_summary(run: RunDir) -> str:
    path = run.root / "progress.json"
    progress = json.loads(path.read_text()) if path.is_file() else {}
    parts = [
        f"{stage} {info['steps']} steps (best validation loss {info.get('best_val_loss', float('nan')):.4f})"
        for stage, info in progress.items()
        if isinstance(info, dict) and "steps" in info
    ]
    return "; ".join(parts) or "not recorded"


def _place_in_run(checkpoint: Path, run_root: Path) -> Path:
    """A checkpoint's path inside its run (so a copied or moved run still matches), or its full path."""
    checkpoint, run_root = checkpoint.resolve(), run_root.resolve()
    return checkpoint.relative_to(run_root) if checkpoint.is_relative_to(run_root) else checkpoint


def scored_checkpoint(report: dict, run: RunDir, checkpoint: Path) -> bool:
    """Whether the evaluation `report` scored `checkpoint` of `run`."""
    if "checkpoint" not in report or "run" not in report:
        return False
    return _place_in_run(Path(report["checkpoint"]), Path(report["run"])) == _place_in_run(checkpoint, run.root)


def _evaluation_lines(run: RunDir, checkpoint: Path, report: dict | None) -> list[str]:
    """The model card's scores, only when the run's report scored this very checkpoint, with the decoding
    they were measured with."""
    if not report or "squad" not in report:
        return ["Not evaluated yet (run `lmforge eval`).", ""]
    if not scored_checkpoint(report, run, checkpoint):
        return [
            f"Checkpoint `{checkpoint.name}` was not evaluated: the run's evaluation report scored "
            f"`{report.get('checkpoint', '?')}`. Run `lmforge eval --checkpoint {checkpoint.name}` before "
            "exporting to report its scores.",
            "",
        ]
    sq = report["squad"]
    decoding = sq.get("decoding", {})
    lines = [
        "| metric | value |",
        "|---|---|",
        f"| SQuAD v1.1 dev exact match | {sq['em']:.2f} |",
        f"| SQuAD v1.1 dev F1 | {sq['f1']:.2f} |",
        f"| questions | {sq['n']}{subset_text(sq.get('subset'))} ({sq['mode']}) |",
        f"| precision | {precision_text(report.get('dtype'))} |",
    ]
    if "bpb" in report:
        lines += [
            f"| held-out bits per byte | {report['bpb']:.4f} |",
            f"| held-out perplexity | {report['perplexity']:.2f} |",
        ]
    lines += ["", f"Decoding: {decoding_text(decoding)}.", ""]
    if decoding.get("strategy") == "span":
        lines += [
            'These scores come from lmforge\'s extractive span decoding (`eval.decoding = "span"`: the '
            "likeliest span of the passage), which `transformers`' `generate` does not do; greedy generation "
            "from this model gives other answers and other scores.",
            "",
        ]
    elif "max_new_tokens" in decoding:
        lines += [
            f"The answers were generated greedily (`do_sample=False`, at most {decoding['max_new_tokens']} new "
            "tokens) in the prompt format above, with contexts longer than the room for them cut as "
            "`eval.long_context` in the recipe below says.",
            "",
        ]
    return lines


def model_card(recipe: Recipe, run: RunDir, checkpoint: Path, report: dict | None) -> str:
    """README.md for the export: what it was trained on, with which recipe, and how it scored."""
    sources = (
        "\n".join(
            f"- `{s.name}`: {s.hub or ''}{' / ' if s.hub and s.local else ''}{s.local or ''} (weight {s.weight})"
            for s in recipe.data.sources
        )
        or "- (none recorded)"
    )
    qa = recipe.qa
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [lmforge, llama, question-answering, squad]",
        "datasets: [rajpurkar/squad]",
        "license: cc-by-sa-4.0",
        "---",
        "",
        f"# {recipe.name} (lmforge)",
        "",
        f"A small decoder-only language model ({run.root.name}) trained with lmforge and exported to the Hugging "
        "Face Llama format (`LlamaForCausalLM`). Checkpoint: `" + checkpoint.name + "`.",
        "",
        "## Training data",
        "",
        "Pretraining mixture:",
        "",
        sources,
        "",
        f"Question answering fine-tuning: SQuAD v1.1 train ({qa.train.hub or qa.train.local}), mode "
        f"`{qa.mode}`, loss on answer tokens only. SQuAD is CC BY-SA 4.0 (Rajpurkar et al. 2016).",
        "",
        f"Training: {_training_summary(run)}.",
        "",
        "## Prompt format",
        "",
        "```",
        f"{CONTEXT}{{context}}{QUESTION}{{question}}{ANSWER}"
        if qa.mode == "context"
        else f"{QUESTION}{{question}}{ANSWER}",
        "```",
        "",
        f"The answer ends with `{EOT}`.",
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(run, checkpoint, report),
    ]
    lines += ["## Recipe", "", "```toml", run.config.read_text(encoding="utf-8").strip(), "```", ""]
    return "\n".join(lines)


def _check_export_target(out: Path) -> None:
    """`out` may be new, empty, or hold an earlier export (its config.json); anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LmforgeError(f"{out} exists and is not a folder; choose an empty or new folder")
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise LmforgeError(f"{out} exists and is not an exported model; choose an empty or new folder")


def export_hf(run_dir: str | Path, out: str | Path, checkpoint: str = "best") -> Path:
    """Write a `transformers`-loadable directory for a run's checkpoint; returns `out`.

    The files are written in a staging folder, then each is renamed into `out`: a failed export never leaves
    a half-written file where a good one was, and re-exporting into a folder holding an export (a clone of a
    Hub repository, say) replaces only the files the export writes, leaving `.git`, `.gitattributes` and
    the user's own files alone.
    """
    from lmforge.pipeline import load, resolve_checkpoint

    transformers = _transformers()
    run = RunDir(Path(run_dir)).require()
    model, tok = load(run.root, checkpoint)
    ckpt = resolve_checkpoint(run, checkpoint)
    recipe = load_recipe(run.config)
    report_path = run.eval / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None

    out = Path(out)
    _check_export_target(out)
    staging = out.with_name(f".staging-{out.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        to_hf_model(model, tok).save_pretrained(staging, safe_serialization=True)
        hf_tokenizer(tok, model.cfg.block_size).save_pretrained(staging)
        _portable_tokenizer_class(staging / "tokenizer_config.json")
        g = recipe.generate
        transformers.GenerationConfig(
            do_sample=g.temperature > 0,
            temperature=g.temperature or 1.0,
            top_k=g.top_k,
            top_p=g.top_p,
            repetition_penalty=g.repetition_penalty,
            max_new_tokens=recipe.eval.max_new_tokens,
            bos_token_id=tok.eot_id,
            eos_token_id=tok.eot_id,
            pad_token_id=tok.pad_id,
        ).save_pretrained(staging)
        atomic_write_text(staging / "README.md", model_card(recipe, run, ckpt, report))
        move_files_into(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s (%s) -> %s", run.root, ckpt.name, out)
    return out


# --------------------------------------------------------------------------- import


_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def _read_config(path: Path) -> dict:
    """A Hugging Face config.json, with the keys lmforge's model shape needs (one line when it is not)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path}: not a valid JSON model config ({exc})") from None
    if not isinstance(config, dict):
        raise LmforgeError(f"{path}: not a model config (expected a JSON object)")
    missing = [key for key in _SHAPE_KEYS if not (isinstance(config.get(key), int) and config[key] > 0)]
    if missing:
        raise LmforgeError(f"{path}: missing or not a positive integer: {', '.join(missing)}")
    return config


def _check_llama(config: dict, path: Path) -> None:
    """Refuse (in one line) what lmforge's model cannot represent exactly."""
    problems = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type is {config.get('model_type')!r}, not 'llama'")
    if config.get("num_key_value_heads", config.get("num_attention_heads")) != config.get("num_attention_heads"):
        problems.append("grouped-query attention (num_key_value_heads != num_attention_heads)")
    if not config.get("tie_word_embeddings", False):
        problems.append("untied input/output embeddings")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("bias terms")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {config.get('hidden_act')!r}")
    rope = config.get("rope_scaling") or {}
    rope_params = config.get("rope_parameters") or {}
    if rope or rope_params.get("rope_type", "default") != "default":
        problems.append("RoPE scaling")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        problems.append("head_dim * heads != hidden_size")
    if problems:
        raise LmforgeError(f"{path}: cannot import into lmforge's architecture: {'; '.join(problems)}")


def _rope_theta(config: dict) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0)))


_CARD_RECIPE = re.compile(r"^## Recipe\n\n```toml\n(.*?)\n```", re.S | re.M)


def card_recipe(src: Path) -> Recipe | None:
    """The recipe an lmforge export wrote into its model card (README.md), or None when there is none usable."""
    card = src / "README.md"
    found = _CARD_RECIPE.search(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else None
    if found is None:
        return None
    try:
        return recipe_from_dict(tomllib.loads(found.group(1)), origin=f"{card} (its recipe)")
    except (tomllib.TOMLDecodeError, LmforgeError) as exc:
        log.warning("%s: its recipe is not usable (%s); the imported run gets default settings", card, exc)
        return None


def import_hf(src: str | Path, run_dir: str | Path) -> RunDir:
    """Read a Llama-architecture Hugging Face directory into a new run directory.

    The weights become the run's `pretrained` and `best` checkpoints, so `lmforge finetune`, `eval`,
    `generate` and `serve` work on it. The tokenizer must be one lmforge can use (its special tokens). The
    run's recipe is the one in an lmforge export's model card (data sources, QA and eval settings: answers
    are computed as the original run computed them), else the defaults; its model shape is config.json's.
    """
    from safetensors.torch import load_file

    src = Path(src)
    cfg_path, weights_path, tok_path = src / "config.json", src / "model.safetensors", src / "tokenizer.json"
    for p in (cfg_path, weights_path, tok_path):
        if not p.is_file():
            raise LmforgeError(f"{src}: missing {p.name} (expected a Hugging Face model directory)")
    config = _read_config(cfg_path)
    _check_llama(config, src)
    tok = Tokenizer.load(tok_path)
    if config["vocab_size"] < tok.vocab_size:
        raise LmforgeError(
            f"{src}: the model's vocab_size {config['vocab_size']} is smaller than its tokenizer's "
            f"{tok.vocab_size} tokens"
        )
    cfg = GPTConfig(
        vocab_size=config["vocab_size"],
        n_layer=config["num_hidden_layers"],
        n_head=config["num_attention_heads"],
        n_embd=config["hidden_size"],
        block_size=config["max_position_embeddings"],
        mlp_hidden=config["intermediate_size"],
        rope_theta=_rope_theta(config),
        norm_eps=config.get("rms_norm_eps", 1e-5),
    )
    tensors = {k: v for k, v in load_file(weights_path).items() if k != "lm_head.weight"}
    model = GPT(cfg)
    model.load_state_dict({from_hf_name(k): v.to(torch.float32) for k, v in tensors.items()}, strict=False)
    expected = set(model_weights(model))
    got = {from_hf_name(k) for k in tensors}
    if expected - got:
        raise LmforgeError(f"{weights_path}: missing tensors {sorted(expected - got)[:3]}")

    recipe = card_recipe(src) or Recipe(name=src.name)
    m = recipe.model
    m.n_layer, m.n_head, m.n_embd, m.block_size = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size
    m.vocab_size, m.mlp_hidden, m.rope_theta, m.norm_eps = cfg.vocab_size, cfg.mlp_hidden, cfg.rope_theta, cfg.norm_eps
    validate(recipe)

    run = RunDir(Path(run_dir))
    if run.root.is_dir() and any(run.root.iterdir()):
        raise LmforgeError(f"run directory {run.root} already exists and is not empty")
    run.root.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run.config)
    tok.save(run.tokenizer)
    state = {
        "stage": "import",
        "step": 0,
        "tokens": 0,
        "source": str(src),
        "tokenizer_hash": tokenizer_hash(Tokenizer.load(run.tokenizer)),
    }
    for name in ("pretrained", "best"):
        save_checkpoint(run.checkpoint(name), model, state)
    log.info("imported %s -> %s", src, run.root)
    return run
