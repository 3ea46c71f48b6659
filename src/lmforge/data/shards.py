"""Token shards: every source tokenized once, in parallel, into fixed-size memmappable shard files.

Layout of `RUN/data/`:
  manifest.json                 dtype, vocabulary size, tokenizer hash, shard size, and per source: counts,
                                records dropped by reason, exact duplicates removed, and its shard files
  <source>/train-00000.bin      token ids (uint16, or uint32 for vocabularies over 65,536), each document
  <source>/train-00000.idx.npy  followed by end-of-text; a shard ends at the first document boundary past
  <source>/val-00000.bin ...    `data.shard_tokens`. The index holds per document: offset, length, source id
                                and content hash.
  <source>/progress.json        the source's key (what its shards were made from) and its manifest entry
  .staging/<source>/            a source being (re)made, with its resume point; every staged source is moved into
                                place once all are done, so a failing or interrupted preparation leaves the
                                previous shards and manifest as they were
The validation split is held out by document, so no validation text is ever trained on. Memory stays bounded
whatever the corpus size: documents stream through a fixed number of in-flight batches, and shards are
written as they fill.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from fractions import Fraction
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.config import DataConfig, SourceConfig
from lmforge.data.encode import EncodedBatch, EncoderPool, default_workers
from lmforge.data.sources import DROP_REASONS, iter_documents, local_files, whole_txt_documents
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write, atomic_write_json
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge")

FORMAT = 2
STAGING = ".staging"  # not a possible source name (config: names start with a letter or digit)
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i8"), ("source", "<i4"), ("hash", "<u8")])
BATCH_CHARS = 1 << 20  # text per worker task: large enough to amortise the hand-off, small enough to bound memory
BATCH_DOCS = 4096


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@functools.lru_cache(maxsize=16)
def _split(val_fraction: float) -> tuple[int, int, int]:
    """val_fraction as the ratio p/q it was written as (0.15 -> 3/20, not its binary float), and the position
    of the first validation document, floor(1/(2f)): the middle of the first 1/f documents."""
    ratio = Fraction(val_fraction).limit_denominator(1_000_000)
    return ratio.numerator, ratio.denominator, ratio.denominator // (2 * ratio.numerator)


def is_validation_doc(index: int, val_fraction: float) -> bool:
    """Deterministic split by document position holding out exactly `val_fraction` of the documents (evenly
    spaced, Bresenham-style: document i is held out when floor((i - first) * f) steps up). For f = 1/k this is
    every k-th document from the k//2-th, as lmforge always split (0.05, 0.02: the same documents)."""
    p, q, first = _split(val_fraction)
    return (index - first) * p // q > (index - first - 1) * p // q


def first_validation_index(val_fraction: float) -> int:
    """Position of a source's first validation document: a source needs more documents than this to have one."""
    return _split(val_fraction)[2]


def _no_validation_error(data: DataConfig, entries: list[dict], data_dir: Path | None) -> LmforgeError:
    """Advice that can work: the split is per source and by document, so a source needs enough documents."""
    need = first_validation_index(data.val_fraction) + 1
    if not entries:
        return LmforgeError("no validation documents: no source was available (all optional sources skipped)")
    most = max(entries, key=lambda e: e["docs"])
    advice = ["add documents"]
    if most["docs"] >= 2:  # the first validation document is the floor(1/(2f))-th
        advice.append(f"raise data.val_fraction above {1 / (2 * most['docs']):.3g}")
    whole = [s.name for s in data.sources if whole_txt_documents(s, data_dir)]
    if whole:
        names = ", ".join(f"'{n}'" for n in whole)
        advice.append(f'cut its txt files into documents: sample_by = "paragraph" (or "line") on source {names}')
    return LmforgeError(
        f"no validation documents: at data.val_fraction = {data.val_fraction:g} a source needs at "
        f"least {need} documents, and the largest, '{most['name']}', has {most['docs']}; "
        f"{', or '.join(advice)}"
    )


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()[:16]


