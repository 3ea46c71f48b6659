"""Exact resume after kill -9 (pretraining and fine-tuning), crash-safe checkpoint writes, and resume refusals.

The kills are real SIGKILLs of a child process at a chosen point, so nothing (no `finally`, no
signal handler) gets a chance to tidy up, as with an out-of-memory kill or a power cut.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import GPT, GPTConfig
from lmforge.rundir import RunDir
from lmforge.train.checkpoint import copy_checkpoint, model_from_checkpoint, read_state, save_checkpoint
from lmforge.train.metrics import read_metrics

from .conftest import fresh_run, tiny_recipe

SRC = Path(__file__).resolve().parents[1] / "src"

# argv: stage, run dir, kill_after, fresh|resume, data dir. kill_after > 0: SIGKILL right after the train record of
# that step is logged (checkpoints at 6 and 12, so 9 dies between two). Dropout draws from the global RNG, and
# 40 QA examples (5 batches of 8) make fine-tuning cross epochs before and after the kill.
TRAIN_STAGE = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from lmforge.config import load_recipe
    from lmforge.pipeline import finetune_stage, pretrain_stage
    from lmforge.rundir import RunDir
    from lmforge.train.metrics import MetricsLogger

    stage, run_dir, kill_after = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    resume, data_dir = sys.argv[4] == "resume", sys.argv[5]
    if kill_after:
        log = MetricsLogger.log
        def log_then_die(self, record):
            log(self, record)
            if record.get("split") == "train" and record["step"] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        MetricsLogger.log = log_then_die
    settings = {"max_steps": "16", "checkpoint_interval": "6", "eval_interval": "4", "eval_batches": "2",
                "log_interval": "1", "batch_size": "8", "warmup_steps": "4", "dropout": "0.1", "patience": "0",
                "epochs": "0", "device": "cpu", "dtype": "float32"}
    overrides = {f"{stage}.{key}": value for key, value in settings.items()}
    recipe = load_recipe(run_dir / "config.toml", {**overrides, "qa.max_train_examples": "40"})
    if stage == "pretrain":
        pretrain_stage(recipe, RunDir(run_dir), resume=resume)
    else:
        finetune_stage(recipe, RunDir(run_dir), data_dir, resume=resume)
""")

CRASH_MID_SAVE = textwrap.dedent("""
    import os, pathlib, signal, sys
    import torch
    from lmforge.model import GPT, GPTConfig
    from lmforge.train import checkpoint

    path, where = pathlib.Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16))
    checkpoint.save_checkpoint(path, model, {"step": 1})
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "before_state":  # weights of the new checkpoint written, its state.json not yet
        checkpoint.atomic_write_json = die
    else:  # between the two renames of the swap: old moved aside, new not yet in place
        rename, calls = pathlib.Path.rename, []
        def rename_then_die(self, target):
            calls.append(target)
            if len(calls) == 2:
                die()
            return rename(self, target)
        pathlib.Path.rename = rename_then_die
    checkpoint.save_checkpoint(path, model, {"step": 2}, {"x": torch.ones(3)})
""")


