"""Metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard, drawn as loss plots."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


class MetricsLogger:
    """Appends records to metrics.jsonl (flushed per line, so a crash loses nothing written) and
    mirrors numeric fields to TensorBoard as `<stage>/<split>/<name>`, one TensorBoard run per stage
    (`tensorboard_dir/<stage>`).

    `purge` ({stage: step}) hides from TensorBoard what earlier attempts logged for that stage from `step` on
    (its `purge_step`): the steps a resumed stage redoes after a kill, or all of a stage started over.
    metrics.jsonl keeps every attempt's records; `plot` draws the newest.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, purge: dict[str, int] | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a", encoding="utf-8")
        self.tensorboard_dir = tensorboard_dir
        self.purge = dict(purge or {})
        self.writers: dict[str, Any] = {}
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:  # TensorBoard is optional at run time; metrics.jsonl is the record
                log.warning("tensorboard is not installed; writing metrics.jsonl only")
                self.tensorboard_dir = None

    def _writer(self, stage: str):
        if stage not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[stage] = SummaryWriter(str(self.tensorboard_dir / stage), purge_step=self.purge.get(stage))
        return self.writers[stage]

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tensorboard_dir is None or "step" not in record:
            return
        stage = str(record.get("stage", "run"))
        writer = self._writer(stage)
        prefix = f"{stage}/{record.get('split', record.get('event', 'event'))}"
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{prefix}/{key}", value, record["step"])
        if "event" in record:  # stage changes, control changes, resizes: readable in TensorBoard's text tab
            writer.add_text(f"{stage}/events", record.get("label", record["event"]), record["step"])

    def close(self) -> None:
        self.fh.close()
        for writer in self.writers.values():
            writer.close()


def memory_mb(device) -> float:
    """Peak accelerator memory on CUDA, else this process's resident memory, in MiB."""
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


class NullMetrics:
    """What ranks other than 0 log to under torchrun: nothing (rank 0 writes the run's record)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a crash: skip it
            continue
    return records


def _stage_offsets(records: list[dict[str, Any]]) -> dict[str, int]:
    """x-axis offset per stage so that fine-tuning is drawn after pretraining."""
    offsets: dict[str, int] = {}
    end = 0
    for rec in records:
        stage = rec.get("stage")
        if stage is None or "step" not in rec:
            continue
        if stage not in offsets:
            offsets[stage] = end
        end = max(end, offsets[stage] + rec["step"])
    return offsets


def newest_attempts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of each stage's newest attempt: a stage started over in the same run (without --resume)
    logs a new `<stage>_start`, and what the earlier attempt logged is no longer the run's history."""
    starts = {rec["stage"]: i for i, rec in enumerate(records) if rec.get("event") == f"{rec.get('stage')}_start"}
    return [rec for i, rec in enumerate(records) if i >= starts.get(rec.get("stage"), 0)]


def _latest_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Loss records with, per (stage, split, step), only the last one written.

    A run killed between checkpoints and resumed logs the steps after the checkpoint twice; the
    resumed values are the ones the model's history continues from.
    """
    latest: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        if "loss" in rec and "step" in rec:
            latest[(rec.get("stage"), rec.get("split"), rec["step"])] = rec
    return sorted(latest.values(), key=lambda r: r["step"])


def _draw_run(ax, records: list[dict[str, Any]], prefix: str = "", color: str | None = None) -> None:
    """One run's train/val curves (stages side by side) and its event markers on `ax`."""
    records = newest_attempts(records)
    offsets = _stage_offsets(records)
    losses = _latest_per_step(records)
    for stage, offset in offsets.items():
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [
                (offset + r["step"], r["loss"]) for r in losses if r.get("stage") == stage and r.get("split") == split
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs,
                    ys,
                    style,
                    label=f"{prefix}{stage} {split}",
                    markersize=3,
                    linewidth=1.2,
                    **({"color": color} if color else {}),
                )
    markers: dict[int, list[str]] = {}  # events at the same step share one line and one label
    for rec in records:
        event = rec.get("event")
        if event and rec.get("stage") in offsets:
            label = rec.get("label", event)
            x = offsets[rec["stage"]] + rec.get("step", 0)
            if label not in markers.setdefault(x, []):
                markers[x].append(label)
    for x, labels in markers.items():
        ax.axvline(x, color=color or "gray", linestyle="--", linewidth=0.8, alpha=0.7)
        ax.annotate(
            prefix + " | ".join(labels),
            (x, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color=color or "gray",
        )


def _save_figure(fig, out_path: Path) -> Path:
    """Write the figure in the format its name says (.png, .svg, .pdf, .jpg; no suffix: PNG), atomically."""
    import matplotlib.pyplot as plt

    out_path.parent.mkdir(parents=True, exist_ok=True)
    kind = out_path.suffix.lstrip(".").lower() or "png"
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=kind)
        tmp.replace(out_path)
    except ValueError as exc:  # matplotlib: "Format 'xyz' is not supported ..."
        raise LmforgeError(f"{out_path}: {exc}") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out_path


def _new_axes(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    return fig, ax


def plot_losses(metrics_path: Path, out_path: Path, title: str = "") -> Path | None:
    """Train/val loss against optimizer steps, stages side by side, with event markers (stage starts
    and ends, control changes, vocabulary resizes). Returns the PNG path, None when nothing was logged."""
    records = read_metrics(metrics_path)
    if not any("loss" in r for r in records):
        return None
    fig, ax = _new_axes(title)
    _draw_run(ax, records)
    ax.legend(fontsize=8)
    return _save_figure(fig, out_path)


def plot_runs(runs: dict[str, Path], out_path: Path, title: str = "") -> Path | None:
    """Several runs' loss curves on one figure, one colour per run; `runs` maps a label to metrics.jsonl."""
    fig, ax = _new_axes(title or "loss: " + " vs ".join(runs))
    drawn = 0
    for i, (label, path) in enumerate(runs.items()):
        records = read_metrics(path)
        if any("loss" in r for r in records):
            _draw_run(ax, records, prefix=f"{label}: ", color=f"C{i % 10}")
            drawn += 1
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    ax.legend(fontsize=7)
    return _save_figure(fig, out_path)
