"""The run directory: where every stage reads its inputs and writes its outputs."""

from __future__ import annotations

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

    def require(self) -> RunDir:
        """Fail clearly when this is not an lmforge run directory."""
        if not self.root.is_dir():
            raise LmforgeError(f"run directory not found: {self.root}")
        if not self.config.is_file():
            raise LmforgeError(f"{self.root} is not an lmforge run directory (no config.toml)")
        return self
