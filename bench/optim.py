"""Muon vs AdamW: validation loss after the same number of tokens, each optimizer at its best lr of a small grid.

Both run lmforge's own pretraining stage (same recipe, data, seed, schedule, bf16/fp32 choice) on one
prepared run directory; only the optimizer and its peak lr change. Prints every run's final validation
loss, the best lr per optimizer, the ratio muon/adamw of their best losses, and draws both best
validation curves on one plot.

    python bench/optim.py --out /tmp/optim-bench                   # cpu-small, the default small budget
    python bench/optim.py --out /tmp/ob --steps 200 --batch 16     # a bigger token budget

The run is `steps * batch * block` tokens per optimizer setting (default 100 x 8 x 128 = 102,400); each
grid entry takes a few minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import add_threads_option, apply_threads_option  # noqa: E402

from lmforge.config import load_recipe  # noqa: E402
from lmforge.data.sources import data_dir_from_env  # noqa: E402
from lmforge.pipeline import open_run, prepare_stage, pretrain_stage, train_tokenizer_stage  # noqa: E402
from lmforge.rundir import RunDir  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# (optimizer, override of its peak lr); Muon's AdamW part (embedding, norms) uses --adamw-lr-for-muon
GRID = (("adamw", "1e-3"), ("adamw", "3e-3"), ("adamw", "1e-2"), ("muon", "0.01"), ("muon", "0.03"), ("muon", "0.1"))


def prepared_run(recipe_name: str, out: Path, overrides: dict[str, str], data_dir: str | None) -> Path:
    """Tokenizer and shards made once, shared by every optimizer run (of this recipe: another one is refused)."""
    base = out / "base"
    made_for = base / "bench_recipe"
    if made_for.is_file() and made_for.read_text() != recipe_name:
        sys.exit(f"{out} holds runs of recipe {made_for.read_text()!r}: use another --out for {recipe_name!r}")
    if not (base / "data" / "manifest.json").is_file():
        recipe = load_recipe(RECIPES / f"{recipe_name}.toml", overrides)
        run = open_run(recipe, base)
        train_tokenizer_stage(recipe, run, data_dir)
        prepare_stage(recipe, run, data_dir)
        made_for.write_text(recipe_name)
    return base


def train_one(
    recipe_name: str, base: Path, out: Path, overrides: dict[str, str], opt: str, lr: str, adamw_lr: str, budget: dict
) -> dict:
    name = f"{opt}-lr{lr}"
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(
        base,
        run_dir,
        ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "tensorboard", "plots", "progress.json"),
    )
    ov = dict(overrides)
    ov["pretrain.optimizer"] = opt
    if opt == "muon":
        ov["pretrain.muon_lr"] = lr
        ov["pretrain.lr"] = adamw_lr
    else:
        ov["pretrain.lr"] = lr
    recipe = load_recipe(RECIPES / f"{recipe_name}.toml", ov)
    run = RunDir(run_dir)
    start = time.time()
    result = pretrain_stage(recipe, run)
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    val = [(r["tokens"], r["loss"]) for r in records if r.get("split") == "val"]
    print(f"{name:16s} final val loss {result.last_val_loss:.4f}  ({time.time() - start:.0f} s)", flush=True)
    out = {"name": name, "optimizer": opt, "lr": lr, "final": result.last_val_loss, "val": val, **budget}
    (run_dir / "bench_result.json").write_text(json.dumps(out))  # one file per run: grid entries may run in parallel
    return out


def plot(best: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for opt, r in best.items():
        xs, ys = zip(*r["val"], strict=True)
        ax.plot(xs, ys, "o-", label=f"{opt} (lr {r['lr']}): {r['final']:.3f}", markersize=3)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="cpu-small")
    parser.add_argument("--out", required=True, help="work directory (runs, results.json, muon_vs_adamw.png)")
    parser.add_argument("--data-dir", help="local dataset copies (default $LMFORGE_DATA_DIR or ../shared/data)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--adamw-lr-for-muon", default="3e-3", help="AdamW lr of the embedding/norms under muon")
    parser.add_argument(
        "--only",
        nargs="*",
        help="grid entries to run, e.g. muon:0.01 (finished runs in --out "
        "are read back, so entries can run as separate, even parallel, commands)",
    )
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads_option(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir_from_env(args.data_dir) or Path(__file__).resolve().parents[2] / "shared" / "data"
    # a smaller tokenizer sample and corpus than the recipe's, so that preparing takes a minute, not an hour
    data_ov = {
        "tokenizer.sample_chars": "3_000_000",
        "data.sources.squad-contexts.max_docs": "6000",
        "data.sources.gutenberg.max_docs": "8",
    }
    train_ov = {
        "model.block_size": str(args.block),
        "pretrain.batch_size": str(args.batch),
        "pretrain.max_steps": str(args.steps),
        "pretrain.warmup_steps": str(max(1, args.steps // 10)),
        "pretrain.eval_interval": str(max(1, args.steps // 6)),
        "pretrain.eval_batches": "4",
        "pretrain.checkpoint_interval": str(args.steps),
        "pretrain.log_interval": "10",
    }
    base = prepared_run(args.recipe, out, data_ov, data_dir)
    # what makes two runs comparable: a finished run in --out with another budget is left out of the results
    budget = {
        "recipe": args.recipe,
        "steps": args.steps,
        "batch": args.batch,
        "block": args.block,
        "adamw_lr_for_muon": args.adamw_lr_for_muon,
    }
    for opt, lr in GRID:
        if args.only is None or f"{opt}:{lr}" in args.only:
            train_one(args.recipe, base, out, {**data_ov, **train_ov}, opt, lr, args.adamw_lr_for_muon, budget)
    results = {}
    for path in sorted(out.glob("*/bench_result.json")):
        result = json.loads(path.read_text())
        if all(result.get(k) == v for k, v in budget.items()):
            results[path.parent.name] = result
        else:
            print(f"{path.parent.name}: left out (made with another budget or recipe)")
    tokens = args.steps * args.batch * args.block
    best = {}
    for opt in ("adamw", "muon"):
        runs = [r for r in results.values() if r["optimizer"] == opt]
        if runs:
            best[opt] = min(runs, key=lambda r: r["final"])
            print(f"best {opt}: lr {best[opt]['lr']} -> val loss {best[opt]['final']:.4f}")
    if len(best) == 2:
        title = f"{args.recipe}: validation loss, {tokens:,} tokens ({args.steps} steps x {args.batch} x {args.block})"
        plot(best, out / "muon_vs_adamw.png", title)
        print(
            f"optim: {args.recipe} {tokens:,} tokens, val loss muon {best['muon']['final']:.3f} / adamw "
            f"{best['adamw']['final']:.3f} = {best['muon']['final'] / best['adamw']['final']:.3f}x "
            f"(plot: {out / 'muon_vs_adamw.png'})"
        )


if __name__ == "__main__":
    main()