def _prepare_again(path: Path) -> str:
    return f"delete {path.parent} and run `lmforge prepare` again"


def read_index(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LmforgeError(f"{path}: unreadable shard index ({exc}); {_prepare_again(path)}") from None


def open_shard(path: Path, dtype: np.dtype, tokens: int) -> np.memmap:
    """A shard's tokens (read-only memmap); a missing file or one of another size than the manifest says is
    one line naming it."""
    if not path.is_file():
        raise LmforgeError(f"{path}: shard missing; {_prepare_again(path)}")
    size, expected = path.stat().st_size, tokens * dtype.itemsize
    if size != expected:
        raise LmforgeError(
            f"{path}: damaged shard ({size:,} bytes, the manifest says {tokens:,} tokens = "
            f"{expected:,} bytes); {_prepare_again(path)}"
        )
    return np.memmap(path, dtype=dtype, mode="r")


class ShardWriter:
    """Writes one split of one source as numbered shards; a shard file appears under its final name only
    once complete (index first, then the tokens)."""

    def __init__(self, folder: Path, split: str, source_id: int, dtype: np.dtype, number: int):
        self.folder, self.split, self.source_id, self.dtype = folder, split, source_id, dtype
        self.number = number
        self.fh = None
        self._reset()

    def _reset(self) -> None:
        self.tokens = 0
        self.offsets, self.lengths, self.hashes = array("q"), array("q"), array("Q")

    def name(self, suffix: str) -> str:
        return f"{self.split}-{self.number:05d}{suffix}"

    def add(self, ids: np.ndarray, content_hash: int) -> None:
        if self.fh is None:
            self.fh = open(self.folder / self.name(".bin.tmp"), "wb")
        self.offsets.append(self.tokens)
        self.lengths.append(len(ids))
        self.hashes.append(content_hash)
        self.fh.write(ids.tobytes())
        self.tokens += len(ids)

    def close_shard(self) -> dict | None:
        """Finish the current shard; returns its manifest entry (None when it is empty)."""
        if self.fh is None:
            return None
        self.fh.close()
        self.fh = None
        index = np.zeros(len(self.offsets), dtype=INDEX_DTYPE)
        index["offset"], index["length"], index["hash"] = self.offsets, self.lengths, self.hashes
        index["source"] = self.source_id
        atomic_write(self.folder / self.name(".idx.npy"), lambda p: np.save(open(p, "wb"), index, allow_pickle=False))
        (self.folder / self.name(".bin.tmp")).replace(self.folder / self.name(".bin"))
        entry = {
            "file": f"{self.folder.name}/{self.name('.bin')}",
            "index": f"{self.folder.name}/{self.name('.idx.npy')}",
            "tokens": self.tokens,
            "docs": len(self.offsets),
        }
        self.number += 1
        self._reset()
        return entry

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            (self.folder / self.name(".bin.tmp")).unlink(missing_ok=True)


def _batched(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _file_identity(path: Path, data_dir: Path | None) -> tuple[str, int, int]:
    """A local file as the reuse key sees it: its path under the data dir (so that an absolute and a relative
    --data-dir, or a moved data folder, name the same file), its size and modification time (an edit in place
    that keeps the size still changes the key)."""
    name = str(path)
    if data_dir is not None:
        try:
            name = path.relative_to(data_dir).as_posix()
        except ValueError:  # an absolute `local` outside the data dir
            pass
    st = path.stat()
    return name, st.st_size, st.st_mtime_ns


def _source_key(
    src: SourceConfig, source_id: int, data: DataConfig, data_dir: Path | None, tok_hash: str, previous: str
) -> str:
    """Changes whenever the source's shards would: its config and local files, its position (the index records
    it), the split, the tokenizer, and, with deduplication (which drops the documents earlier sources had),
    the key of the source before it."""
    cfg = {k: v for k, v in dataclasses.asdict(src).items() if k not in ("weight", "optional")}
    files = [_file_identity(f, data_dir) for f in local_files(src, data_dir)]
    parts = [
        cfg,
        source_id,
        files,
        data.val_fraction,
        data.shard_tokens,
        data.dedup,
        tok_hash,
        previous if data.dedup else "",
        FORMAT,
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def source_keys(data: DataConfig, tok_hash: str, data_dir: Path | None) -> list[str]:
    """The key of every source of the recipe, in order."""
    keys, key = [], ""
    for source_id, src in enumerate(data.sources):
        key = _source_key(src, source_id, data, data_dir, tok_hash, key)
        keys.append(key)
    return keys


def _remove_tree(folder: Path, root: Path) -> None:
    """rmtree `folder`, which must lie strictly inside `root` (RUN/data): a source's folder is built from its
    name, and a name that escaped the config's validation must never delete anything else."""
    inside = folder.resolve(), root.resolve()
    if inside[1] not in inside[0].parents:
        raise LmforgeError(f"refusing to delete {folder}: not a folder inside {root}")
    shutil.rmtree(folder)


def _fresh_progress(key: str) -> dict:
    return {
        "key": key,
        "done": False,
        "stream_pos": 0,
        "next_index": 0,
        "duplicates": 0,
        "bytes": 0,
        "shards": {s: [] for s in SPLITS},
        "entry": None,
    }


def _read_progress(folder: Path) -> dict | None:
    path = folder / "progress.json"
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return progress if isinstance(progress, dict) else None


def _shard_files(progress: dict) -> set[str]:
    return {Path(s[f]).name for split in SPLITS for s in progress["shards"][split] for f in ("file", "index")}


def _is_prepared(folder: Path, key: str) -> bool:
    """The folder holds this source, finished with this key, all its shards present."""
    progress = _read_progress(folder)
    return (
        progress is not None
        and progress.get("key") == key
        and bool(progress.get("done"))
        and all((folder / name).is_file() for name in _shard_files(progress))
    )


def changed_sources(data: DataConfig, tok_hash: str, data_dir: Path | None, out_dir: Path) -> list[str]:
    """The sources whose shards `prepare_shards` would make other than the ones in `out_dir` (config, files,
    tokenizer or position changed, added, or dropped from the recipe). Shards deleted by data.delete_consumed
    are not a change: they are made again, identical."""
    names = {e["name"] for e in load_manifest(out_dir)["sources"]} if has_shards(out_dir) else set()
    changed = []
    for src, key in zip(data.sources, source_keys(data, tok_hash, data_dir), strict=True):
        progress = _read_progress(out_dir / src.name)
        if progress is None or progress.get("key") != key or not progress.get("done"):
            changed.append(src.name)
    return changed + sorted(names - {s.name for s in data.sources})


def _load_progress(folder: Path, key: str, root: Path) -> dict:
    """The saved resume point of this source, or a fresh start (removing a stale or foreign folder)."""
    progress = _read_progress(folder)
    keep = set()
    if progress is not None and progress.get("key") == key:
        keep = _shard_files(progress)
    if progress is None or progress.get("key") != key or not all((folder / name).is_file() for name in keep):
        # changed config, files or tokenizer, or shards deleted (data.delete_consumed): start the source over
        if folder.exists():
            _remove_tree(folder, root)
        folder.mkdir(parents=True)
        return _fresh_progress(key)
    keep.add("progress.json")
    for f in folder.iterdir():  # an unfinished shard from the interrupted run
        if f.name not in keep:
            f.unlink()
    return progress


def _seen_hashes(folder: Path, progress: dict) -> Iterator[int]:
    for split in SPLITS:
        for shard in progress["shards"][split]:
            yield from read_index(folder / Path(shard["index"]).name)["hash"].tolist()


def _source_entry(src: SourceConfig, source_id: int, progress: dict, stats: Counter) -> dict:
    shards = progress["shards"]
    # no weight: the mixture is the recipe's (it may change without the shards changing)
    entry = {
        "name": src.name,
        "id": source_id,
        "key": progress["key"],
        "docs": sum(s["docs"] for split in SPLITS for s in shards[split]),
        "bytes": progress["bytes"],
        "duplicates": progress["duplicates"],
        "dropped": {k: stats[k] for k in DROP_REASONS if stats.get(k)},
        "shards": shards,
    }
    for split in SPLITS:
        entry[f"{split}_tokens"] = sum(s["tokens"] for s in shards[split])
        entry[f"{split}_docs"] = sum(s["docs"] for s in shards[split])
    return entry


def shard_source(
    src: SourceConfig,
    source_id: int,
    data: DataConfig,
    tokenizer: Tokenizer,
    data_dir: Path | None,
    out_dir: Path,
    seen: set[int],
    key: str,
    encoder: EncoderPool,
) -> tuple[dict | None, bool]:
    """The source's shards: its folder when they are already made with this key, else made (or an interrupted
    making resumed) in its staging folder. Returns its manifest entry (None for an optional source that is not
    available) and whether it is staged (to be moved into place when every source is done)."""
    folder = out_dir / src.name
    staged = not _is_prepared(folder, key)
    if staged:
        folder = out_dir / STAGING / src.name
        folder.parent.mkdir(exist_ok=True)
        progress = _load_progress(folder, key, out_dir)
    else:
        progress = _read_progress(folder)
    if data.dedup:
        seen.update(_seen_hashes(folder, progress))
    if progress["done"]:
        log.info("%s: already prepared (%d docs)", src.name, progress["entry"]["docs"])
        return progress["entry"], staged
    if progress["stream_pos"]:
        log.info(
            "%s: resuming after document %d (%d train shards done)",
            src.name,
            progress["stream_pos"],
            len(progress["shards"]["train"]),
        )
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(folder, s, source_id, dtype, len(progress["shards"][s])) for s in SPLITS}
    stats: Counter = Counter()
    docs = islice(iter_documents(src, data_dir, stats), progress["stream_pos"], None)
    tokens = sum(s["tokens"] for split in SPLITS for s in progress["shards"][split])

    def save_point(final: bool = False) -> None:
        for split, writer in writers.items():
            shard = writer.close_shard()
            if shard is not None:
                progress["shards"][split].append(shard)
        if final:
            progress["done"] = True
            progress["entry"] = _source_entry(src, source_id, progress, stats)
        atomic_write_json(folder / "progress.json", progress)

    start, n_docs, n_bytes = time.time(), 0, 0
    bar = tqdm(desc=f"shard {src.name}", unit=" docs", leave=False, dynamic_ncols=True)
    try:
        for batch in encoder.map(_batched(docs)):
            budget = src.max_tokens - tokens if src.max_tokens else None
            tokens += _write_batch(batch, writers, progress, seen, data, save_point, budget)
            n_docs += len(batch.lengths)
            n_bytes += batch.nbytes
            elapsed = max(time.time() - start, 1e-9)
            bar.update(len(batch.lengths))
            bar.set_postfix_str(
                f"{n_bytes / 1e6 / elapsed:.1f} MB/s, {n_docs / elapsed:,.0f} docs/s, {tokens:,} tokens"
            )
            if src.max_tokens and tokens >= src.max_tokens:
                log.info("%s: reached max_tokens=%d", src.name, src.max_tokens)
                break
        save_point(final=True)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
    entry = progress["entry"]
    if entry["docs"] == 0 and stats["records"] == 0 and src.optional:
        return None, staged
    return entry, staged


def _write_batch(
    batch: EncodedBatch,
    writers: dict[str, ShardWriter],
    progress: dict,
    seen: set[int],
    data: DataConfig,
    save_point,
    budget: int | None = None,
) -> int:
    """Route each document of an encoded batch to its split (dropping exact duplicates), saving a resume point
    whenever a train shard fills; stops once `budget` tokens are written. Returns the tokens written."""
    written = 0
    ends = np.cumsum(batch.lengths)
    for j, end in enumerate(ends.tolist()):
        if budget is not None and written >= budget:
            break
        progress["stream_pos"] += 1
        progress["bytes"] += int(batch.doc_bytes[j])  # counted with the position, so a resume counts each once
        h = int(batch.hashes[j])
        if data.dedup:
            if h in seen:
                progress["duplicates"] += 1
                continue
            seen.add(h)
        split = "val" if is_validation_doc(progress["next_index"], data.val_fraction) else "train"
        progress["next_index"] += 1
        writers[split].add(batch.tokens[end - int(batch.lengths[j]) : end], h)
        written += int(batch.lengths[j])
        if writers["train"].tokens >= data.shard_tokens:
            save_point()
    return written


def prepare_shards(data: DataConfig, tokenizer: Tokenizer, data_dir: Path | None, out_dir: Path) -> dict:
    """Tokenize every source of the recipe into `out_dir` (resuming an interrupted run); write and return the
    manifest."""
    if not data.sources:
        raise LmforgeError("recipe has no [[data.sources]]: nothing to pretrain on")
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = data.workers or default_workers()
    tok_hash = tokenizer_hash(tokenizer)
    seen: set[int] = set()
    entries, staged = [], []
    keys = source_keys(data, tok_hash, data_dir)
    with EncoderPool(
        tokenizer.hf.to_str(), token_dtype(tokenizer.vocab_size).name, tokenizer.eot_id, workers
    ) as encoder:
        for source_id, (src, key) in enumerate(zip(data.sources, keys, strict=True)):
            entry, is_staged = shard_source(src, source_id, data, tokenizer, data_dir, out_dir, seen, key, encoder)
            if is_staged:
                staged.append(src.name)
            if entry is None:
                continue
            entry = {k: v for k, v in entry.items() if k != "weight"}  # an entry made before weights left it
            log.info(
                "%s: %d docs, %d train tokens, %d val tokens, %d duplicates dropped",
                src.name,
                entry["docs"],
                entry["train_tokens"],
                entry["val_tokens"],
                entry["duplicates"],
            )
            entries.append(entry)
    if not any(e["val_tokens"] for e in entries):
        raise _no_validation_error(data, entries, data_dir)
    manifest = {
        "format": FORMAT,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_hash": tok_hash,
        "shard_tokens": data.shard_tokens,
        "sources": entries,
    }
    if staged:
        # the previous shards stay until every source is ready; while they are swapped there is no manifest, and
        # an interruption there is finished by the next `prepare` (the staged sources are found done)
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for name in staged:
            if (out_dir / name).exists():
                _remove_tree(out_dir / name, out_dir)
            (out_dir / STAGING / name).replace(out_dir / name)
    atomic_write_json(out_dir / "manifest.json", manifest)
    if (out_dir / STAGING).exists():  # what an earlier, abandoned preparation staged
        _remove_tree(out_dir / STAGING, out_dir)
    return manifest


def shards_fingerprint(manifest: dict) -> str:
    """The identity of the token shards a manifest describes (recorded in pretraining checkpoints): their
    sources' keys, positions and files."""
    parts = [
        manifest["dtype"],
        manifest["tokenizer_hash"],
        [(e["name"], e["id"], e.get("key"), e["shards"]) for e in manifest["sources"]],
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def has_shards(data_dir: Path) -> bool:
    return (data_dir / "manifest.json").is_file()


def load_manifest(data_dir: Path) -> dict:
    path = data_dir / "manifest.json"
    if not has_shards(data_dir):
        raise LmforgeError(f"no token shards in {data_dir} (run `lmforge prepare` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"{path}: unreadable manifest ({exc}); run `lmforge prepare` again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LmforgeError(f"{data_dir}: token shards from an older lmforge (run `lmforge prepare` again)")
    return manifest
