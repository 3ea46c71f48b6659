"""The `lmforge` command: a thin layer that parses arguments and calls lmforge.pipeline functions.

Every recipe value can be overridden after the subcommand's own options: `--model.n_layer 4`,
`--pretrain.lr=1e-3`, `--data.sources.tinystories.weight 2`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from lmforge.errors import LmforgeError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"

log = logging.getLogger("lmforge")


class _BarAwareHandler(logging.StreamHandler):
    """Writes each log line through tqdm, which clears the progress bars first and redraws them after, so a
    warning during `prepare` or training gets a line of its own instead of being glued onto a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    handler = _BarAwareHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[lmforge] %(levelname)s %(message)s" if verbose else "[lmforge] %(message)s")
    )
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take recipe overrides ('--a.b 1', '--c.d=x') out of argv before argparse sees it.

    Done first so that an override's value can never be mistaken for a positional argument
    (`lmforge eval --run-dir R --eval.squad_questions 16` must not read 16 as the recipe).
    """
    rest: list[str] = []
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." not in key:
            rest.append(arg)
        elif "=" in arg:
            overrides[key] = arg.split("=", 1)[1]
        elif i + 1 < len(argv):
            overrides[key] = argv[i + 1]
            i += 1
        else:
            raise LmforgeError(f"override --{key} needs a value")
        i += 1
    return rest, overrides


def resolve_recipe_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    raise LmforgeError(
        f"recipe not found: {name} (give a TOML path or one of: "
        f"{', '.join(sorted(p.stem for p in RECIPES_DIR.glob('*.toml')))})"
    )


def load_recipe_for(args, overrides: dict[str, str]):
    """The recipe named on the command line, else the run directory's resolved config.toml."""
    from lmforge.config import load_recipe

    if getattr(args, "recipe", None):
        return load_recipe(resolve_recipe_path(args.recipe), overrides)
    if args.run_dir and (Path(args.run_dir) / "config.toml").is_file():
        return load_recipe(Path(args.run_dir) / "config.toml", overrides)
    raise LmforgeError("give a RECIPE, or a --run-dir that already holds a config.toml")


def _stage_run(args, recipe, stage: str):
    """The run a single stage works in. Only the tokenizer may start a new one (runs/<recipe>-<timestamp>
    without --run-dir): the later stages read what earlier ones left in their run."""
    from lmforge.pipeline import open_run

    if not args.run_dir and stage != "tokenizer":
        raise LmforgeError(
            f"--run-dir is required: {stage} works on a run the earlier stages made "
            "(`lmforge run RECIPE` makes one with every stage)"
        )
    return open_run(recipe, args.run_dir)


# --------------------------------------------------------------------------- subcommands


def cmd_tokenizer_train(args, overrides) -> int:
    from lmforge.pipeline import train_tokenizer_stage

    recipe = load_recipe_for(args, overrides)
    run = _stage_run(args, recipe, "tokenizer")
    tok = train_tokenizer_stage(recipe, run, args.data_dir)
    print(f"tokenizer: {tok.vocab_size} tokens -> {run.tokenizer}")
    return 0


def cmd_prepare(args, overrides) -> int:
    from lmforge.pipeline import prepare_stage, require_tokenizer
    from lmforge.rundir import RunDir

    recipe = load_recipe_for(args, overrides)
    if args.run_dir:  # before the run directory (and its config.toml) is made
        require_tokenizer(RunDir(Path(args.run_dir)))
    run = _stage_run(args, recipe, "prepare")
    manifest = prepare_stage(recipe, run, args.data_dir, force=args.force)
    for src in manifest["sources"]:
        dropped = sum(src.get("dropped", {}).values())
        print(
            f"{src['name']}: {src['docs']} docs, {src['train_tokens']:,} train / {src['val_tokens']:,} val tokens, "
            f"{src.get('duplicates', 0)} duplicates and {dropped} bad or filtered records dropped"
        )
    print(f"see what the model will see: lmforge data inspect {run.root}")
    return 0


