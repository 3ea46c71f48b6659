"""Data benchmarks, every figure a ratio against a baseline measured in the same run.

1. Sharding throughput: lmforge `prepare_shards` on all cores vs single-process, single-thread encoding of
   the same text, and vs a plain `tokenizers` `encode_batch` loop (which uses all cores itself).
2. Peak RSS (the whole process tree, summed) of `prepare_shards` on generated 100 MB and 1 GB corpora.
3. Loader throughput (prefetching TokenBatcher) vs the token consumption of a cpu-small training step.

    python bench/data.py            # throughput, loader, and the 100 MB peak-RSS point (minutes)
    python bench/data.py --gb       # also the 1 GB peak-RSS point (much longer on 2 cores)
    python bench/data.py --rss-only --gb   # only the two peak-RSS points

Generated corpora live in a temporary folder under /tmp and are deleted afterwards. Ends with one line:
    data: parallel/single X.XX, vs encode_batch X.XX, peak RSS 100MB A MB, 1GB B MB
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DATA = Path(os.environ.get("LMFORGE_TEST_DATA", REPO.parent / "shared" / "data"))
SOURCES = [
    "pretrain/gutenberg/gutenberg_books.jsonl.gz",
    "pretrain/tinystories/tinystories_samples.jsonl.gz",
    "pretrain/us-speeches/us_presidential_speeches.jsonl.gz",
    "pretrain/web-sample/c4_cc_web_sample.jsonl.gz",
]


def real_paragraphs(chunk_chars: int = 4000) -> list[str]:
    """Real text from ../shared/data, long books cut into documents of about chunk_chars characters."""
    out = []
    for rel in SOURCES:
        with gzip.open(DATA / rel, "rt", encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                out += [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    return out


def write_corpus(path: Path, paragraphs: list[str], megabytes: float) -> int:
    """A JSONL corpus of `megabytes` of text; a running number keeps every document unique (no dedup drops)."""
    target, written, i = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            text = f"[{i}] {paragraphs[i % len(paragraphs)]}"
            fh.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode())
            i += 1
    return written


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS of the process tree in MB, stdout) of a child command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the workers, reaped by the child
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}")
    return wall, cpu, peak / 2**20, out


# --------------------------------------------------------------------------- child steps


def child_encode(corpus: Path, tokenizer: Path) -> None:
    """Baseline: read the JSONL and encode_batch it, 1,000 documents at a time (threads as the env allows)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tokens, batch = 0, []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
                batch = []
    tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    print(tokens)


def child_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> None:
    from lmforge.config import DataConfig, SourceConfig
    from lmforge.data.shards import prepare_shards
    from lmforge.tokenizer import Tokenizer

    cfg = DataConfig(sources=[SourceConfig(name="corpus", local=str(corpus))], workers=workers, val_fraction=0.01)
    manifest = prepare_shards(cfg, Tokenizer.load(tokenizer), None, out)
    print(sum(e["train_tokens"] + e["val_tokens"] - e["docs"] for e in manifest["sources"]))  # minus end-of-text


def child_loader(shards: Path) -> None:
    """Loader tokens/s vs a cpu-small training step's tokens/s, in one process."""
    import torch

    from lmforge.config import load_recipe
    from lmforge.data.loader import TokenBatcher
    from lmforge.model import GPT, GPTConfig, lm_loss
    from lmforge.train.loop import make_optimizer

    recipe = load_recipe(REPO / "recipes" / "cpu-small.toml")
    m, p = recipe.model, recipe.pretrain
    vocab = json.loads((shards / "manifest.json").read_text())["vocab_size"]
    loader = TokenBatcher(shards, "train", m.block_size, p.batch_size, seed=0, prefetch=recipe.data.prefetch)
    loader.next_batch()
    n, start = 300, time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    loader_tps = n * loader.tokens_per_batch / (time.perf_counter() - start)
    loader.close()
    model = GPT(
        GPTConfig(vocab_size=vocab, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size)
    )
    opt = make_optimizer(model, p, torch.device("cpu"))
    x, y = loader.next_batch()
    steps = []
    for _ in range(3):  # the first step warms up
        t = time.perf_counter()
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t)
    train_tps = x.numel() / min(steps[1:])
    print(json.dumps({"loader": loader_tps, "train": train_tps}))


# --------------------------------------------------------------------------- the benchmark


