"""Vocabulary resize: learned rows follow their tokens, new rows start at the mean, training continues."""

from __future__ import annotations

import math
import tomllib

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_recipe
from lmforge.model import GPT, GPTConfig
from lmforge.resize import token_row_map
from lmforge.rundir import RunDir
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.checkpoint import copy_checkpoint, load_trainer_state, model_from_checkpoint, read_state
from lmforge.train.metrics import read_metrics

from .conftest import TINY

TEXT = [" ".join(f"w{i * 7919 % 5000}" for i in range(j, j + 50)) for j in range(0, 5000, 50)]
OTHER_TEXT = [" ".join(f"zq{i * 31 % 900}x" for i in range(j, j + 50)) for j in range(0, 5000, 50)]


def test_resize_vocab_maps_rows_by_token_string_and_shrinks():
    old_tok = train_tokenizer(TEXT, 330, 100_000, 1)
    new_tok = train_tokenizer(OTHER_TEXT, 300, 100_000, 1)  # other merges: shared tokens get other ids
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=old_tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=8))
    old = model.tok_emb.weight.detach().clone()
    rows = token_row_map(old_tok, new_tok, new_tok.vocab_size)
    model.resize_vocab(new_tok.vocab_size, rows)
    assert model.tok_emb.weight.shape[0] == new_tok.vocab_size < old.shape[0]
    assert model.lm_head.weight is model.tok_emb.weight
    moved = shared = fresh = 0
    for new_id in range(new_tok.vocab_size):
        old_id = old_tok.hf.token_to_id(new_tok.id_to_token(new_id))
        if old_id is None:
            assert torch.allclose(model.tok_emb.weight[new_id], old.mean(0))
            fresh += 1
        else:
            assert torch.equal(model.tok_emb.weight[new_id], old[old_id])
            shared += 1
            moved += old_id != new_id
    assert shared > 256 and fresh > 0 and moved > 0
    # growing by id: old rows stay, new rows are the mean embedding
    n = model.tok_emb.weight.shape[0]
    model.resize_vocab(n + 5)
    w = model.tok_emb.weight.detach()
    assert torch.allclose(w[-1], w[:n].mean(0)) and model(torch.tensor([[1, 2]])).shape[-1] == n + 5