def cmd_data_inspect(args, overrides) -> int:
    from lmforge.data.inspect import format_report, inspect_data

    if overrides:
        raise LmforgeError(f"data inspect takes no recipe overrides (got --{next(iter(overrides))})")
    if args.samples < 0:
        raise LmforgeError(f"--samples must be >= 0 (got {args.samples})")
    report = inspect_data(args.run_dir, samples=args.samples)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_pretrain(args, overrides) -> int:
    from lmforge.pipeline import pretrain_stage

    recipe = load_recipe_for(args, overrides)
    result = pretrain_stage(recipe, _stage_run(args, recipe, "pretrain"), resume=args.resume)
    print(f"pretrain: {result.steps} steps, best val loss {result.best_val_loss:.4f} ({result.stop_reason})")
    return 0 if result.stop_reason != "interrupted" else 130


def cmd_finetune(args, overrides) -> int:
    from lmforge.pipeline import finetune_stage

    recipe = load_recipe_for(args, overrides)
    result = finetune_stage(recipe, _stage_run(args, recipe, "finetune"), args.data_dir, resume=args.resume)
    print(f"finetune: {result.steps} steps, best val loss {result.best_val_loss:.4f} ({result.stop_reason})")
    return 0 if result.stop_reason != "interrupted" else 130


def _print_report(report: dict) -> None:
    from lmforge.evaluate import text_metric

    squad = report["squad"]
    print(
        f"val loss {text_metric(report, 'val_loss', 4)} | perplexity {text_metric(report, 'perplexity', 2)} | "
        f"bpb {text_metric(report, 'bpb', 4)} | "
        f"SQuAD EM {squad['em']:.2f} F1 {squad['f1']:.2f} on {squad['n']} questions ({squad['mode']})"
    )


def cmd_eval(args, overrides) -> int:
    from lmforge.evaluate import compare_table, load_report
    from lmforge.pipeline import eval_stage

    if args.compare:
        print(compare_table([load_report(r) for r in args.compare]), end="")
        return 0
    if not args.run_dir:
        raise LmforgeError("--run-dir is required")
    # the run's config.toml records how it was trained; eval's overrides are this evaluation's alone (its
    # report records them), so that a later `generate --question` or eval still follows the run's settings
    run = _run_dir(args.run_dir)
    recipe = load_recipe_for(args, overrides)
    report = eval_stage(recipe, run, args.data_dir, args.checkpoint)
    _print_report(report)
    print(f"report: {run.eval / 'report.md'}")
    return 0


def _generate_checkpoint(run_dir: Path, question: str | None) -> str:
    """The default checkpoint for `generate`: a question goes to the best (fine-tuned) model; free text to
    the pretrained one when the run has it, since a QA fine-tuned model answers briefly and stops."""
    from lmforge.rundir import RunDir

    if question is None and (RunDir(run_dir).checkpoint("pretrained") / "model.safetensors").is_file():
        return "pretrained"
    return "best"


