"""`lmforge data inspect`: what the model will see — counts per source, the mixture it samples per phase (the
run's recipe weights, normalised), document-length and token histograms, and a few decoded samples, read from
the token shards of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.config import load_recipe
from lmforge.data.loader import resolve_phases
from lmforge.data.shards import load_manifest, open_shard, read_index
from lmforge.rundir import RunDir
from lmforge.tokenizer import Tokenizer

LENGTH_BINS = [1, 16, 64, 256, 1024, 4096, 16384, 65536, 2**62]
TOKEN_SAMPLE = 1 << 20  # tokens read per source for the token histogram


def _length_histogram(lengths: np.ndarray) -> dict[str, int]:
    counts, _ = np.histogram(lengths, bins=LENGTH_BINS)
    labels = [
        f"{lo}-{hi - 1}" if hi < 2**62 else f">={lo}" for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:], strict=False)
    ]
    return {label: int(c) for label, c in zip(labels, counts, strict=True) if c}


def _present(data: Path, shard: dict) -> bool:
    return (data / shard["file"]).is_file() and (data / shard["index"]).is_file()


def _source_report(data: Path, entry: dict, tok: Tokenizer, dtype: np.dtype, samples: int, sample_tokens: int) -> dict:
    # train shards that data.delete_consumed removed are reported as deleted; the histograms cover the rest
    present = {split: [s for s in entry["shards"][split] if _present(data, s)] for split in ("train", "val")}
    shards = present["train"] or present["val"]
    lengths = np.concatenate(
        [read_index(data / s["index"])["length"] for split in ("train", "val") for s in present[split]]
        or [np.zeros(0, dtype=np.int64)]
    )
    report = {
        key: entry[key]
        for key in ("name", "docs", "train_docs", "val_docs", "train_tokens", "val_tokens", "duplicates", "dropped")
    }
    report["shards"] = {split: len(entry["shards"][split]) for split in ("train", "val")}
    report["deleted_shards"] = {split: len(entry["shards"][split]) - len(present[split]) for split in ("train", "val")}
    report["doc_tokens"] = _length_histogram(lengths)
    report["mean_doc_tokens"] = round(float(lengths.mean()), 1) if len(lengths) else 0.0
    report["top_tokens"], report["samples"] = [], []
    if not shards:
        return report
    tokens = open_shard(data / shards[0]["file"], dtype, shards[0]["tokens"])
    index = read_index(data / shards[0]["index"])
    counts = np.bincount(tokens[:TOKEN_SAMPLE], minlength=tok.vocab_size)
    for i in np.argsort(counts)[::-1][:10]:
        if counts[i]:
            report["top_tokens"].append(
                {
                    "id": int(i),
                    "token": tok.decode([int(i)], skip_special=False),
                    "share": round(float(counts[i] / counts.sum()), 4),
                }
            )
    for d in np.linspace(0, len(index) - 1, num=min(samples, len(index)), dtype=np.int64).tolist():
        start, length = int(index["offset"][d]), int(index["length"][d])
        ids = tokens[start : start + min(length, sample_tokens)].tolist()
        report["samples"].append(tok.decode(ids))
    return report


def inspect_data(run_dir: str | Path, samples: int = 2, sample_tokens: int = 60) -> dict:
    run = RunDir(Path(run_dir)).require()
    manifest = load_manifest(run.data)
    tok = Tokenizer.load(run.tokenizer)
    dtype = np.dtype(manifest["dtype"])
    sources = [_source_report(run.data, e, tok, dtype, samples, sample_tokens) for e in manifest["sources"]]
    total = sum(s["train_tokens"] for s in sources) or 1
    recipe = load_recipe(run.config)
    weights = {src.name: src.weight for src in recipe.data.sources}
    for s in sources:
        s["train_share"] = round(s["train_tokens"] / total, 4)  # of the tokens in the shards, not of what is sampled
        s["weight"] = weights.get(s["name"])  # the recipe's (the run's config.toml), not a property of the shards
    return {
        "run": str(run.root),
        "dtype": manifest["dtype"],
        "vocab_size": manifest["vocab_size"],
        "tokenizer_hash": manifest["tokenizer_hash"],
        "sources": sources,
        "mixture": _mixture(recipe, sources),
    }


def _mixture(recipe, sources: list[dict]) -> list[dict]:
    """Per phase, the share of batch rows each source gets: the recipe's weights normalised over the sources
    that have a training window (as the loader samples them)."""
    block = recipe.model.block_size
    sampled = {s["name"] for s in sources if s["train_tokens"] > block}
    out = []
    for phase in resolve_phases(recipe.data):
        w = {name: weight for name, weight in phase.weights.items() if name in sampled and weight > 0}
        total = sum(w.values()) or 1.0
        out.append(
            {
                "phase": phase.name,
                "tokens": phase.tokens,
                "shares": {name: round(weight / total, 4) for name, weight in w.items()},
            }
        )
    return out


def format_report(report: dict) -> str:
    lines = [
        f"{report['run']}: vocab {report['vocab_size']:,} ({report['dtype']}), tokenizer {report['tokenizer_hash']}",
        "",
        f"{'source':<18}{'docs':>9}{'train tok':>13}{'val tok':>11}{'tok share':>11}{'dups':>7}  dropped",
    ]
    for s in report["sources"]:
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        lines.append(
            f"{s['name']:<18}{s['docs']:>9,}{s['train_tokens']:>13,}{s['val_tokens']:>11,}"
            f"{s['train_share']:>11.1%}{s['duplicates']:>7,}  {dropped}"
        )
    lines += [
        "(tok share: of the train tokens in the shards; the model samples the mixture below)",
        "",
        "mixture the model samples (share of batch rows: the recipe's weights, normalised):",
    ]
    for i, phase in enumerate(report["mixture"]):
        span = f"{phase['tokens']:,} tokens" if phase["tokens"] else "until the end"
        shares = ", ".join(f"{name} {share:.1%}" for name, share in phase["shares"].items()) or "-"
        lines.append(f"  phase {i + 1} '{phase['phase']}' ({span}): {shares}")
    for s in report["sources"]:
        deleted = s["deleted_shards"]["train"] + s["deleted_shards"]["val"]
        gone = f", {deleted} deleted once consumed (data.delete_consumed): histograms cover the rest" if deleted else ""
        lines += [
            "",
            f"== {s['name']}: {s['shards']['train']} train / {s['shards']['val']} val shards{gone}, "
            f"{s['mean_doc_tokens']:g} tokens per document on average",
        ]
        peak = max(s["doc_tokens"].values(), default=1)
        for label, count in s["doc_tokens"].items():
            lines.append(f"  {label:>12} tokens {'#' * max(1, round(30 * count / peak)):<30} {count:,}")
        if s["top_tokens"]:
            lines.append("  most frequent: " + "  ".join(f"{t['token']!r} {t['share']:.1%}" for t in s["top_tokens"]))
        for text in s["samples"]:
            lines.append(f"  sample: {text!r}")
    return "\n".join(lines)