@pytest.mark.slow
def test_resize_vocab_cli_grows_a_run_and_training_continues(copy_run, data_dir):
    run = RunDir(copy_run())
    copy_checkpoint(run.checkpoint("pretrain-step-0000150"), run.checkpoint("last"))  # resume point in pretraining
    old_tok = Tokenizer.load(run.tokenizer)
    old_last = model_from_checkpoint(run.checkpoint("last"))
    old_moments = load_trainer_state(run.checkpoint("last"), read_state(run.checkpoint("last")))["optimizer"]

    assert main(["resize-vocab", str(run.root), "--vocab-size", "2304", "--data-dir", str(data_dir)]) == 0
    new_tok = Tokenizer.load(run.tokenizer)
    assert new_tok.vocab_size == 2304
    assert tomllib.loads(run.config.read_text())["tokenizer"]["vocab_size"] == 2304
    for name in ("last", "best", "pretrained", "pretrain-step-0000150", "finetune-step-0000150"):
        assert model_from_checkpoint(run.checkpoint(name)).cfg.vocab_size == 2304, name

    new_last = model_from_checkpoint(run.checkpoint("last"))
    old_w, new_w = old_last.tok_emb.weight.detach(), new_last.tok_emb.weight.detach()
    kept = [i for i in range(2304) if old_tok.hf.token_to_id(new_tok.id_to_token(i)) is not None]
    fresh = [i for i in range(2304) if i not in set(kept)]
    assert len(kept) >= 2000 and fresh
    for i in kept[::50] + kept[-3:]:
        assert torch.equal(new_w[i], old_w[old_tok.hf.token_to_id(new_tok.id_to_token(i))])
    assert torch.allclose(new_w[fresh[0]], old_w.mean(0))
    assert all(
        torch.equal(a, b)
        for (k, a), (_, b) in zip(old_last.state_dict().items(), new_last.state_dict().items(), strict=True)
        if "tok_emb" not in k and "lm_head" not in k
    )
    state = read_state(run.checkpoint("last"))
    trainer = load_trainer_state(run.checkpoint("last"), state)
    emb_moments = [s["exp_avg"] for s in trainer["optimizer"]["state"].values() if s["exp_avg"].shape[0] == 2304]
    old_emb = [s["exp_avg"] for s in old_moments["state"].values() if s["exp_avg"].shape[0] == old_w.shape[0]]
    i = kept[-1]
    assert torch.equal(emb_moments[0][i], old_emb[0][old_tok.hf.token_to_id(new_tok.id_to_token(i))])
    assert torch.count_nonzero(emb_moments[0][fresh[0]]) == 0
    assert state["step"] == 150 and math.isinf(state["best_val_loss"])
    events = [r for r in read_metrics(run.metrics) if r.get("event") == "resize_vocab"]
    assert events and events[-1]["label"] == "vocab 2048 -> 2304" and events[-1]["step"] == 150

    # training continues from step 150 with the new vocabulary, from what it had learned
    from lmforge.pipeline import pretrain_stage

    recipe = load_recipe(run.config, {"pretrain.max_steps": "156", "pretrain.log_interval": "1"})
    result = pretrain_stage(recipe, run, resume=True)
    assert result.steps == 156
    losses = [r["loss"] for r in read_metrics(run.metrics) if r.get("split") == "train" and r["step"] > 150]
    assert len(losses) >= 6 and max(losses[-6:]) < math.log(2304) - 1.0  # far below an untrained model's loss


def test_resize_vocab_takes_no_recipe_overrides(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text("name = 'r'\n")
    assert main(["resize-vocab", str(run.root), "--vocab-size", "1500", "--model.n_layer", "3"]) == 2
    assert "resize-vocab takes no recipe overrides (got --model.n_layer)" in capsys.readouterr().err
    assert run.config.read_text() == "name = 'r'\n"


@pytest.mark.parametrize("how", ["--vocab-size", "--tokenizer"])
def test_resize_vocab_below_the_recipe_minimum_is_refused_before_anything_changes(tmp_path, capsys, how):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(TINY.read_text())
    train_tokenizer(TEXT, 330, 100_000, 1).save(run.tokenizer)
    small = train_tokenizer(["abc " * 10_000], vocab_size=1000, sample_chars=50, min_frequency=1)
    assert small.vocab_size < 300
    small.save(tmp_path / "small.json")
    before = {p.name: p.read_bytes() for p in run.root.iterdir()}
    value = "10" if how == "--vocab-size" else str(tmp_path / "small.json")
    assert main(["resize-vocab", str(run.root), how, value]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    size = 10 if how == "--vocab-size" else small.vocab_size
    assert error == (
        f"lmforge: error: cannot resize the vocabulary to {size} tokens: "
        "tokenizer.vocab_size: must be >= 300 (256 bytes + specials)"
    )
    assert {p.name: p.read_bytes() for p in run.root.iterdir()} == before


def test_resize_vocab_is_refused_while_another_process_holds_the_run(tmp_path, capsys):
    import os

    from lmforge.rundir import run_lock

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(TINY.read_text())
    train_tokenizer(TEXT, 330, 100_000, 1).save(run.tokenizer)
    train_tokenizer(OTHER_TEXT, 300, 100_000, 1).save(tmp_path / "new.json")
    before = run.tokenizer.read_bytes()
    with run_lock(run, "pretrain"):  # another open of the lock file conflicts like another process's
        assert main(["resize-vocab", str(run.root), "--tokenizer", str(tmp_path / "new.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"in use by lmforge pretrain (pid {os.getpid()} on " in error, error
    assert run.tokenizer.read_bytes() == before