def throughput_and_loader(me: list[str], tmp: Path, tok_path: str, paragraphs: list[str], megabytes: float):
    """Sharding throughput vs the two baselines, then loader vs training-step tokens/s; returns the ratios."""
    corpus = tmp / "corpus.jsonl"
    nbytes = write_corpus(corpus, paragraphs, megabytes)
    mb = nbytes / 1e6
    cores = len(os.sched_getaffinity(0))
    single_env = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    t_single, c_single, _, tok_single = measured(me + ["encode", str(corpus), tok_path], single_env)
    t_batch, c_batch, _, tok_batch = measured(me + ["encode", str(corpus), tok_path])
    t_ours, c_ours, _, tok_ours = measured(me + ["prepare", str(corpus), tok_path, str(tmp / "s"), "0"])
    assert int(tok_single) == int(tok_batch) == int(tok_ours), (tok_single, tok_batch, tok_ours)
    print(
        f"throughput on {mb:.1f} MB, {cores} cores: single-process {mb / t_single:.2f} MB/s, encode_batch loop "
        f"{mb / t_batch:.2f} MB/s, lmforge sharding {mb / t_ours:.2f} MB/s (wall clock)"
    )
    # On a machine shared with other work the wall-clock ratios understate parallelism; CPU seconds per MB
    # do not depend on how many cores were free: the speed-up N idle cores would give is N x single / ours.
    print(
        f"CPU seconds per MB: single {c_single / mb:.2f}, encode_batch {c_batch / mb:.2f}, lmforge {c_ours / mb:.2f}"
        f" -> on {cores} idle cores lmforge would run {cores * c_single / c_ours:.2f}x single-process"
    )

    out = measured(me + ["loader", str(tmp / "s")])[3]
    loader = json.loads(out)
    print(
        f"loader {loader['loader']:,.0f} tokens/s vs cpu-small training step {loader['train']:,.0f} tokens/s: "
        f"{loader['loader'] / loader['train']:.0f}x"
    )
    shutil.rmtree(tmp / "s")
    corpus.unlink()

    return t_single / t_ours, t_batch / t_ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", action="store_true", help="also measure peak RSS on the 1 GB corpus (slow on few cores)")
    ap.add_argument("--mb", type=float, default=16, help="text for the throughput comparison (MB)")
    ap.add_argument(
        "--rss-mb",
        type=float,
        nargs=2,
        default=(100, 1000),
        metavar=("SMALL", "LARGE"),
        help="corpus sizes of the two peak-RSS points (default 100 1000)",
    )
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS points")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        step, *rest = args.child
        {
            "encode": lambda: child_encode(Path(rest[0]), Path(rest[1])),
            "prepare": lambda: child_prepare(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3])),
            "loader": lambda: child_loader(Path(rest[0])),
        }[step]()
        return

    from lmforge.tokenizer import train_tokenizer

    me = [sys.executable, __file__, "--child"]
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-data-", dir="/tmp"))
    try:
        paragraphs = real_paragraphs()
        tok = train_tokenizer(paragraphs, vocab_size=8192, sample_chars=3_000_000)
        tok.save(tmp / "tokenizer.json")
        tok_path = str(tmp / "tokenizer.json")
        parallel_single = vs_batch = float("nan")
        if not args.rss_only:
            parallel_single, vs_batch = throughput_and_loader(me, tmp, tok_path, paragraphs, args.mb)
        rss = {}
        for i, size in enumerate(args.rss_mb):  # labelled by the sizes measured ("100MB", "1GB" by default)
            label = f"{size / 1000:g}GB" if size >= 1000 else f"{size:g}MB"
            if i == 1 and not args.gb:
                rss[label] = float("nan")
                continue
            big = tmp / f"{label}.jsonl"
            write_corpus(big, paragraphs, size)
            seconds, cpu, peak, _ = measured(me + ["prepare", str(big), tok_path, str(tmp / label), "0"])
            print(
                f"{label}: prepared in {seconds:.0f} s ({size / seconds:.2f} MB/s, {cpu / size:.2f} CPU s/MB), "
                f"peak RSS {peak:.0f} MB"
            )
            rss[label] = peak
            big.unlink()
            shutil.rmtree(tmp / label)
        print(
            f"data: parallel/single {parallel_single:.2f}, vs encode_batch {vs_batch:.2f}, "
            "peak RSS " + ", ".join(f"{label} {peak:.0f} MB" for label, peak in rss.items())
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
