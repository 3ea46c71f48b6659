"""The run directory: where every stage reads its inputs and writes its outputs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def stop_file(self) -> Path:
        return self.root / "STOP"

    @property
    def control_file(self) -> Path:
        return self.root / "control.toml"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def require(self) -> RunDir:
        """Fail clearly when this is not an lmforge run directory."""
        if not self.root.is_dir():
            raise LmforgeError(f"run directory not found: {self.root}")
        if not self.config.is_file():
            raise LmforgeError(f"{self.root} is not an lmforge run directory (no config.toml)")
        return self


@contextlib.contextmanager
def run_lock(run: RunDir, what: str) -> Iterator[None]:
    """Hold `run`'s lock while writing it (training, resize-vocab), so that no second process writes it at the
    same time; a held lock is refused with one line naming its holder.

    An flock on RUN/.lock: the kernel releases it when the holder's file is closed, on any exit (kill -9
    included), so a dead holder never blocks. The file itself stays; it only names the last holder.
    """
    fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
            raise LmforgeError(
                f"{run.root} is in use by {holder} (it holds {run.lock_file}); wait for it to end, "
                f"or stop it (lmforge stop {run.root})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"lmforge {what} (pid {os.getpid()} on {socket.gethostname()})\n".encode())
        yield
    finally:
        os.close(fd)
