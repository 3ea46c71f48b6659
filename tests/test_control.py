"""Live control (RUN/control.toml), graceful stop, kept checkpoints, metrics/TensorBoard, plots.

These drive the real training loop on a tiny synthetic task (tests/synthetic.py), so each runs in
a second or two; hooks inside the batch source act at an exact step, like a user editing the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal

import pytest
import torch

from lmforge.cli import main
from lmforge.rundir import RunDir
from lmforge.train.checkpoint import model_from_checkpoint, read_state
from lmforge.train.control import read_control_file, write_controls
from lmforge.train.metrics import plot_losses, plot_runs, read_metrics
from lmforge.train.schedule import lr_at

from .conftest import tiny_recipe
from .synthetic import BATCH, BLOCK, Progressions, cfg, make_run, train


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls: a second thread only adds synchronisation, which is slow on a loaded machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ValProgressions(Progressions):
    def __init__(self):
        super().__init__(1)
        self.requested: list[int] = []

    def fixed_batches(self, n: int):
        self.requested.append(n)
        return super().fixed_batches(n)


def train_records(run: RunDir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run.metrics) if r.get("split") == "train"}


def val_steps(run: RunDir) -> list[int]:
    return [r["step"] for r in read_metrics(run.metrics) if r.get("split") == "val"]


def test_control_steers_the_muon_learning_rate(tmp_path):
    run = make_run(tmp_path)
    hooks = {5: lambda: write_controls(run, {"muon_lr": 5e-3})}  # during step 5
    train(run, cfg(optimizer="muon", muon_lr=0.02), hooks)
    recs = train_records(run)
    for step in range(1, 13):  # the Muon groups follow the schedule from their own peak, changed from step 6
        assert recs[step]["muon_lr"] == pytest.approx(lr_at(step - 1, 0.02 if step <= 5 else 5e-3, 2, 12, 0.1))
        assert recs[step]["lr"] == pytest.approx(lr_at(step - 1, 1e-2, 2, 12, 0.1))  # AdamW groups unchanged
    assert read_state(run.checkpoint("last"))["control"] == {"muon_lr": 5e-3}


def test_control_changes_take_effect_at_the_next_step(tmp_path):
    run = make_run(tmp_path)
    write = lambda **v: lambda: write_controls(run, v)  # noqa: E731
    hooks = {5: write(lr=2e-3, grad_accum=2, eval_interval=3, dropout=0.25, eval_batches=3)}  # during step 5
    val = ValProgressions()
    result, model = train(run, cfg(), hooks, val=val)
    assert result.steps == 12
    recs = train_records(run)
    # steps 1-5 ran on the recipe, steps 6.. (optimizer steps 5..11, 0-based) on the new peak lr
    for step in range(1, 6):
        assert recs[step]["lr"] == pytest.approx(lr_at(step - 1, 1e-2, 2, 12, 0.1))
    for step in range(6, 13):
        assert recs[step]["lr"] == pytest.approx(lr_at(step - 1, 2e-3, 2, 12, 0.1))
    tokens = [recs[s]["tokens"] - recs[s - 1]["tokens"] for s in range(2, 13)]
    assert tokens[:4] == [BATCH * BLOCK] * 4 and tokens[4:] == [2 * BATCH * BLOCK] * 7  # grad_accum 2 from step 6
    assert val_steps(run) == [0, 4, 6, 9, 12]  # eval every 3 from the change on
    assert all(m.p == 0.25 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert val.requested == [2, 3]  # the fixed validation set is rebuilt with 3 batches
    events = [r for r in read_metrics(run.metrics) if r.get("event") == "control"]
    assert len(events) == 1 and events[0]["step"] == 5
    assert events[0]["changes"] == {"lr": 2e-3, "grad_accum": 2, "dropout": 0.25, "eval_interval": 3, "eval_batches": 3}
    assert "lr=0.002" in events[0]["label"]
    state = read_state(run.checkpoint("last"))
    assert state["control"] == {"lr": 2e-3, "grad_accum": 2, "dropout": 0.25, "eval_interval": 3, "eval_batches": 3}
    # the stage ends by retiring the file, so a following stage starts from its own recipe
    assert not run.control_file.exists() and (run.root / "control.pretrain.toml").is_file()


@pytest.mark.parametrize(
    "text, reason",
    [
        ("lr = [oops", "invalid TOML"),
        ("lr = 1e-3\nlearning_rate = 1e-3\n", "unknown key 'control.learning_rate'"),
        ("lr = -1e-3\n", "control.lr: must be > 0"),
        ("lr = inf\n", "control.lr: must be a finite number"),
        ("grad_accum = 'two'\n", "control.grad_accum: expected int"),
    ],
)
def test_bad_control_file_is_rejected_and_the_run_continues(tmp_path, caplog, text, reason):
    run = make_run(tmp_path)
    hooks = {3: lambda: run.control_file.write_text(text)}
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        result, _ = train(run, cfg(max_steps=6, eval_interval=3), hooks)
    assert result.steps == 6 and result.stop_reason == "completed"
    assert any("control file rejected" in m and reason in m for m in caplog.messages)
    rejected = [r for r in read_metrics(run.metrics) if "control_rejected" in r]
    assert len(rejected) == 1 and rejected[0]["step"] == 3 and reason in rejected[0]["control_rejected"]
    recs = train_records(run)
    assert all(recs[s]["lr"] == pytest.approx(lr_at(s - 1, 1e-2, 2, 6, 0.1)) for s in range(1, 7))
    assert not [r for r in read_metrics(run.metrics) if r.get("event") == "control"]


def test_control_values_survive_resume_and_a_later_edit_applies(tmp_path):
    run = make_run(tmp_path)
    train(run, cfg(max_steps=8), {2: lambda: write_controls(run, {"lr": 4e-3, "patience": 5})})
    assert read_state(run.checkpoint("last"))["control"] == {"lr": 4e-3, "patience": 5}
    # continue the same stage for more steps; the file was retired, the checkpoint carries the values
    hooks = {1: lambda: write_controls(run, {"checkpoint_interval": 2})}  # applies from step 9
    train(run, cfg(max_steps=14, keep_checkpoints=3), hooks, resume=True)
    recs = train_records(run)
    assert recs[9]["lr"] == pytest.approx(lr_at(8, 4e-3, 2, 14, 0.1))
    state = read_state(run.checkpoint("last"))
    assert state["control"] == {"lr": 4e-3, "patience": 5, "checkpoint_interval": 2}
    # checkpoints every 2 steps from step 9 on (10, 12, 14), not every 4 (8, 12, 14)
    assert sorted(p.name for p in run.checkpoints.glob("pretrain-step-*")) == [
        "pretrain-step-0000010",
        "pretrain-step-0000012",
        "pretrain-step-0000014",
    ]


def test_crash_and_resume_with_dropout_and_control_values_matches_an_uninterrupted_run(tmp_path):
    """Dropout draws from the global RNG and control values change the step: resume must restore both."""

    class Crash(Exception):
        pass

    def crash():
        raise Crash

    c = cfg(max_steps=12, eval_interval=4, checkpoint_interval=4)
    runs = {name: make_run(tmp_path / name) for name in ("straight", "crashed")}
    control = {"lr": 5e-3, "grad_accum": 2, "dropout": 0.1}
    train(runs["straight"], c, {2: lambda: write_controls(runs["straight"], control)})
    with pytest.raises(Crash):  # during step 7 (calls 5-6 are step 4, 7-8 step 5, ...)
        train(runs["crashed"], c, {2: lambda: write_controls(runs["crashed"], control), 12: crash})
    assert read_state(runs["crashed"].checkpoint("last"))["step"] == 4
    runs["crashed"].control_file.unlink()  # the values must come back from the checkpoint
    train(runs["crashed"], c, resume=True)
    a, b = train_records(runs["straight"]), train_records(runs["crashed"])
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(abs(a[s]["loss"] - b[s]["loss"]) <= 1e-6 for s in range(1, 13)), [
        (a[s]["loss"], b[s]["loss"]) for s in range(1, 13)
    ]
    assert b[12]["tokens"] == a[12]["tokens"] == (2 + 2 * 10) * BATCH * BLOCK


def test_keep_checkpoints_keeps_the_newest_snapshots_loadable(tmp_path):
    run = make_run(tmp_path)
    train(run, cfg(max_steps=10, checkpoint_interval=2, keep_checkpoints=3))
    snaps = sorted(p.name for p in run.checkpoints.glob("pretrain-step-*"))
    assert snaps == ["pretrain-step-0000006", "pretrain-step-0000008", "pretrain-step-0000010"]
    assert read_state(run.checkpoint("pretrain-step-0000006"))["step"] == 6
    last, snap = model_from_checkpoint(run.checkpoint("last")), model_from_checkpoint(run.checkpoint(snaps[-1]))
    assert torch.equal(last.tok_emb.weight, snap.tok_emb.weight)
    older = model_from_checkpoint(run.checkpoint(snaps[0]))
    assert not torch.equal(last.tok_emb.weight, older.tok_emb.weight)
    # a fresh run in the same directory drops the snapshots of the run it overwrote
    train(run, cfg(max_steps=4, checkpoint_interval=2, keep_checkpoints=1))
    assert sorted(p.name for p in run.checkpoints.glob("pretrain-step-*")) == ["pretrain-step-0000004"]


def test_stop_file_and_signal_end_the_stage_after_the_step_with_a_checkpoint(tmp_path):
    run = make_run(tmp_path)
    assert main(["stop", str(run.root)]) == 0
    assert run.stop_file.is_file()
    result, _ = train(run, cfg(max_steps=3))  # a STOP from before the stage started does not end it
    assert (result.steps, result.stop_reason) == (3, "completed") and not run.stop_file.exists()
    result, _ = train(run, cfg(max_steps=10), {4: lambda: main(["stop", str(run.root)])})  # during step 4
    assert (result.steps, result.stop_reason) == (4, "stop_file") and not run.stop_file.exists()
    assert read_state(run.checkpoint("last"))["step"] == 4

    run2 = make_run(tmp_path / "b")
    result, model = train(run2, cfg(max_steps=10), {4: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    assert (result.steps, result.stop_reason) == (4, "interrupted")
    state = read_state(run2.checkpoint("last"))
    assert state["step"] == 4
    assert torch.equal(model_from_checkpoint(run2.checkpoint("last")).tok_emb.weight, model.tok_emb.weight)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the stage


def test_a_stopped_stage_evaluates_its_last_step_so_it_can_be_best(tmp_path):
    run = make_run(tmp_path)
    result, _ = train(run, cfg(max_steps=12, patience=1), {6: lambda: main(["stop", str(run.root)])})
    assert (result.steps, result.stop_reason) == (6, "stop_file")
    assert val_steps(run) == [0, 4, 6]
    val = {r["step"]: r["loss"] for r in read_metrics(run.metrics) if r.get("split") == "val"}
    assert val[6] < val[4] and read_state(run.checkpoint("best"))["step"] == 6
    last = read_state(run.checkpoint("last"))
    assert last["best_val_loss"] == pytest.approx(val[6]) and last["bad_evals"] == 0
    # a stop right after a scheduled evaluation does not evaluate the same step again
    run2 = make_run(tmp_path / "b")
    train(run2, cfg(max_steps=12), {4: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    assert val_steps(run2) == [0, 4] and read_state(run2.checkpoint("best"))["step"] == 4


def test_control_cli_writes_merges_and_validates(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["control", str(run.root), "--lr", "1e-4", "--grad-accum", "4"]) == 0
    assert main(["control", str(run.root), "--patience", "3"]) == 0
    assert read_control_file(run.control_file) == {"lr": 1e-4, "grad_accum": 4, "patience": 3}
    before = run.control_file.read_text()
    capsys.readouterr()
    assert main(["control", str(run.root), "--lr", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lmforge: error: control.lr: must be > 0"
    assert main(["control", str(run.root), "--lr", "inf"]) == 2
    assert capsys.readouterr().err.strip() == "lmforge: error: control.lr: must be a finite number, got inf"
    assert run.control_file.read_text() == before  # nothing written
    assert main(["control", str(run.root)]) == 0
    assert "patience=3" in capsys.readouterr().out
    # showing a file the running stage rejects says so, in one line
    for bad in (b'lr = "abc"\n', b"lr = 1e-3\n\xff\n"):
        run.control_file.write_bytes(bad)
        assert main(["control", str(run.root)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith("(a running stage ignores this file)"), err


@pytest.mark.parametrize(
    "argv",
    [
        ["control", "{d}", "--lr", "1e-4"],
        ["stop", "{d}"],
        ["plot", "{d}"],
        ["resize-vocab", "{d}", "--vocab-size", "600"],
        ["run", "--resume", "--run-dir", "{d}"],
        ["eval", "--run-dir", "{d}"],
    ],
)
def test_a_directory_that_is_not_a_run_is_one_clear_line(tmp_path, capsys, argv):
    (tmp_path / "notes.txt").write_text("not a run")
    assert main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmforge: error: {tmp_path} is not an lmforge run directory (no config.toml)"]
    assert not (tmp_path / "control.toml").exists() and not (tmp_path / "STOP").exists()


def test_tensorboard_shows_the_newest_attempt_of_each_step(tmp_path):
    """A stage resumed from its checkpoint at step 6 after dying at step 9 redoes steps 7-9: TensorBoard shows
    them once, with the new values (purge_step); a stage started over hides all of its earlier attempt; the
    other stages are left alone (one TensorBoard run per stage)."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmforge.train.metrics import MetricsLogger

    def attempt(stage: str, steps: range, loss: float, purge: int | None) -> None:
        # TensorBoard reads a run's event files in name order: the time in whole seconds, then a per-process
        # counter that is not zero-padded. Attempts are processes seconds apart; here, a new second each.
        started = int(time.time())
        while int(time.time()) == started:
            time.sleep(0.02)
        logger = MetricsLogger(tmp_path / "metrics.jsonl", tmp_path / "tb", {stage: purge} if purge is not None else {})
        for step in steps:
            logger.log({"stage": stage, "split": "train", "step": step, "loss": loss})
        logger.close()

    def scalars(stage: str) -> list[tuple[int, float]]:
        board = EventAccumulator(str(tmp_path / "tb" / stage))
        board.Reload()
        return [(e.step, e.value) for e in board.Scalars(f"{stage}/train/loss")]

    attempt("pretrain", range(1, 13), 1.0, 0)
    attempt("finetune", range(1, 10), 1.0, 0)  # killed after step 9; its last checkpoint is step 6
    attempt("finetune", range(7, 13), 2.0, 7)  # resumed
    assert scalars("finetune") == [(s, 1.0) for s in range(1, 7)] + [(s, 2.0) for s in range(7, 13)]
    assert scalars("pretrain") == [(s, 1.0) for s in range(1, 13)]
    attempt("pretrain", range(1, 4), 3.0, 0)  # started over
    assert scalars("pretrain") == [(s, 3.0) for s in range(1, 4)]
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 12 + 9 + 6 + 3  # the log keeps every attempt