def cmd_generate(args, overrides) -> int:
    from lmforge.config import GenerateConfig
    from lmforge.generate import SamplingParams, generate_stream, stream_text
    from lmforge.pipeline import answer_as_evaluated, load

    if overrides:
        raise LmforgeError(f"generate takes no recipe overrides (got --{next(iter(overrides))})")
    model, tok = load(args.run_dir, args.checkpoint or _generate_checkpoint(Path(args.run_dir), args.question))
    if args.question:
        from lmforge.config import Recipe, load_recipe

        run_recipe = Path(args.run_dir) / "config.toml"
        recipe = load_recipe(run_recipe) if run_recipe.is_file() else Recipe()
        print(answer_as_evaluated(model, tok, recipe, args.question, args.context, args.max_new_tokens))
        return 0
    if not args.prompt:
        raise LmforgeError("give a PROMPT, or --question (with optional --context)")
    d = GenerateConfig()
    params = SamplingParams(
        max_new_tokens=d.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        temperature=d.temperature if args.temperature is None else args.temperature,
        top_k=d.top_k if args.top_k is None else args.top_k,
        top_p=d.top_p if args.top_p is None else args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_ids={tok.eot_id},
    )
    ids = tok.encode(args.prompt)
    if not ids:
        raise LmforgeError("empty prompt")
    sys.stdout.write(args.prompt)
    for piece, _, _ in stream_text(tok.decode, generate_stream(model, ids, params)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_serve(args, overrides) -> int:
    from lmforge.serve import serve

    run_dir = args.run or args.run_dir
    if not run_dir:
        raise LmforgeError("give the RUN directory to serve")
    serve(run_dir, args.checkpoint, args.host, args.port, overrides, args.device)
    return 0


def cmd_export(args, overrides) -> int:
    from lmforge.export import export_hf

    if overrides:
        raise LmforgeError(f"export takes no recipe overrides (got --{next(iter(overrides))})")
    out = export_hf(args.run, args.out, args.checkpoint)
    print(f"exported {args.run} ({args.checkpoint}) in Hugging Face format -> {out}")
    return 0


def cmd_import_hf(args, overrides) -> int:
    from lmforge.export import import_hf

    if overrides:
        raise LmforgeError(f"import-hf takes no recipe overrides (got --{next(iter(overrides))})")
    run = import_hf(args.source, args.run_dir)
    print(f"imported {args.source} -> {run.root} (checkpoints: pretrained, best)")
    return 0


def cmd_probe(args, overrides) -> int:
    from lmforge.probe import parse_probe, probe_run

    if overrides:
        raise LmforgeError(f"probe takes no recipe overrides (got --{next(iter(overrides))})")
    probes = [parse_probe(p) for p in args.probe] if args.probe else None
    report, out = probe_run(args.run, args.checkpoint, args.out, probes)
    print((out / "report.md").read_text(encoding="utf-8"), end="")
    print(f"report and heatmaps: {out}")
    return 0


def cmd_run(args, overrides) -> int:
    from lmforge.config import load_recipe
    from lmforge.pipeline import run_recipe

    if args.recipe:
        recipe = load_recipe(resolve_recipe_path(args.recipe), overrides)
    elif args.resume and args.run_dir:
        recipe = load_recipe(_run_dir(args.run_dir).config, overrides)
    elif args.resume:
        raise LmforgeError("--resume needs --run-dir")
    else:
        raise LmforgeError("give a RECIPE to start a new run, or --resume --run-dir RUN to continue one")
    report = run_recipe(recipe, args.run_dir, args.data_dir, resume=args.resume)
    if not report:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print()
    _print_report(report)
    sample = report["sample"]
    if sample["context"]:
        print(f"context:  {sample['context']}")
    print(f"question: {sample['question']}")
    print(f"answer:   {sample['answer']}")
    print(f"run directory: {report['run_dir']}  (report: {report['run_dir']}/eval/report.md)")
    return 0


def _run_dir(path: str):
    from lmforge.rundir import RunDir

    return RunDir(Path(path)).require()


def cmd_control(args, overrides) -> int:
    from lmforge.train.control import CONTROL_KEYS, describe, read_control_file, write_controls

    if overrides:
        raise LmforgeError(f"control takes --KEY VALUE options, not recipe overrides (got --{next(iter(overrides))})")
    run = _run_dir(args.run)
    values = {k: getattr(args, k) for k in CONTROL_KEYS if getattr(args, k) is not None}
    if not values:
        try:
            current = read_control_file(run.control_file)
        except LmforgeError as exc:
            raise LmforgeError(f"{exc} (a running stage ignores this file)") from None
        print(f"{run.control_file}: {describe(current)}" if current else f"no control values set in {run.control_file}")
        return 0
    merged = write_controls(run, values)
    print(f"{run.control_file}: " + ", ".join(f"{k} = {v}" for k, v in merged.items()))
    return 0


def cmd_stop(args, overrides) -> int:
    from lmforge.train.control import request_stop

    path = request_stop(_run_dir(args.run))
    print(
        f"{path}: the training stage running there stops after its current step and saves a checkpoint "
        "(if none is training, the file is ignored by the next one)"
    )
    return 0


def cmd_plot(args, overrides) -> int:
    from lmforge.train.metrics import plot_losses, plot_runs

    runs = [_run_dir(r) for r in args.runs]
    if len(runs) == 1 and not args.out:
        out = plot_losses(runs[0].metrics, runs[0].plots / "loss.png", title=runs[0].root.name)
    else:
        labels = [r.root.name if [q.root.name for q in runs].count(r.root.name) == 1 else str(r.root) for r in runs]
        out = Path(args.out or runs[0].plots / "compare.png")
        # a folder: an existing one, or a path written with a trailing slash (made if need be)
        out = out / "compare.png" if out.is_dir() or str(args.out or "").endswith(("/", os.sep)) else out
        out = plot_runs(dict(zip(labels, (r.metrics for r in runs), strict=True)), out)
    if out is None:
        raise LmforgeError("no losses logged yet in " + ", ".join(str(r.metrics) for r in runs))
    print(out)
    return 0


def cmd_resize_vocab(args, overrides) -> int:
    from lmforge.config import load_recipe
    from lmforge.pipeline import run_data_dir
    from lmforge.resize import resize_vocab, retrain_tokenizer
    from lmforge.tokenizer import Tokenizer

    if overrides:  # the resize keeps the run's recipe: its data and tokenizer settings make the new shards
        raise LmforgeError(f"resize-vocab takes no recipe overrides (got --{next(iter(overrides))})")
    run = _run_dir(args.run)
    recipe = load_recipe(run.config)
    if (args.tokenizer is None) == (args.vocab_size is None):
        raise LmforgeError("give exactly one of --tokenizer NEW.json or --vocab-size N")
    data_dir = run_data_dir(run, args.data_dir)  # --data-dir, else the one the run was made with
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        tok = retrain_tokenizer(recipe, args.vocab_size, data_dir)
    info = resize_vocab(recipe, run, tok, data_dir)
    print(
        f"vocabulary {info['old_vocab']} -> {info['new_vocab']} rows ({info['kept_rows']} learned rows kept); "
        f"resized checkpoints: {', '.join(info['checkpoints']) or 'none'}; continue with --resume"
    )
    return 0


# --------------------------------------------------------------------------- parser


def training_overrides(args, overrides: dict[str, str]) -> dict[str, str]:
    """--distributed / --fp32 are shorthands for the same key in both training stages; --seed sets the
    recipe's top-level seed."""
    out = dict(overrides)
    if getattr(args, "recipe_seed", None) is not None:
        out.setdefault("seed", str(args.recipe_seed))
    for section in ("pretrain", "finetune"):
        if getattr(args, "distributed", None):
            out.setdefault(f"{section}.distributed", args.distributed)
        if getattr(args, "fp32", False):
            out.setdefault(f"{section}.dtype", "float32")
    return out


@contextlib.contextmanager
def distributed_session(mode: str | None):
    """Join torchrun's process group for the command, and leave it at the end, also when the recipe's
    `distributed` keys joined it (torch is imported only under torchrun or when asked for)."""
    from lmforge.torchrun_env import launched_by_torchrun

    if (not mode or mode == "none") and not launched_by_torchrun():
        yield
        return
    from lmforge.train.distributed import init_distributed, shutdown_distributed

    init_distributed(mode or "none")
    try:
        yield
    finally:
        shutdown_distributed()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train a small GPT-style language model from raw text to a question answerer.",
        epilog="Recipe values can be overridden after the options, e.g. --model.n_layer 4 --pretrain.lr 1e-3.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(
        name: str,
        help_text: str,
        func,
        recipe: bool = True,
        data: bool = True,
        resume: bool = False,
        recipe_default: str = "RUN_DIR/config.toml",
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if recipe:
            p.add_argument("recipe", nargs="?", help=f"recipe TOML path or name (default: {recipe_default})")
        p.add_argument(
            "--run-dir", help="run directory (default: runs/<recipe>-<timestamp>)" if name == "run" else "run directory"
        )
        if data:
            p.add_argument("--data-dir", help="local copies of datasets, used before the Hub (env LMFORGE_DATA_DIR)")
        if resume:
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
            p.add_argument(
                "--distributed",
                choices=["none", "ddp", "fsdp"],
                help="data-parallel (ddp) or fully-sharded (fsdp) training; launch with torchrun",
            )
            p.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 where supported)")
            p.add_argument(
                "--seed",
                type=int,
                dest="recipe_seed",
                help="the recipe's seed: initial weights, data order, dropout (default: the recipe's)",
            )
        p.set_defaults(func=func)
        return p

    tok = sub.add_parser("tokenizer", help="tokenizer commands")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = tok_sub.add_parser(
        "train",
        help="train the byte-level BPE tokenizer on the recipe's sources",
        description="Train the byte-level BPE tokenizer on a sample of the recipe's sources.",
    )
    p.add_argument("recipe", nargs="?", help="recipe TOML path or name (default: RUN_DIR/config.toml)")
    p.add_argument("--run-dir", help="run directory")
    p.add_argument("--data-dir", help="local copies of datasets, used before the Hub (env LMFORGE_DATA_DIR)")
    p.set_defaults(func=cmd_tokenizer_train)

    p = stage("prepare", "tokenize the recipe's sources into token shards (RUN/data)", cmd_prepare)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace shards that the run's checkpoints were trained on (refused otherwise); pretraining "
        "then cannot --resume from them",
    )
    data = sub.add_parser("data", help="look at a run's token shards")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser(
        "inspect",
        help="counts per source, token histograms and decoded samples",
        description="Show what the model will see: per-source counts, shares, duplicates and "
        "dropped records, document-length and token histograms, decoded samples.",
    )
    p.add_argument("run_dir", metavar="RUN", help="run directory (after `lmforge prepare`)")
    p.add_argument("--samples", type=int, default=2, help="decoded documents shown per source (default 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_data_inspect)

    stage("pretrain", "pretrain the language model on the token shards", cmd_pretrain, data=False, resume=True)
    stage("finetune", "fine-tune the pretrained model on SQuAD-style question answering", cmd_finetune, resume=True)
    p = stage(
        "eval", "evaluate: loss, perplexity, bits-per-byte, SQuAD EM/F1; writes RUN/eval/report.{json,md}", cmd_eval
    )
    p.add_argument("--checkpoint", default="best", help="best | last | pretrained | PATH (default: best)")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        help="print one table comparing the eval reports of these run directories (no evaluation)",
    )
    p = stage(
        "run",
        "run every stage of a recipe: tokenizer, prepare, pretrain, finetune, eval, sample answer",
        cmd_run,
        resume=True,
        recipe_default="with --resume, RUN_DIR/config.toml",
    )

    p = sub.add_parser(
        "generate",
        help="generate text or answer a question with a trained model",
        description="Generate a continuation of PROMPT, or answer --question (with --context).",
    )
    p.add_argument("prompt", nargs="?", help="text to continue")
    p.add_argument("--run-dir", required=True, help="run directory")
    p.add_argument(
        "--checkpoint",
        help="best | last | pretrained | PATH (default: pretrained for a PROMPT when the "
        "run has it, best for --question)",
    )
    p.add_argument(
        "--question",
        help="answer this question in the fine-tuned QA format (greedy; with --context "
        "and the run's eval.decoding = 'span', the passage span it finds likeliest)",
    )
    p.add_argument("--context", help="optional context passage for --question")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="at most this many new tokens (default: 64 for a PROMPT; for --question the run's "
        "eval.max_new_tokens, as `lmforge eval` answers)",
    )
    p.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "serve",
        help="serve a run: OpenAI-compatible API, web UI, attention explorer",
        description="Serve a trained run over HTTP: /v1/completions, /v1/chat/completions, "
        "/api/attention, /api/memory and the web page at /. Limits come from the "
        "run's [serve] section (override e.g. --serve.max_concurrent 8).",
    )
    p.add_argument("run", nargs="?", help="run directory")
    p.add_argument("--run-dir", help="run directory (same as RUN)")
    p.add_argument("--checkpoint", help="best | last | pretrained | PATH (default: serve.checkpoint, best)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps (default cpu)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "control",
        help="change a running stage's training values from its next step",
        description="Write RUN/control.toml: the training stage running in RUN applies it at its next "
        "step (a resumed or later-started stage at its start). Without options, print it.",
    )
    p.add_argument("run", help="run directory")
    for key, kind, text in (
        ("lr", float, "peak learning rate of the schedule (AdamW groups)"),
        ("muon_lr", float, "peak learning rate of the Muon groups (optimizer = muon)"),
        ("grad_accum", int, "gradient-accumulation steps (effective batch size)"),
        ("dropout", float, "dropout probability"),
        ("eval_interval", int, "steps between evaluations"),
        ("eval_batches", int, "validation batches per evaluation"),
        ("patience", int, "early-stopping patience in evaluations (0 = off)"),
        ("checkpoint_interval", int, "steps between checkpoints"),
        ("log_interval", int, "steps between logged training losses"),
    ):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, help=text)
    p.set_defaults(func=cmd_control)

    p = sub.add_parser(
        "stop",
        help="stop a training stage gracefully (a `run` moves on to its next stage)",
        description="Write RUN/STOP: the training stage finishes its step, saves a checkpoint and ends; "
        "`lmforge run` then moves on to the next stage (pretraining -> fine-tuning).",
    )
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "plot",
        help="redraw a run's loss plot, or compare several runs on one figure",
        description="Redraw RUN/plots/loss.png; with several runs, draw them on one figure "
        "(default RUN/plots/compare.png of the first run).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument(
        "--out",
        help="the figure's path (.png, .svg, .pdf or .jpg) or a folder for compare.png "
        "(default: RUN/plots/loss.png for one run, the first run's plots/compare.png for several)",
    )
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "resize-vocab",
        help="move a run to a new tokenizer, keeping the learned embedding rows",
        description="Resize every checkpoint's embedding/output matrices to a new tokenizer (rows of "
        "tokens both share are kept, new rows start at the mean embedding), re-tokenize "
        "the shards; continue training with --resume.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--tokenizer", help="the new tokenizer.json")
    p.add_argument("--vocab-size", type=int, help="retrain the run's tokenizer with this vocabulary size instead")
    p.add_argument("--data-dir", help="local copies of datasets, used before the Hub (env LMFORGE_DATA_DIR)")
    p.set_defaults(func=cmd_resize_vocab)

    p = sub.add_parser(
        "export",
        help="export a run's model (Hugging Face format)",
        description="Write RUN's checkpoint as a transformers-loadable directory OUT "
        "(LlamaForCausalLM config + model.safetensors + tokenizer + model card).",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (default: hf)")
    p.add_argument("--checkpoint", default="best", help="best | last | pretrained | PATH (default: best)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import-hf",
        help="import a Llama-architecture Hugging Face model into a run directory",
        description="Read a Hugging Face Llama directory (e.g. one `lmforge export` wrote) into a "
        "new run directory whose pretrained/best checkpoints hold its weights.",
    )
    p.add_argument("source", help="Hugging Face model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--run-dir", required=True, help="new run directory")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser(
        "probe",
        help="coreference attention probes: does a pronoun attend to its referent?",
        description="Word-level attention of pronouns in probe sentences (raw and with the first "
        "token discounted): table + heatmaps in RUN/probe/.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--checkpoint", default="best", help="best | last | pretrained | PATH (default: best)")
    p.add_argument("--out", help="output folder (default: RUN/probe)")
    p.add_argument(
        "--probe",
        action="append",
        metavar="'SENTENCE|PRONOUN|REFERENT'",
        help="probe this sentence instead of the built-in set (repeatable)",
    )
    p.set_defaults(func=cmd_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        rest, raw_overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(rest)
    _setup_logging(args.verbose)
    try:
        if extra:
            raise LmforgeError(f"unrecognised argument '{extra[0]}' (recipe overrides look like --section.key value)")
        overrides = training_overrides(args, raw_overrides)
        with distributed_session(getattr(args, "distributed", None)):
            return args.func(args, overrides)
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
