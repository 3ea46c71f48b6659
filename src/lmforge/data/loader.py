"""Pretraining batches: a phased, weighted, shuffled mixture of the token shards, read by memmap.

Each source's split is read in order as windows of block_size + 1 tokens (shard after shard, and from the
start again when it runs out) through a bounded shuffle buffer; each row of a batch picks its source by the
current phase's weights, and a phase ends when its token budget is served. The whole data position (RNG
state, each source's cursor and buffer, tokens served) is small and goes into checkpoints, so a resumed run
sees exactly the batches an uninterrupted one would. A background thread prepares the next batches ahead
(prefetch) without changing which batches they are.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import DataConfig
from lmforge.data.shards import load_manifest, open_shard
from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")

EVAL_SEED = 0x5EED
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Phase:
    name: str
    tokens: int  # token budget; 0 = until training ends
    weights: dict[str, float]


def resolve_phases(data: DataConfig) -> list[Phase]:
    """The recipe's phases; no phases = one phase with the sources' weights."""
    source_weights = {s.name: s.weight for s in data.sources}
    if not data.phases:
        return [Phase("mixture", 0, source_weights)]
    return [
        Phase(p.name or f"phase {i + 1}", p.tokens, dict(p.weights) or source_weights)
        for i, p in enumerate(data.phases)
    ]


def log_phase_plan(phases: list[Phase], tokens_per_step: int, total_steps: int) -> None:
    """Say at which step each phase starts; warn about a phase this run never reaches."""
    start = 0
    for i, phase in enumerate(phases):
        step = -(-start // tokens_per_step)
        if step >= total_steps:
            log.warning(
                "data phase %d '%s' starts at step %d, after this run's %d steps (lower the earlier phases' tokens)",
                i + 1,
                phase.name,
                step,
                total_steps,
            )
        elif len(phases) > 1:
            log.info("data phase %d '%s' from step %d", i + 1, phase.name, step)
        start += phase.tokens


class SourceStream:
    """One source's split as a single sequence of windows over its shards (memmaps opened on first use)."""

    def __init__(
        self,
        name: str,
        data_dir: Path,
        shards: list[dict],
        dtype: np.dtype,
        block_size: int,
        delete_consumed: bool = False,
    ):
        self.name, self.dtype, self.block_size, self.delete_consumed = name, dtype, block_size, delete_consumed
        self.paths = [data_dir / s["file"] for s in shards]
        self.tokens = [s["tokens"] for s in shards]
        self.index_paths = [data_dir / s["index"] for s in shards]
        # windows start every block_size tokens and overlap by one (the last target)
        self.ends = np.cumsum([max(0, (s["tokens"] - 1) // block_size) for s in shards], dtype=np.int64)
        self.total = int(self.ends[-1]) if len(self.ends) else 0
        self._maps: dict[int, np.memmap] = {}

    def locate(self, g: int) -> tuple[int, int]:
        """(shard, window within the shard) of sequential window number g (wrapping around)."""
        w = g % self.total
        shard = int(np.searchsorted(self.ends, w, side="right"))
        return shard, w - (int(self.ends[shard - 1]) if shard else 0)

    def window(self, g: int) -> np.ndarray:
        shard, k = self.locate(g)
        if shard not in self._maps:
            if self.delete_consumed and not self.paths[shard].is_file():
                raise LmforgeError(
                    f"{self.paths[shard]}: shard missing; source '{self.name}' was deleted as it was "
                    "consumed (data.delete_consumed) and cannot be read again: prepare more data or "
                    "lower its share"
                )
            self._maps[shard] = open_shard(self.paths[shard], self.dtype, self.tokens[shard])
        start = k * self.block_size
        return self._maps[shard][start : start + self.block_size + 1]

    def random_window(self, rng: np.random.Generator) -> np.ndarray:
        return self.window(int(rng.integers(self.total)))

    def delete_before(self, g: int) -> int:
        """Delete the shards every window of which lies before sequential window g."""
        deleted = 0
        for shard, end in enumerate(self.ends.tolist()):
            if end <= min(g, self.total) and self.paths[shard].is_file():
                self._maps.pop(shard, None)
                self.paths[shard].unlink()
                self.index_paths[shard].unlink(missing_ok=True)
                deleted += 1
        return deleted


class MixtureSampler:
    """The deterministic part: which window each row of each batch is. Its state is the data position."""

    def __init__(self, streams: list[SourceStream], phases: list[Phase], batch_size: int, seed: int, buffer_size: int):
        self.streams, self.batch_size, self.buffer_size = streams, batch_size, buffer_size
        names = [s.name for s in streams]
        self.phases = phases
        self.probs = []
        for phase in phases:
            w = np.array([phase.weights.get(n, 0.0) for n in names], dtype=np.float64)
            dropped = sorted(set(phase.weights) - set(names))
            if dropped:
                log.warning(
                    "phase '%s': sources %s have no training data here; their weight is dropped",
                    phase.name,
                    ", ".join(dropped),
                )
            if w.sum() <= 0:
                raise LmforgeError(
                    f"phase '{phase.name}': none of its sources ({', '.join(phase.weights)}) has training data"
                )
            self.probs.append(w / w.sum())
        self.rng = np.random.default_rng(seed)
        self.cursors = [0] * len(streams)
        self.buffers = [np.zeros(0, dtype=np.int64) for _ in streams]
        self.tokens = 0
        self.phase = 0

    def _phase_end(self, phase: int) -> float:
        budgets = [p.tokens for p in self.phases[: phase + 1]]
        return float("inf") if budgets[-1] == 0 else float(sum(budgets))

    def _draw(self, s: int) -> int:
        """Next window of source s through its shuffle buffer (filled from the sequential cursor)."""
        stream, buf = self.streams[s], self.buffers[s]
        if len(buf) < self.buffer_size:
            n = self.buffer_size - len(buf)
            buf = self.buffers[s] = np.concatenate([buf, np.arange(self.cursors[s], self.cursors[s] + n)])
            self.cursors[s] += n
        j = int(self.rng.integers(len(buf)))
        g = int(buf[j])
        buf[j] = self.cursors[s]
        self.cursors[s] += 1
        if self.cursors[s] % stream.total == 0:
            log.info(
                "source '%s': all %d windows queued; starting pass %d",
                stream.name,
                stream.total,
                self.cursors[s] // stream.total + 1,
            )
        return g

    def next_rows(self) -> tuple[list[tuple[int, int]], list[dict]]:
        """(source, window) for every row of the next batch, and the events it starts (phase changes)."""
        events = []
        while self.phase + 1 < len(self.phases) and self.tokens >= self._phase_end(self.phase):
            self.phase += 1
            phase = self.phases[self.phase]
            log.info(
                "data phase %d: %s (%s)",
                self.phase + 1,
                phase.name,
                ", ".join(f"{k} {v:g}" for k, v in phase.weights.items()),
            )
            events.append({"event": "phase", "phase": phase.name, "label": f"phase {self.phase + 1}: {phase.name}"})
        sources = self.rng.choice(len(self.streams), size=self.batch_size, p=self.probs[self.phase])
        rows = [(int(s), self._draw(int(s))) for s in sources]
        self.tokens += self.batch_size * self.streams[0].block_size
        return rows, events

    def min_live(self, state: dict) -> dict[str, int]:
        """Per source, the first sequential window a sampler in `state` may still read."""
        out = {}
        for s, name in enumerate(state["sources"]):
            buf = state["buffers"][name]
            out[name] = min(int(buf.min()) if len(buf) else state["cursors"][s], state["cursors"][s])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "sources": [s.name for s in self.streams],
            "rng": self.rng.bit_generator.state,
            "cursors": list(self.cursors),
            "buffers": {s.name: torch.from_numpy(b.copy()) for s, b in zip(self.streams, self.buffers, strict=True)},
            "tokens": self.tokens,
            "phase": self.phase,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [s.name for s in self.streams]
        if list(state["sources"]) != names:
            raise LmforgeError(
                f"the checkpoint's data position is for sources {state['sources']}, the shards have "
                f"{names} (run prepare again with the same sources, or start a new run)"
            )
        self.rng.bit_generator.state = state["rng"]
        self.cursors = [int(c) for c in state["cursors"]]
        self.buffers = [np.asarray(torch.as_tensor(state["buffers"][n]).numpy(), dtype=np.int64).copy() for n in names]
        self.tokens, self.phase = int(state["tokens"]), int(state["phase"])


class TokenBatcher:
    """(input, target) batches from the token shards of one split.

    `next_batch` follows the phased mixture; `fixed_batches` gives a fixed evaluation set, mixed by `weights`
    (the recipe's source weights; the manifest holds none, as they may change without the shards changing); the
    state dict is the data position. With prefetch > 0 a background thread reads the next batches from the
    memmaps.
    """

    def __init__(
        self,
        data_dir: Path,
        split: str,
        block_size: int,
        batch_size: int,
        seed: int,
        phases: list[Phase] | None = None,
        shuffle_buffer: int = 1024,
        prefetch: int = 0,
        delete_consumed: bool = False,
        weights: dict[str, float] | None = None,
    ):
        manifest = load_manifest(data_dir)
        dtype = np.dtype(manifest["dtype"])
        self.block_size, self.batch_size, self.split = block_size, batch_size, split
        self.streams: list[SourceStream] = []
        for entry in manifest["sources"]:
            stream = SourceStream(entry["name"], data_dir, entry["shards"][split], dtype, block_size, delete_consumed)
            if stream.total == 0:
                if entry[f"{split}_tokens"]:
                    log.warning(
                        "source '%s' has only %d %s tokens (< block %d); not sampled",
                        entry["name"],
                        entry[f"{split}_tokens"],
                        split,
                        block_size + 1,
                    )
                continue
            self.streams.append(stream)
        if not self.streams:
            raise LmforgeError(
                f"{data_dir}: no source has {block_size + 1} {split} tokens (lower model.block_size or add data)"
            )
        # a manifest from before weights left it still has them; else, without `weights`, equal weights
        saved = {e["name"]: e.get("weight", 1.0) for e in manifest["sources"]}
        base = {s.name: (weights or saved).get(s.name, 0.0) for s in self.streams}
        self.eval_probs = np.array([base[s.name] for s in self.streams], dtype=np.float64)
        self.eval_probs /= self.eval_probs.sum()
        self.sampler = MixtureSampler(
            self.streams, phases or [Phase("mixture", 0, base)], batch_size, seed, shuffle_buffer
        )
        self.prefetch, self.delete_consumed = prefetch, delete_consumed
        self._state = self.sampler.state_dict()  # the position after the last batch handed out
        self._saved_state: dict | None = None
        self._events: list[dict] = []
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def _read(self, rows: list[tuple[int, int]]) -> Batch:
        batch = torch.from_numpy(np.stack([self.streams[s].window(g) for s, g in rows]).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def _produce(self) -> tuple[Batch, dict, list[dict]]:
        rows, events = self.sampler.next_rows()
        return self._read(rows), self.sampler.state_dict(), events

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._produce()
            except BaseException as exc:  # handed to the consumer, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next_batch(self) -> Batch:
        if self.prefetch <= 0:
            batch, self._state, events = self._produce()
        else:
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name=f"lmforge-{self.split}-prefetch", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            batch, self._state, events = item
        self._events.extend(events)
        return batch

    def pop_events(self) -> list[dict]:
        """Events (phase changes) started by the batches handed out since the last call."""
        events, self._events = self._events, []
        return events

    def fixed_batches(self, n: int) -> list[Batch]:
        """The same `n` batches on every call (a fixed evaluation set), not touching the data position."""
        rng = np.random.default_rng(EVAL_SEED)
        out = []
        for _ in range(n):
            sources = rng.choice(len(self.streams), size=self.batch_size, p=self.eval_probs)
            batch = np.stack([self.streams[s].random_window(rng) for s in sources]).astype(np.int64)
            t = torch.from_numpy(batch)
            out.append((t[:, :-1], t[:, 1:]))
        return out

    def state_dict(self) -> dict:
        self._saved_state = self._state
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def checkpoint_saved(self) -> None:
        """Called once a checkpoint holding the last `state_dict()` is on disk: with delete_consumed, train
        shards that position can never read again are deleted."""
        if not (self.delete_consumed and self._saved_state is not None):
            return
        for stream in self.streams:
            n = stream.delete_before(self.sampler.min_live(self._saved_state)[stream.name])
            if n:
                log.info("source '%s': deleted %d consumed shard(s)", stream.name, n)

    def close(self) -> None:
        """Stop the prefetch thread (it is restarted on the next batch)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._queue = queue.Queue(maxsize=max(self.prefetch, 1))
