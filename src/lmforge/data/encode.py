"""Batch tokenization in worker processes, results in input order, a bounded number of batches in flight.

Kept free of torch so that worker processes start fast and small.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.sources import text_hash


@dataclass
class EncodedBatch:
    tokens: np.ndarray  # every document's ids followed by end-of-text, concatenated
    lengths: np.ndarray  # tokens per document (end-of-text included)
    hashes: np.ndarray  # uint64 content hash per document (exact-duplicate removal)
    nbytes: int  # UTF-8 bytes of text encoded (for MB/s)
    doc_bytes: np.ndarray  # UTF-8 bytes per document (the manifest's count, exact across a resume)


class _Encoder:
    def __init__(self, tokenizer_json: str, dtype: str, eot_id: int):
        self.hf = HFTokenizer.from_str(tokenizer_json)
        self.hf.encode_special_tokens = True  # as lmforge.tokenizer.Tokenizer: "<|endoftext|>" in a document is text
        self.dtype = np.dtype(dtype)
        self.eot_id = eot_id

    def __call__(self, texts: list[str]) -> EncodedBatch:
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, enc in enumerate(self.hf.encode_batch(texts, add_special_tokens=False)):
            flat.extend(enc.ids)
            flat.append(self.eot_id)
            lengths[i] = len(enc.ids) + 1
        hashes = np.fromiter((text_hash(t) for t in texts), dtype=np.uint64, count=len(texts))
        doc_bytes = np.fromiter(
            (len(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.int64, count=len(texts)
        )
        return EncodedBatch(np.asarray(flat, dtype=self.dtype), lengths, hashes, int(doc_bytes.sum()), doc_bytes)


_worker: _Encoder | None = None


def _init_worker(tokenizer_json: str, dtype: str, eot_id: int) -> None:
    global _worker
    # one thread per worker: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the pool down
    _worker = _Encoder(tokenizer_json, dtype, eot_id)


def _encode_in_worker(texts: list[str]) -> EncodedBatch:
    assert _worker is not None
    return _worker(texts)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class EncoderPool:
    """Encodes batches of texts in `workers` processes (started on first use, shared by every source), or
    in this process when workers <= 1. Results come back in input order with a bounded number in flight."""

    def __init__(self, tokenizer_json: str, dtype: str, eot_id: int, workers: int):
        self.args = (tokenizer_json, dtype, eot_id)
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.local = _Encoder(*self.args) if workers <= 1 else None

    def map(self, batches: Iterable[list[str]]) -> Iterator[EncodedBatch]:
        if self.local is not None:
            for batch in batches:
                yield self.local(batch)
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=self.args
            )
        max_in_flight = 2 * self.workers  # bounds memory whatever the corpus size
        pending: deque[Future] = deque()
        try:
            for batch in batches:
                pending.append(self.pool.submit(_encode_in_worker, batch))
                if len(pending) >= max_in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early (a token cap, Ctrl-C) leaves nothing queued for the next source
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
