"""Live control of a running stage through `RUN/control.toml`.

The file holds flat keys (`lr = 1e-4`, `grad_accum = 4`, ...) that override the stage's training
config from the next optimizer step on. The loop polls it once per step; a poll costs one `stat`
unless the file changed. A file that does not parse, names an unknown key or holds an impossible
value is rejected as a whole, with the reason logged, and the run goes on unchanged.

The values in effect are saved in every checkpoint (so a resumed run keeps them), and the file is
renamed to `control.<stage>.toml` when the stage ends, so the next stage starts from its own recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from lmforge.config import TrainConfig, from_dict, validate_train
from lmforge.errors import ConfigError
from lmforge.io import atomic_write_text
from lmforge.rundir import RunDir
from lmforge.train.metrics import MetricsLogger

log = logging.getLogger("lmforge")


@dataclass
class ControlConfig:
    """The training values that may change while a stage runs (None = not set)."""

    lr: float | None = None  # peak of the warmup + cosine schedule
    muon_lr: float | None = None  # peak lr of the Muon groups (optimizer = "muon"), on the same schedule
    grad_accum: int | None = None
    dropout: float | None = None
    eval_interval: int | None = None
    eval_batches: int | None = None
    patience: int | None = None
    checkpoint_interval: int | None = None
    log_interval: int | None = None


CONTROL_KEYS = tuple(f.name for f in dataclasses.fields(ControlConfig))


def parse_controls(data: dict[str, Any], base: TrainConfig | None = None) -> dict[str, Any]:
    """Validate raw control values against `base` (types and ranges); return the set keys. Raises ConfigError."""
    values = {k: v for k, v in dataclasses.asdict(from_dict(ControlConfig, data, "control")).items() if v is not None}
    if "dropout" in values and not 0 <= values["dropout"] < 1:
        raise ConfigError("control.dropout: must be in [0, 1)")
    validate_train(dataclasses.replace(base or TrainConfig(), **values), "control")
    return values


def read_control_file(path: Path, base: TrainConfig | None = None) -> dict[str, Any]:
    """The validated values of a control file ({} when there is none). Raises ConfigError naming the file."""
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    try:
        return parse_controls(data, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def write_controls(run: RunDir, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into the run's control file (atomically) and return the file's new content."""
    run.require()
    try:
        current = read_control_file(run.control_file)
    except ConfigError as exc:  # a broken file is replaced, not merged
        log.warning("replacing unreadable control file (%s)", exc)
        current = {}
    merged = {**current, **parse_controls(values)}
    atomic_write_text(run.control_file, tomli_w.dumps(merged))
    return merged


def request_stop(run: RunDir) -> Path:
    """Ask the stage training in `run` to stop after its current step (the loop consumes the file)."""
    run.require()
    atomic_write_text(run.stop_file, "stop\n")
    return run.stop_file


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class LiveControl:
    """Owns the stage's mutable copy of its TrainConfig and applies control-file changes to it."""

    def __init__(self, run: RunDir, cfg: TrainConfig):
        self.path = run.control_file
        self.base = dataclasses.replace(cfg)
        self.cfg = dataclasses.replace(cfg)  # the loop reads this copy, so changes apply in place
        self._seen: tuple[int, int] | None = None

    @property
    def overrides(self) -> dict[str, Any]:
        """Values that differ from the recipe: saved in checkpoints, restored on resume."""
        return {k: getattr(self.cfg, k) for k in CONTROL_KEYS if getattr(self.cfg, k) != getattr(self.base, k)}

    def restore(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return self._apply({k: v for k, v in overrides.items() if k in CONTROL_KEYS})

    def poll(self, metrics: MetricsLogger, stage: str, step: int) -> dict[str, Any]:
        """Apply a changed control file before the next step; record and return what changed.

        Costs one `stat` when the file is unchanged or absent. A deleted file keeps the values in effect.
        """
        sig = _signature(self.path)
        if sig == self._seen:
            return {}
        self._seen = sig
        if sig is None:
            return {}
        try:
            values = read_control_file(self.path, self.base)
        except ConfigError as exc:
            log.warning("control file rejected, training continues unchanged: %s", exc)
            metrics.log({"stage": stage, "step": step, "control_rejected": str(exc)})
            return {}
        changes = self._apply(values)
        if changes:
            log.info("%s step %d: control change %s", stage, step, describe(changes))
            metrics.log(
                {"event": "control", "stage": stage, "step": step, "label": describe(changes), "changes": changes}
            )
        return changes

    def _apply(self, values: dict[str, Any]) -> dict[str, Any]:
        changes = {k: v for k, v in values.items() if getattr(self.cfg, k) != v}
        for key, value in changes.items():
            setattr(self.cfg, key, value)
        return changes

    def archive(self, stage: str) -> None:
        """Retire the file at the end of a stage so that the next stage does not inherit it."""
        if self.path.is_file():
            self.path.replace(self.path.with_name(f"control.{stage}.toml"))


def describe(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items())
