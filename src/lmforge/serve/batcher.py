"""Continuous batching: one worker thread decodes every active request of a model in one batched step.

A small model on a CPU spends a decode step mostly reading its weights, so stepping 16 sequences together
costs little more than stepping one. Each request is prefilled alone (batch 1, its own cache), samples its
first token at once (short time to first token), then joins the shared batch. The batch's KV cache holds
every row right-aligned (left padding masked, as in `greedy_batch`); it is rebuilt whenever requests join
or leave, and compacted when the shared timeline reaches the block.

Sampling stays per request (its own temperature, top-k/p, penalty, seed, min tokens), so results equal
`generate_stream`'s up to float rounding differences of batched matrix products.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmforge.generate import SamplingParams, hold_back_stops, sample_next
from lmforge.model import GPT, KVCache

_END = object()
HEADROOM = 64  # decode steps a rebuilt batch cache has room for before it is rebuilt again


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    out: queue.Queue = field(default_factory=queue.Queue)  # token ids, then _END (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    history: torch.Tensor | None = None  # (1, T) prompt + generated ids, for the repetition penalty
    generator: torch.Generator | None = None
    produced: int = 0
    limit: int = 0
    length: int = 0  # tokens of this job in the KV cache
    row: int = -1  # its row in the batch cache
    pending: int = -1  # sampled token not yet fed to the model
    kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (layers, heads, length, head_dim) while between caches
    done: bool = False


class Batcher:
    def __init__(self, model: GPT, max_rows: int):
        self.model = model
        self.max_rows = max_rows
        self.inbox: queue.Queue = queue.Queue()
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="lmforge-batcher", daemon=True)
        self.thread.start()

    # ----------------------------------------------------------------- the caller's side

    def tokens(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """Generated ids of one request, as `generate_stream` yields them; closing the iterator cancels it."""
        if not prompt:
            raise ValueError("empty prompt")
        job = Job(prompt, params)
        self.inbox.put(job)
        try:
            while (item := self._next(job)) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    def _next(self, job: Job):
        while True:
            try:
                return job.out.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():  # closed before it saw this job
                    return RuntimeError("this checkpoint was unloaded; retry the request")

    def close(self) -> None:
        self.inbox.put(None)

    # ----------------------------------------------------------------- the worker

    def _run(self) -> None:
        active: list[Job] = []
        cache: KVCache | None = None
        while True:
            # after close(): finish the requests in hand, then stop
            joined = [] if self._closed else self._take_new(block=not active, room=self.max_rows - len(active))
            if self._closed and not joined and all(job.done or job.cancelled.is_set() for job in active):
                self._refuse_late_arrivals()
                return
            try:
                with torch.inference_mode():
                    joined = [job for job in joined if self._prefill_alone(job)]
                    leaving = [job for job in active if job.done or job.cancelled.is_set()]
                    full = cache is not None and cache.length >= cache.max_len
                    if joined or leaving or full:
                        active = [job for job in active if job not in leaving] + joined
                        cache = self._rebuild(active, cache)
                    if active:
                        self._step(active, cache)
            except Exception as exc:  # noqa: BLE001 - the batched step failed: fail every request in it, keep serving
                for job in active + joined:
                    job.out.put(exc)
                active, cache = [], None

    def _refuse_late_arrivals(self) -> None:
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.out.put(RuntimeError("this checkpoint was unloaded; retry the request"))

    def _take_new(self, block: bool, room: int) -> list[Job]:
        jobs = []
        while len(jobs) < room:
            try:
                job = self.inbox.get(block=block and not jobs)
            except queue.Empty:
                break
            if job is None:
                self._closed = True
                break
            if not job.cancelled.is_set():
                jobs.append(job)
        return jobs

    def _finish(self, job: Job) -> None:
        job.done = True
        job.out.put(_END)

    def _emit(self, job: Job, logits: torch.Tensor) -> None:
        """Sample the job's next token from logits (1, vocab); end the job at a stop id or its limit."""
        nxt = sample_next(hold_back_stops(logits, job.params, job.produced), job.params, job.history, job.generator)
        token = int(nxt)
        if token in job.params.stop_ids:
            self._finish(job)
            return
        job.out.put(token)
        job.produced += 1
        job.history = torch.cat([job.history, nxt.view(1, 1)], dim=1)
        job.pending = token
        if job.produced >= job.limit or job.history.shape[1] >= self.model.cfg.block_size:
            self._finish(job)

    def _fail(self, job: Job, exc: Exception) -> None:
        """End one request with its own error (a bad seed, say); the others in the batch go on."""
        job.done = True
        job.out.put(exc)

    def _prefill_alone(self, job: Job) -> bool:
        try:
            return self._prefill(job)
        except Exception as exc:  # noqa: BLE001 - this request's own failure: only it ends
            self._fail(job, exc)
            return False

    def _prefill(self, job: Job) -> bool:
        """Run the prompt alone and sample the first token; True when the job goes on to the batch."""
        block = self.model.cfg.block_size
        device = self.model.tok_emb.weight.device
        job.limit = min(job.params.max_new_tokens, block - 1)
        prompt = job.prompt[-(block - job.limit) :]
        job.history = torch.tensor([prompt], dtype=torch.long, device=device)
        if job.params.seed is not None:
            job.generator = torch.Generator(device=device).manual_seed(job.params.seed)
        cache = self.model.new_cache(1, len(prompt))
        logits = self.model(job.history, cache=cache, last_only=True)[:, -1]
        job.length = len(prompt)
        job.kv = (cache.k[:, 0], cache.v[:, 0])
        self._emit(job, logits)
        return not job.done

    def _rebuild(self, jobs: list[Job], old: KVCache | None) -> KVCache | None:
        """A fresh batch cache with every job's keys/values right-aligned at the longest job's length."""
        if old is not None:  # take the survivors' rows out of the old cache first
            for job in jobs:
                if job.kv is None:
                    k = old.k[:, job.row, :, old.length - job.length : old.length]
                    v = old.v[:, job.row, :, old.length - job.length : old.length]
                    job.kv = (k, v)
        if not jobs:
            return None
        width = max(job.length for job in jobs)
        p = self.model.tok_emb.weight
        # room for HEADROOM more steps, not the whole block: memory follows use; a full cache is rebuilt
        room = min(self.model.cfg.block_size, width + HEADROOM)
        cache = KVCache(self.model.cfg, len(jobs), room, p.device, p.dtype)
        for row, job in enumerate(jobs):
            k, v = job.kv
            cache.k[:, row, :, width - job.length : width] = k
            cache.v[:, row, :, width - job.length : width] = v
            cache.valid[row, : width - job.length] = False
            cache.next_pos[row] = job.length
            job.row = row
            job.kv = None
        cache.length = width
        cache.has_padding = any(job.length < width for job in jobs)
        return cache

    def _step(self, jobs: list[Job], cache: KVCache) -> None:
        device = self.model.tok_emb.weight.device
        inputs = torch.tensor([[job.pending] for job in jobs], dtype=torch.long, device=device)
        logits = self.model(inputs, cache=cache, last_only=True)[:, -1]
        for row, job in enumerate(jobs):
            job.length += 1
            if not job.cancelled.is_set():
                try:
                    self._emit(job, logits[row : row + 1])
                except Exception as exc:  # noqa: BLE001 - sampling for this request failed: only it ends
                    self._fail(job, exc)
