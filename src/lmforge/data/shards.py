"""Token shards: documents tokenized once into flat memmapped arrays, and batches sampled from them.

Layout of `RUN/data/`: `<source>.train.bin` and `<source>.val.bin` (uint16 when the vocabulary fits,
else uint32; documents separated by end-of-text) and `manifest.json` (dtype, counts, tokenizer hash).
The validation split is held out by document, so no validation text is ever trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmforge.config import DataConfig, SourceConfig
from lmforge.data.sources import iter_documents
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_json
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge")

ENCODE_BATCH_DOCS = 64
EVAL_SEED = 0x5EED


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def is_validation_doc(index: int, val_fraction: float) -> bool:
    """Deterministic split by document position: every k-th document, starting from the middle of the first k."""
    k = max(2, round(1 / val_fraction))
    return index % k == k // 2


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()[:16]


@dataclass
class SplitWriter:
    """Append token arrays to a .bin file through a temporary name; `close` renames it into place."""

    path: Path
    dtype: np.dtype
    tokens: int = 0
    docs: int = 0

    def __post_init__(self) -> None:
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.fh = open(self.tmp, "wb")

    def write(self, ids: list[int], eot: int) -> None:
        arr = np.asarray(ids + [eot], dtype=self.dtype)
        self.fh.write(arr.tobytes())
        self.tokens += arr.size
        self.docs += 1

    def close(self) -> None:
        self.fh.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def _batched(items: Iterable[str], n: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_source(src: SourceConfig, data: DataConfig, tokenizer: Tokenizer, data_dir: Path | None,
                    out_dir: Path) -> dict:
    """Tokenize one source into `<name>.train.bin` / `<name>.val.bin`; returns its manifest entry."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: SplitWriter(out_dir / f"{src.name}.{split}.bin", dtype) for split in ("train", "val")}
    index = 0
    chars = 0
    start = time.time()
    bar = tqdm(desc=f"tokenize {src.name}", unit=" docs", leave=False)
    try:
        for batch in _batched(iter_documents(src, data_dir), ENCODE_BATCH_DOCS):
            for ids in tokenizer.encode_batch(batch):
                split = "val" if is_validation_doc(index, data.val_fraction) else "train"
                writers[split].write(ids, tokenizer.eot_id)
                index += 1
            chars += sum(len(t) for t in batch)
            bar.update(len(batch))
            bar.set_postfix(MB_s=f"{chars / 1e6 / max(time.time() - start, 1e-9):.1f}")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    for w in writers.values():
        w.close()
    return {
        "name": src.name,
        "weight": src.weight,
        "docs": index,
        "chars": chars,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_docs": writers["train"].docs,
        "val_docs": writers["val"].docs,
    }


def prepare_shards(data: DataConfig, tokenizer: Tokenizer, data_dir: Path | None, out_dir: Path) -> dict:
    """Tokenize every source of the recipe into `out_dir`; write and return the manifest."""
    if not data.sources:
        raise LmforgeError("recipe has no [[data.sources]]: nothing to pretrain on")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for src in data.sources:
        entry = tokenize_source(src, data, tokenizer, data_dir, out_dir)
        log.info("%s: %d docs, %d train tokens, %d val tokens", src.name, entry["docs"], entry["train_tokens"],
                 entry["val_tokens"])
        entries.append(entry)
    if not any(e["val_tokens"] for e in entries):
        raise LmforgeError("no validation documents: add documents or raise data.val_fraction")
    manifest = {
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "sources": entries,
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_manifest(data_dir: Path) -> dict:
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise LmforgeError(f"no token shards in {data_dir} (run `lmforge prepare` first)")
    return json.loads(path.read_text())


class TokenBatcher:
    """Samples (input, target) windows from the token shards of one split.

    Each row first picks a source by its mixture weight, then a random window in that source's
    memmap, so the corpus is never loaded into memory. The sampling generator's state is the data
    position: saving and restoring it replays exactly the same batches.
    """

    def __init__(self, data_dir: Path, split: str, block_size: int, batch_size: int, seed: int):
        manifest = load_manifest(data_dir)
        dtype = np.dtype(manifest["dtype"])
        self.block_size = block_size
        self.batch_size = batch_size
        self.arrays: list[np.memmap] = []
        weights = []
        for entry in manifest["sources"]:
            n = entry[f"{split}_tokens"]
            if n == 0:
                continue
            if n < block_size + 1:
                log.warning("source '%s' has only %d %s tokens (< block %d); not sampled", entry["name"], n, split,
                            block_size + 1)
                continue
            self.arrays.append(np.memmap(data_dir / f"{entry['name']}.{split}.bin", dtype=dtype, mode="r"))
            weights.append(entry["weight"])
        if not self.arrays:
            raise LmforgeError(f"{data_dir}: no source has {block_size + 1} {split} tokens (lower model.block_size or "
                               "add data)")
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        sources = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        rows = []
        for s in sources.tolist():
            arr = self.arrays[s]
            start = int(torch.randint(len(arr) - self.block_size - 1 + 1, (1,), generator=self.generator))
            rows.append(torch.from_numpy(arr[start : start + self.block_size + 1].astype(np.int64)))
        batch = torch.stack(rows)
        return batch[:, :-1], batch[:, 1:]

    def fixed_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same `n` batches on every call (a fixed evaluation set), not touching the data position."""
        saved = self.generator.get_state()
        self.generator.manual_seed(EVAL_SEED)
        try:
            return [self.next_batch() for _ in range(n)]
        finally:
            self.generator.set_state(saved)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