def run_child(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


def losses(run_dir: Path, split: str) -> dict[int, float]:
    """step -> loss, the last value logged for each step (a resumed run re-logs the steps it redoes)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == split}


def checkpoint_files(run: RunDir) -> dict[str, bytes]:
    return {p.name: (p / "model.safetensors").read_bytes() for p in run.checkpoints.iterdir() if p.is_dir()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_kill_9_between_checkpoints_then_resume_matches_an_uninterrupted_run(stage, tiny_run, data_dir, tmp_path):
    straight = fresh_run(tiny_run, tmp_path / "straight", stage)
    killed = fresh_run(tiny_run, tmp_path / "killed", stage)
    done = run_child(TRAIN_STAGE, stage, straight, 0, "fresh", data_dir)
    assert done.returncode == 0, done.stderr[-2000:]

    died = run_child(TRAIN_STAGE, stage, killed, 9, "fresh", data_dir)  # checkpoints at 6 and 12: dies after step 9
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert read_state(killed / "checkpoints" / "last")["step"] == 6
    assert max(losses(killed, "train")) == 9
    resumed = run_child(TRAIN_STAGE, stage, killed, 0, "resume", data_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = losses(straight, "train"), losses(killed, "train")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in range(1, 17):  # before the kill too: fresh runs are reproducible
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    va, vb = losses(straight, "val"), losses(killed, "val")
    assert [s for s in va if s > 6] == [s for s in vb if s > 6] == [8, 12, 16]
    assert all(abs(va[s] - vb[s]) <= 1e-6 for s in (8, 12, 16))
    wa = model_from_checkpoint(straight / "checkpoints" / "last").state_dict()
    wb = model_from_checkpoint(killed / "checkpoints" / "last").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)
    # both attempts' steps 7-9 are in the log (the plot keeps the resumed ones)
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if r.get("split") == "train"]
    assert steps.count(8) == 2 and steps.count(10) == 1
    # TensorBoard shows each step once: the resumed attempt purges the killed one's steps after the checkpoint
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(killed / "tensorboard" / stage))
    board.Reload()
    assert [e.step for e in board.Scalars(f"{stage}/train/loss")] == list(range(1, 17))
    assert read_state(killed / "checkpoints" / "last")["stage"] == stage


@pytest.mark.parametrize("where", ["before_state", "between_renames"])
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, where):
    path = tmp_path / "checkpoints" / "last"
    died = run_child(CRASH_MID_SAVE, path, where)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    leftovers = {p.name for p in path.parent.iterdir()}
    if where == "before_state":
        assert any(n.startswith(".staging-last-") for n in leftovers) and "last" in leftovers
    else:
        assert "last" not in leftovers and "last.old" in leftovers  # the crash hit mid-swap
    assert read_state(path)["step"] == 1
    torch.manual_seed(0)
    expected = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16))
    assert torch.equal(model_from_checkpoint(path).tok_emb.weight, expected.tok_emb.weight)
    # the next save recovers: the dead writer's staging directory and the .old copy are gone
    save_checkpoint(path, expected, {"step": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["last"]
    assert read_state(path)["step"] == 3


def test_resuming_with_another_model_shape_is_a_clear_error(copy_run):
    from lmforge.pipeline import pretrain_stage

    run = RunDir(copy_run())
    copy_checkpoint(run.checkpoint("pretrained"), run.checkpoint("last"))  # a pretraining resume point
    before = (run.checkpoint("last") / "model.safetensors").read_bytes()
    with pytest.raises(LmforgeError) as err:
        pretrain_stage(tiny_recipe(**{"model.n_embd": "32", "model.n_head": "2"}), run, resume=True)
    message = str(err.value)
    assert "\n" not in message and "model shape differs" in message and "n_embd: checkpoint 64 vs recipe 32" in message
    assert (run.checkpoint("last") / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("resume", [True, False])
def test_finetuning_with_another_model_shape_is_a_clear_error(copy_run, data_dir, resume):
    from lmforge.pipeline import finetune_stage

    run = RunDir(copy_run())
    start = run.checkpoint("last" if resume else "pretrained")
    before = checkpoint_files(run)
    with pytest.raises(LmforgeError) as err:
        finetune_stage(tiny_recipe(**{"model.n_embd": "128", "model.n_head": "4"}), run, data_dir, resume=resume)
    message = str(err.value)
    action = "resume" if resume else "fine-tune from"
    assert "\n" not in message and message.startswith(f"cannot {action} {start}: model shape differs")
    assert "n_embd: checkpoint 64 vs recipe 128" in message
    assert checkpoint_files(run) == before


def test_resuming_pretraining_over_a_finetuned_run_is_refused(copy_run):
    from lmforge.pipeline import pretrain_stage

    run = RunDir(copy_run())
    assert read_state(run.checkpoint("last"))["stage"] == "finetune"
    before = {n: (run.checkpoint(n) / "model.safetensors").read_bytes() for n in ("last", "best", "pretrained")}
    with pytest.raises(LmforgeError, match="is a fine-tuning checkpoint: pretraining in this run is over"):
        pretrain_stage(tiny_recipe(), run, resume=True)
    assert before == {n: (run.checkpoint(n) / "model.safetensors").read_bytes() for n in before}


def test_resuming_from_an_incompatible_checkpoint_is_a_clear_error(copy_run, data_dir):
    import json

    from lmforge.pipeline import finetune_stage

    run = RunDir(copy_run())
    state_file = run.checkpoint("last") / "state.json"
    state = json.loads(state_file.read_text())
    assert state["stage"] == "finetune" and (run.checkpoint("last") / "trainer.safetensors").is_file()
    before = (run.checkpoint("last") / "model.safetensors").read_bytes()
    with pytest.raises(LmforgeError, match="trained with optimizer 'adamw'.*finetune.optimizer = 'muon'"):
        finetune_stage(tiny_recipe(**{"finetune.optimizer": "muon"}), run, data_dir, resume=True)
    del state["bad_evals"]  # as a checkpoint of another lmforge version might lack it
    state_file.write_text(json.dumps(state))
    with pytest.raises(LmforgeError) as err:
        finetune_stage(tiny_recipe(), run, data_dir, resume=True)
    assert "cannot resume from this checkpoint" in str(err.value) and "'bad_evals'" in str(err.value)
    assert "\n" not in str(err.value)
    assert (run.checkpoint("last") / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_resuming_a_trained_stage_without_its_last_checkpoint_is_refused(copy_run, data_dir, stage, damage):
    from lmforge.pipeline import finetune_stage, pretrain_stage

    run = RunDir(copy_run())
    if stage == "pretrain":  # the run as pretraining left it: its last checkpoint is the newest snapshot
        copy_checkpoint(run.checkpoint("pretrain-step-0000150"), run.checkpoint("last"))
        shutil.rmtree(run.checkpoint("best"))
        shutil.rmtree(run.checkpoint("finetune-step-0000100"))
        shutil.rmtree(run.checkpoint("finetune-step-0000150"))
    if damage == "missing":
        shutil.rmtree(run.checkpoint("last"))
    else:
        (run.checkpoint("last") / "state.json").write_text("{broken")
    before = checkpoint_files(run)
    with pytest.raises(LmforgeError) as err:
        if stage == "pretrain":
            pretrain_stage(tiny_recipe(**{"pretrain.max_steps": "5"}), run, resume=True)
        else:
            finetune_stage(tiny_recipe(**{"finetune.max_steps": "5"}), run, data_dir, resume=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot resume {stage}:")
    assert f"to continue from {stage}-step-0000150, copy it to {run.checkpoint('last')}" in message
    assert checkpoint_files(run) == before  # no snapshot deleted, best and pretrained untouched


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--resume", "--model.n_layer", "4"],
        ["pretrain", "--resume", "--pretrain.optimizer", "muon"],
        ["finetune", "--resume", "--data-dir", "DATA", "--finetune.optimizer", "muon"],
    ],
)
def test_a_refused_override_leaves_config_toml_as_it_was(copy_run, data_dir, argv, capsys):
    from lmforge.cli import main

    run = RunDir(copy_run())
    if argv[0] == "pretrain":  # a pretraining resume point
        copy_checkpoint(run.checkpoint("pretrain-step-0000150"), run.checkpoint("last"))
    before = run.config.read_bytes()
    argv = [str(data_dir) if a == "DATA" else a for a in argv]
    assert main([*argv, "--run-dir", str(run.root)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lmforge: error:") and ("model shape differs" in error or "trained with optimizer" in error)
    assert run.config.read_bytes() == before


def test_on_signal_exit_leaves_the_stage_to_resume(tiny_run, tmp_path):
    """pretrain.on_signal = "exit" (a preemptible cluster: SIGTERM, then SIGKILL): a signal saves a checkpoint
    and ends the command, the stage is not marked done, and --resume continues it."""
    import json
    import time

    run = fresh_run(tiny_run, tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "pretrain",
        "--run-dir",
        str(run),
        "--pretrain.on_signal",
        "exit",
        "--pretrain.log_interval",
        "1",
        "--pretrain.eval_interval",
        "1000",
        "--pretrain.checkpoint_interval",
        "1000",
    ]
    child = subprocess.Popen([*args, "--pretrain.max_steps", "5000"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() or '"split": "train"' not in (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and child.poll() is None
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    err = child.communicate(timeout=240)[1]
    assert child.returncode == 2 and "continue with --resume" in err, err[-2000:]
    stopped = read_state(RunDir(run).checkpoint("last"))["step"]
    progress = json.loads((run / "progress.json").read_text()) if (run / "progress.json").is_file() else {}
    assert "pretrain" not in progress and not (run / "checkpoints" / "pretrained").exists()
    resumed = subprocess.run(
        [*args, "--resume", "--pretrain.max_steps", str(stopped + 2)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped}" in resumed.stderr
    assert json.loads((run / "progress.json").read_text())["pretrain"]["steps"] == stopped + 2