def test_metrics_tensorboard_and_plots_with_markers(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_run(tmp_path)
    train(run, cfg(max_steps=6), {3: lambda: write_controls(run, {"lr": 5e-3})})
    rec = train_records(run)[6]
    assert rec["memory_mb"] > 0 and rec["tokens_per_s"] > 0 and rec["grad_norm"] > 0
    acc = EventAccumulator(str(run.tensorboard / "pretrain"))  # one TensorBoard run per stage
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_mb"):
        assert f"pretrain/train/{name}" in tags
    assert "pretrain/val/loss" in tags
    assert len(acc.Scalars("pretrain/train/loss")) == 6
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("pretrain/events/text_summary")]
    assert "lr=0.005" in texts and "pretrain start" in texts

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.train.metrics import _draw_run

    fig, ax = plt.subplots()
    _draw_run(ax, read_metrics(run.metrics))
    labels = [t.get_text() for t in ax.texts]
    plt.close(fig)
    assert "pretrain start" in labels and "lr=0.005" in labels and "pretrain end: completed" in labels
    assert len(labels) == 3

    other = make_run(tmp_path / "other")
    train(other, cfg(max_steps=4, lr=3e-3))
    out = plot_runs({"a": run.metrics, "b": other.metrics}, tmp_path / "cmp.png")
    assert out is not None and out.stat().st_size > 10_000
    assert plot_losses(tmp_path / "missing.jsonl", tmp_path / "x.png") is None
    assert main(["plot", str(run.root), str(other.root), "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 10_000
    # --out: a folder gets compare.png inside it; the name's suffix is the format; an unknown one is one line
    assert main(["plot", str(run.root), str(other.root), "--out", str(other.root)]) == 0
    assert (other.root / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert main(["plot", str(run.root), str(other.root), "--out", str(tmp_path / "new-folder") + "/"]) == 0
    assert (tmp_path / "new-folder" / "compare.png").read_bytes().startswith(b"\x89PNG")  # made, not a file
    assert main(["plot", str(run.root), "--out", str(tmp_path / "one.svg")]) == 0
    assert b"<svg" in (tmp_path / "one.svg").read_bytes()[:400]
    capsys.readouterr()
    assert main(["plot", str(run.root), "--out", str(tmp_path / "one.xyz")]) == 2
    assert "one.xyz: Format 'xyz' is not supported" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*")) and not (tmp_path / "one.xyz").exists()


def test_tokens_per_second_leave_out_evaluation_time(tmp_path, monkeypatch):
    """A slow evaluation (here 1 s, hundreds of steps' worth) must not show up as a slow training window."""
    import time

    from lmforge.train import loop

    real = loop.validation_loss

    def slow_validation(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validation_loss", slow_validation)
    run = make_run(tmp_path)
    train(run, cfg(max_steps=8, log_interval=2, eval_interval=2))
    speeds = [r["tokens_per_s"] for r in train_records(run).values()]
    assert len(speeds) == 4
    # each window (2 steps of a 1-layer model: milliseconds) would take over 1 s with an evaluation in it
    window_tokens = 2 * BATCH * BLOCK
    assert min(speeds) > 2 * window_tokens, speeds


def test_plot_keeps_the_resumed_values_of_steps_logged_twice(tmp_path):
    from lmforge.train.metrics import _latest_per_step

    recs = [{"stage": "pretrain", "split": "train", "step": s, "loss": float(s)} for s in (1, 2, 3)]
    recs += [{"stage": "pretrain", "split": "train", "step": 3, "loss": 30.0}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"torn": ')
    latest = _latest_per_step(read_metrics(path))
    assert [(r["step"], r["loss"]) for r in latest] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert math.isfinite(latest[0]["loss"])


def test_plot_draws_only_the_newest_attempt_of_a_stage_started_over():
    from lmforge.train.metrics import newest_attempts

    def attempt(stage, steps, loss):
        return [{"event": f"{stage}_start", "stage": stage, "step": 0}] + [
            {"stage": stage, "split": "train", "step": s, "loss": loss} for s in steps
        ]

    recs = attempt("pretrain", range(1, 41), 5.0) + attempt("finetune", range(1, 9), 3.0)
    recs += attempt("finetune", range(1, 4), 2.0)  # fine-tuning run again, fresh, in the same run
    kept = newest_attempts(recs)
    assert [(r["step"], r["loss"]) for r in kept if r["stage"] == "finetune" and "loss" in r] == [
        (1, 2.0),
        (2, 2.0),
        (3, 2.0),
    ]
    assert sum(r["stage"] == "pretrain" and "loss" in r for r in kept) == 40


@pytest.mark.slow
def test_sigterm_during_pretraining_moves_a_chained_run_on_to_finetuning(copy_run, data_dir, monkeypatch):
    from lmforge.pipeline import run_recipe
    from lmforge.train.metrics import MetricsLogger

    run = RunDir(copy_run())  # tokenized and sharded; pretraining and everything after not yet run
    (run.root / "progress.json").write_text(json.dumps({"tokenizer": {"done": True}, "prepare": {"done": True}}))
    shutil.rmtree(run.checkpoints)
    log = MetricsLogger.log

    def log_then_signal(self, record):
        log(self, record)
        if record.get("stage") == "pretrain" and record.get("split") == "train" and record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill RUN_PID` would, mid-pretraining

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)
    recipe = tiny_recipe(
        **{
            "pretrain.max_steps": "400",
            "pretrain.log_interval": "1",
            "finetune.max_steps": "3",
            "eval.squad_questions": "8",
        }
    )
    report = run_recipe(recipe, run.root, data_dir, resume=True)
    progress = json.loads((run.root / "progress.json").read_text())
    assert progress["pretrain"]["stop"] == "interrupted" and progress["pretrain"]["steps"] == 3
    assert progress["finetune"]["done"] and progress["finetune"]["steps"] == 3
    pretrained = read_state(run.checkpoint("pretrained"))  # the stopped model, evaluated, not the step-0 one
    assert (pretrained["stage"], pretrained["step"]) == ("pretrain", 3)
    assert report["squad"]["n"] == 8
    events = [r["event"] for r in read_metrics(run.metrics) if "event" in r]
    assert events[-3:] == ["pretrain_end", "finetune_start", "finetune_end"]
