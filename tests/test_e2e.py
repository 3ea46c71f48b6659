"""End to end: the tiny recipe trained for real on the shared data samples, checked as a user would."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lmforge
from lmforge.train.metrics import read_metrics

from .conftest import REPO, TINY

pytestmark = pytest.mark.slow


def cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def val_losses(run_dir, stage):
    return [
        r["loss"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r.get("stage") == stage and r.get("split") == "val"
    ]


def test_loss_falls_in_pretraining_and_finetuning(tiny_run):
    pre = val_losses(tiny_run, "pretrain")
    assert pre[0] > 7.0  # ~ln(2048): an untrained model
    assert min(pre) < pre[0] - 1.0
    fine = val_losses(tiny_run, "finetune")
    assert min(fine) < fine[0] - 0.3


def test_run_directory_contract(tiny_run):
    for rel in [
        "config.toml",
        "tokenizer.json",
        "checkpoints/last/model.safetensors",
        "checkpoints/last/state.json",
        "checkpoints/best/model.safetensors",
        "checkpoints/pretrained/model.safetensors",
        "plots/loss.png",
        "eval/report.json",
        "eval/report.md",
        "data/manifest.json",
    ]:
        assert (tiny_run / rel).is_file(), rel
    records = read_metrics(tiny_run / "metrics.jsonl")
    losses = [r for r in records if "loss" in r]
    assert {r["split"] for r in losses} == {"train", "val"}
    assert all({"step", "split", "loss", "tokens"} <= r.keys() for r in losses)
    assert any(r.get("event") == "finetune_start" for r in records)
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    assert report["val_loss"] > 0 and 0 < report["bpb"] < 8
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["val_loss"], rel=1e-6)
    squad = report["squad"]
    assert squad["n"] == 64 and 0 <= squad["em"] <= squad["f1"] <= 100 and len(squad["examples"]) == 20
    assert "SQuAD F1" in (tiny_run / "eval" / "report.md").read_text()


def test_python_api_load(tiny_run):
    model, tok = lmforge.load(tiny_run, checkpoint="best")
    assert not model.training
    ids = torch.tensor([tok.encode("Once upon a time")])
    assert model(ids).shape == (1, ids.shape[1], tok.vocab_size)
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"
    pre, _ = lmforge.load(tiny_run, checkpoint="pretrained")
    assert not torch.equal(pre(ids), model(ids))  # fine-tuning changed the weights


def test_cli_generate_is_reproducible_with_a_seed(tiny_run):
    args = ["generate", "--run-dir", tiny_run, "Once upon a time", "--seed", "3", "--max-new-tokens", "20"]
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("Once upon a time")
    # free text comes from the pretrained model by default: the fine-tuned one answers briefly and stops
    assert cli(*args, "--checkpoint", "pretrained").stdout == first.stdout
    assert cli(*args, "--checkpoint", "best").stdout != first.stdout
    answer = cli("generate", "--run-dir", tiny_run, "--question", "Who?", "--context", "Paris is in France.")
    assert answer.returncode == 0, answer.stderr


def test_cli_generate_question_follows_the_runs_decoding(copy_run):
    """With eval.decoding = "span" in the run's config, `generate --question` answers with a passage span."""
    run = copy_run()
    config = run / "config.toml"
    text = config.read_text()
    assert 'decoding = "greedy"' in text
    config.write_text(text.replace('decoding = "greedy"', 'decoding = "span"'))
    context = "Marie Curie was born in Warsaw in 1867 and won two Nobel Prizes."
    answer = cli("generate", "--run-dir", run, "--question", "Where was Marie Curie born?", "--context", context)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() and answer.stdout.strip() in context


def test_cli_refuses_to_overwrite_an_existing_run(tiny_run):
    before = (tiny_run / "config.toml").read_bytes()
    proc = cli("run", TINY, "--run-dir", tiny_run, "--data-dir", "/nonexistent")
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tiny_run / "config.toml").read_bytes() == before


def test_tokenizer_train_refuses_to_replace_the_tokenizer_of_a_trained_run(copy_run, data_dir):
    run = copy_run()
    before = {name: (run / name).read_bytes() for name in ("tokenizer.json", "config.toml")}
    proc = cli("tokenizer", "train", "--run-dir", run, "--data-dir", data_dir, "--tokenizer.vocab_size", "1000")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("lmforge: error:") and "checkpoints (best," in error and "token shards" in error
    assert f"use `lmforge resize-vocab {run} --vocab-size N`" in error
    assert {name: (run / name).read_bytes() for name in before} == before  # the refused override is not saved


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "no-such-recipe"], "recipe not found: no-such-recipe"),
        (["run"], "give a RECIPE to start a new run, or --resume --run-dir RUN to continue one"),
        (["run", "--run-dir", "/nonexistent/run"], "give a RECIPE to start a new run"),
        (["generate", "--run-dir", "/nonexistent/run", "hi"], "run directory not found"),
        (["pretrain", "--run-dir", "/nonexistent/run"], "give a RECIPE, or a --run-dir"),
        (["pretrain", "tiny"], "--run-dir is required: pretrain works on a run the earlier stages made"),
        (["prepare", "tiny"], "--run-dir is required: prepare works on a run"),
        (["run", "tiny", "--bogus", "1"], "unrecognised argument '--bogus'"),
    ],
)
def test_cli_user_errors_are_one_line(args, message):
    proc = cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lmforge: error:")
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_folder_that_is_not_a_run_is_never_built_into(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "mine.txt").write_text("not a run")
    for args in (
        ["run", TINY, "--resume", "--run-dir", folder],
        ["pretrain", TINY, "--resume", "--run-dir", folder],
        ["tokenizer", "train", TINY, "--run-dir", folder],
    ):
        proc = cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{folder} is not an lmforge run directory (no config.toml)" in proc.stderr
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]


def test_offline_without_local_copy_names_the_dataset(tmp_path, monkeypatch):
    env_overrides = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    monkeypatch.setattr(os, "environ", {**os.environ, **env_overrides})
    (tmp_path / "empty").mkdir()
    proc = cli("tokenizer", "train", TINY, "--run-dir", tmp_path / "r", "--data-dir", tmp_path / "empty")
    assert proc.returncode == 2
    assert "squad-contexts" in proc.stderr and "rajpurkar/squad" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_of_a_finished_run_skips_to_evaluation(copy_run):
    run = copy_run()
    steps_before = json.loads((run / "checkpoints" / "last" / "state.json").read_text())["step"]
    proc = cli("run", "--resume", "--run-dir", run, "--data-dir", os.environ.get("LMFORGE_TEST_DATA", ""))
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "SQuAD EM" in proc.stdout
    assert json.loads((run / "checkpoints" / "last" / "state.json").read_text())["step"] == steps_before
