"""Issue 5 (part B): torchrun DDP / FSDP2 on CPU with gloo, against one process with the same recipe; live control
and stop requests reaching every rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.train.checkpoint import load_trainer_state, load_weights, model_from_checkpoint, read_state
from lmforge.train.metrics import read_metrics

from .conftest import fresh_run
from .synthetic import BATCH, BLOCK, make_run

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
# fp32 so that 1 and 2 processes differ only by the order of floating-point sums
STEPS = [
    "--pretrain.max_steps=6",
    "--pretrain.log_interval=1",
    "--pretrain.eval_interval=3",
    "--pretrain.checkpoint_interval=3",
    "--pretrain.dtype=float32",
]


def launch(args: list[str], nproc: int = 1) -> str:
    """`python ARGS` in one process, or under torchrun in `nproc` processes; returns what they printed, rank by
    rank. Each rank's stdout goes to its own file (torchrun's --redirects): on one shared pipe, unbuffered ranks
    (PYTHONUNBUFFERED, as CI runners set) interleave the pieces of their lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(REPO)]), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as logs:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--log-dir={logs}",
            "--redirects=1",
        ]
        cmd = (launcher if nproc > 1 else [sys.executable]) + args
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if nproc == 1:
            return proc.stdout
        per_rank = sorted(Path(logs).glob("*/attempt_*/*/stdout.log"), key=lambda p: int(p.parent.name))
        assert len(per_rank) == nproc, per_rank
        return "".join(p.read_text() for p in per_rank)


def lmforge(args: list[str], nproc: int = 1) -> None:
    launch(["-m", "lmforge.cli", *args], nproc)


def losses(run: Path) -> list[tuple[int, str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in records if "loss" in r]


# The synthetic task (tests/synthetic.py) under torchrun, or in one process without it. Rank 0 alone writes the
# control file (during step 3); argv[3] names the rank that asks to stop during step 6, by STOP file or SIGTERM.
# Each rank prints what it trained.
CONTROL_AND_STOP = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from lmforge.rundir import RunDir
    from lmforge.train.control import request_stop, write_controls
    from lmforge.train.distributed import rank, shutdown_distributed
    from tests.synthetic import cfg, train

    run, how, who = RunDir(Path(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    def on_rank(r, action):
        return lambda: action() if rank() == r else None
    stops = {"stop_file": lambda: request_stop(run), "interrupted": lambda: os.kill(os.getpid(), signal.SIGTERM)}
    # batches: 1-3 are steps 1-3; with grad_accum 2 from step 4 on, 4-5 are step 4, 6-7 step 5, 8-9 step 6
    hooks = {3: on_rank(0, lambda: write_controls(run, {"lr": 2e-3, "grad_accum": 2})), 8: on_rank(who, stops[how])}
    result, model = train(run, cfg(distributed="ddp"), hooks)  # without torchrun: one process (with a warning)
    weights = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
    print(json.dumps({"rank": rank(), "steps": result.steps, "stop": result.stop_reason, "tokens": result.tokens,
                      "weights": weights}))
    shutdown_distributed()
""")


def control_and_stop(tmp_path: Path, how: str, who: int, nproc: int) -> tuple[Path, dict[int, dict]]:
    """A synthetic run with a control change and a stop request (CONTROL_AND_STOP): its directory, and what
    each rank printed, by rank."""
    script, run = tmp_path / "control_and_stop.py", make_run(tmp_path)
    script.write_text(CONTROL_AND_STOP)
    printed = launch([str(script), str(run.root), how, str(who)], nproc)
    reports = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    return run.root, {r["rank"]: r for r in reports}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_run) -> Path:
    run = fresh_run(tiny_run, tmp_path_factory.mktemp("single") / "run")
    lmforge(["pretrain", "--run-dir", str(run), *STEPS])
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_run):
    """`two_ranks(mode)`: the tiny recipe pretrained by 2 torchrun processes (made once per mode)."""
    made: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in made:
            run = fresh_run(tiny_run, tmp_path_factory.mktemp(mode) / "run")
            lmforge(["pretrain", "--distributed", mode, "--run-dir", str(run), *STEPS], nproc=2)
            made[mode] = run
        return made[mode]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_loss(mode, single, two_ranks):
    run = two_ranks(mode)
    ours, ref = losses(run), losses(single)
    assert [(s, k) for s, k, _ in ours] == [(s, k) for s, k, _ in ref]  # rank 0 alone logged, once per step
    assert len(ours) == 9
    for (step, split, a), (_, _, b) in zip(ours, ref, strict=True):
        assert a == pytest.approx(b, rel=1e-5), (step, split)
    # the full-state checkpoint loads in one process and matches the single-process weights
    model = model_from_checkpoint(run / "checkpoints" / "last")
    reference = model_from_checkpoint(single / "checkpoints" / "last")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert read_state(run / "checkpoints" / "last")["step"] == 6


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_process(single, two_ranks, tmp_path):
    """FSDP (2 ranks) writes the optimizer state sharded (one DCP file per rank, nothing gathered); resumed
    on 1 process, and again on 2, it gives the same continuation as a 1-process run resumed."""
    last = two_ranks("fsdp") / "checkpoints" / "last"
    assert read_state(last)["optimizer_format"] == "sharded"
    shards = sorted(f.name for f in (last / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    assert "optimizer" not in read_state(last)["trainer"]  # not also gathered into trainer.safetensors
    assert read_state(single / "checkpoints" / "last")["optimizer_format"] == "full"
    run, again, ref = tmp_path / "fsdp", tmp_path / "fsdp-again", tmp_path / "single"
    shutil.copytree(two_ranks("fsdp"), run)
    shutil.copytree(two_ranks("fsdp"), again)
    shutil.copytree(single, ref)
    more = [*STEPS, "--pretrain.max_steps=8"]
    lmforge(["pretrain", "--resume", "--run-dir", str(run), *more])  # config says fsdp: runs in one process
    lmforge(["pretrain", "--resume", "--distributed", "fsdp", "--run-dir", str(again), *more], nproc=2)
    lmforge(["pretrain", "--resume", "--run-dir", str(ref), *more])
    theirs = losses(ref)
    for ours in (losses(run), losses(again)):
        assert [s for s, k, _ in ours if k == "train"][-2:] == [7, 8]
        for (step, split, a), (_, _, b) in zip(ours, theirs, strict=True):
            assert a == pytest.approx(b, rel=1e-5), (step, split)


@pytest.mark.slow
def test_missing_optimizer_shards_are_one_clear_line(two_ranks, tmp_path, capsys):
    run = tmp_path / "fsdp"
    shutil.copytree(two_ranks("fsdp"), run)
    (run / "checkpoints" / "last" / "optimizer" / "__1_0.distcp").unlink()
    before = (run / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert main(["pretrain", "--resume", "--run-dir", str(run), *STEPS, "--pretrain.max_steps=8"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmforge: error:")]
    assert len(errors) == 1 and "cannot read the optimizer shards (FileNotFoundError" in errors[0], err
    assert "__1_0.distcp" in errors[0] and "Traceback" not in err
    assert (run / "checkpoints" / "last" / "model.safetensors").read_bytes() == before  # left as it was


def test_distributed_without_torchrun_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert main(["pretrain", "--distributed", "ddp", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torchrun" in err


def test_load_weights_accepts_checkpoints_written_by_any_world_size(single):
    """Checkpoints hold full tensors under plain names: nothing records how many ranks wrote them."""
    model = model_from_checkpoint(single / "checkpoints" / "last")
    load_weights(model, single / "checkpoints" / "last")
    state = read_state(single / "checkpoints" / "last")
    names = json.dumps(state["trainer"]["optimizer"]["param_groups"])
    assert "layers.0.attn.q_proj.weight" in names  # optimizer state keyed by parameter name, not position


@pytest.mark.parametrize("rows, world", [(1, 3), (2, 3), (3, 2), (5, 4)])
def test_ranks_share_a_qa_batch_so_each_answer_token_counts_once(rows, world):
    """However many rows a QA batch has (the last of an epoch may have fewer than the ranks), the ranks' losses,
    weighed by their scored tokens as `step_shares` does, are the one-process loss; a rank left without a row
    gets a filler with nothing scored, whose loss is 0 with zero gradients (not NaN)."""
    from lmforge.model import GPT, GPTConfig
    from lmforge.train.distributed import Parallel
    from lmforge.train.loop import batch_loss, scored_positions

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_embd=16, block_size=24))
    x = torch.randint(0, 97, (rows, 20))
    y = torch.full((rows, 20), -100)
    for r in range(rows):
        y[r, 10 + r : 12 + r + r % 3] = torch.randint(0, 97, (2 + r % 3,))  # answers of 2-4 tokens
    expected = batch_loss(model, x, y, True)
    parts = [Parallel("ddp", rank, world).local_rows((x, y)) for rank in range(world)]
    scored = [scored_positions(py)[0] for _, py in parts]
    assert sum(scored) == scored_positions(y)[0]
    losses = [batch_loss(model, px, py, True) for px, py in parts]
    weighed = sum(loss * n for loss, n in zip(losses, scored, strict=True)) / sum(scored)
    assert torch.allclose(weighed, expected, atol=1e-6)
    for (_, py), loss in zip(parts, losses, strict=True):
        if not (py != -100).any():  # a filler row
            model.zero_grad()
            loss.backward()
            assert float(loss) == 0 and all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


@pytest.fixture(scope="module")
def one_process_control_and_stop(tmp_path_factory) -> Path:
    run, ranks = control_and_stop(tmp_path_factory.mktemp("one"), "stop_file", 0, nproc=1)
    assert sorted(ranks) == [0]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("how, who", [("stop_file", 0), ("interrupted", 1)])
def test_control_changes_and_stop_requests_reach_every_rank(how, who, tmp_path, one_process_control_and_stop):
    run, ranks = control_and_stop(tmp_path, how, who, nproc=2)
    assert sorted(ranks) == [0, 1]
    tokens = (3 + 2 * 3) * BATCH * BLOCK  # grad_accum = 2 from step 4 on, in every rank
    assert all((r["steps"], r["stop"], r["tokens"]) == (6, how, tokens) for r in ranks.values()), ranks
    assert ranks[1]["weights"] == pytest.approx(ranks[0]["weights"], rel=1e-9)  # rank 1 took rank 0's lr too
    changes = [(r["step"], r["changes"]) for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "control"]
    assert changes == [(3, {"lr": 2e-3, "grad_accum": 2})]
    ours, ref = losses(run), losses(one_process_control_and_stop)
    assert [(s, k) for s, k, _ in ours] == [(s, k) for s, k, _ in ref]
    for (step, split, a), (_, _, b) in zip(ours, ref, strict=True):
        assert a == pytest.approx(b, rel=1e-5), (step, split)


def launch_failing(args: list[str], nproc: int) -> str:
    """What `python ARGS` under torchrun printed to stderr, when it failed as it should."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    return proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "launched by torchrun with 2 processes but distributed = none"),  # each would train the run alone
        (
            ["--distributed", "ddp", "--pretrain.batch_size=3"],
            "pretrain.batch_size 3 is not a multiple of the 2 processes",
        ),
    ],
)
def test_torchrun_refuses_what_would_not_train_one_global_batch(extra, message, tiny_run, tmp_path):
    run = fresh_run(tiny_run, tmp_path / "run")
    err = launch_failing(["-m", "lmforge.cli", "pretrain", "--run-dir", str(run), *STEPS, *extra], nproc=2)
    assert f"lmforge: error: {message}" in err, err[-2000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


WAIT_FOR_RANK_0 = textwrap.dedent("""
    import time
    import torch.distributed as dist
    from lmforge.train.distributed import init_distributed, on_main, rank, shutdown_distributed
    init_distributed("ddp")
    on_main(time.sleep, 6)  # rank 0 prepares something for longer than the process group's timeout
    dist.barrier()
    print("done", rank())
    shutdown_distributed()
""")


@pytest.mark.slow
def test_ranks_wait_for_rank_0_longer_than_the_process_group_timeout(tmp_path, monkeypatch):
    """Rank 0 alone tokenizes and shards a corpus under `torchrun ... run` (hours on a real one): the others
    wait on a group with a day's timeout, not torch's default 30 min (gloo) / 10 min (NCCL), here cut to 2 s."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_FOR_RANK_0)
    monkeypatch.setenv("LMFORGE_DIST_TIMEOUT_S", "2")
    printed = launch([str(script)], nproc=2)
    assert sorted(printed.split()) == ["0", "1", "done", "done"]


@pytest.mark.slow
def test_run_joins_the_process_group_from_the_recipe_keys(tmp_path, data_dir):
    """`--pretrain.distributed ddp` (or the recipe's [pretrain] distributed) is what `--distributed ddp` sets:
    under torchrun, `run` joins the group before the ranks share the run's name and preparation."""
    run = tmp_path / "run"
    lmforge(
        [
            "run",
            str(REPO / "recipes" / "tiny.toml"),
            "--run-dir",
            str(run),
            "--data-dir",
            str(data_dir),
            "--pretrain.distributed",
            "ddp",
            "--finetune.distributed",
            "ddp",
            "--tokenizer.sample_chars",
            "300000",
            "--pretrain.max_steps",
            "4",
            "--pretrain.log_interval",
            "1",
            "--finetune.max_steps",
            "2",
            "--eval.squad_questions",
            "4",
            "--eval.val_batches",
            "1",
        ],
        nproc=2,
    )
    assert json.loads((run / "eval" / "report.json").read_text())["squad"]["n"] == 4
    train_rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "train"]
    assert [r["step"] for r in train_rows if r["stage"] == "pretrain"] == [1, 2, 3, 4]  # logged once: rank 0


def _files(root: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock's (which names its latest holder)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def _new_tokenizer(tmp_path: Path) -> Path:
    from lmforge.tokenizer import train_tokenizer

    text = [" ".join(f"w{i * 7919 % 5000}" for i in range(j, j + 50)) for j in range(0, 5000, 50)]
    path = tmp_path / "new-tokenizer.json"
    train_tokenizer(text, 330, 100_000, 1).save(path)
    return path


@pytest.mark.slow
def test_resize_vocab_of_an_fsdp_run_continues_like_a_resized_single_process_run(single, two_ranks, tmp_path, data_dir):
    """resize-vocab reads the FSDP optimizer shards whole and writes every checkpoint in the full format; the
    resumed run then continues like the 1-process run resized the same way."""
    run, ref = tmp_path / "fsdp", tmp_path / "single"
    shutil.copytree(two_ranks("fsdp"), run)
    shutil.copytree(single, ref)
    assert main(["resize-vocab", str(ref), "--vocab-size", "2304", "--data-dir", str(data_dir)]) == 0
    assert (
        main(["resize-vocab", str(run), "--tokenizer", str(ref / "tokenizer.json"), "--data-dir", str(data_dir)]) == 0
    )
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (ref / "checkpoints").iterdir())  # nothing left under staging names
    for name in names:
        last = run / "checkpoints" / name
        assert read_state(last)["optimizer_format"] == "full" and not (last / "optimizer").exists(), name
        assert model_from_checkpoint(last).cfg.vocab_size == 2304, name
    ours, theirs = (
        load_trainer_state(d / "checkpoints" / "last", read_state(d / "checkpoints" / "last")) for d in (run, ref)
    )
    for key in ("exp_avg", "exp_avg_sq"):  # the embedding's moments moved with their rows, as in the full format
        a, b = (t["optimizer"]["state"]["tok_emb.weight"][key] for t in (ours, theirs))
        assert a.shape[0] == 2304
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-3)
    more = [*STEPS, "--pretrain.max_steps=8"]
    lmforge(["pretrain", "--resume", "--run-dir", str(run), *more])  # config says fsdp: runs in one process
    lmforge(["pretrain", "--resume", "--run-dir", str(ref), *more])
    resumed = [(s, k, v) for s, k, v in losses(run) if s > 6]
    assert [s for s, k, _ in resumed if k == "train"] == [7, 8]
    for (step, split, a), (_, _, b) in zip(resumed, [r for r in losses(ref) if r[0] > 6], strict=True):
        assert a == pytest.approx(b, rel=1e-5), (step, split)


@pytest.mark.slow
def test_resize_vocab_refusal_leaves_an_fsdp_run_unchanged(two_ranks, tmp_path, capsys):
    """A checkpoint that cannot be resized (here: an optimizer shard missing) is refused before the tokenizer,
    the shards or any other checkpoint changes."""
    run = tmp_path / "fsdp"
    shutil.copytree(two_ranks("fsdp"), run)
    (run / "checkpoints" / "pretrain-step-0000006" / "optimizer" / "__1_0.distcp").unlink()
    before = _files(run)
    assert main(["resize-vocab", str(run), "--tokenizer", str(_new_tokenizer(tmp_path))]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmforge: error:")]
    assert len(errors) == 1 and "pretrain-step-0000006/optimizer: cannot read the optimizer shards" in errors[0], err
    assert "Traceback" not in err
    assert _files(run) == before


@pytest.mark.slow
def test_resize_vocab_interrupted_while_swapping_is_finished_by_running_it_again(
    two_ranks, tmp_path, monkeypatch, data_dir
):
    from lmforge import resize
    from lmforge.tokenizer import Tokenizer

    run = tmp_path / "fsdp"
    shutil.copytree(two_ranks("fsdp"), run)
    new_tok = _new_tokenizer(tmp_path)
    swaps = []
    from lmforge.io import replace_dir

    def swap_then_die(staging: Path, target: Path) -> None:  # the shards and one checkpoint get swapped in
        if len(swaps) == 2:
            raise KeyboardInterrupt
        swaps.append(target.name)
        replace_dir(staging, target)

    monkeypatch.setattr(resize, "replace_dir", swap_then_die)
    args = ["resize-vocab", str(run), "--tokenizer", str(new_tok), "--data-dir", str(data_dir)]
    assert main(args) == 130
    assert swaps[0] == "data" and Tokenizer.load(run / "tokenizer.json").vocab_size == 2048  # half done
    monkeypatch.undo()
    assert main(args) == 0
    size = Tokenizer.load(new_tok).vocab_size
    assert Tokenizer.load(run / "tokenizer.json").vocab_size == size
    for ckpt in (run / "checkpoints").iterdir():
        assert model_from_checkpoint(ckpt).cfg.vocab_size == size, ckpt.name
    assert not list(run.glob(".resized-*")) and not list((run / "checkpoints").glob(".resized-*"))
    lmforge(["pretrain", "--resume", "--run-dir", str(run), *STEPS, "--pretrain.max_steps=7"])
    assert [s for s, k, _ in losses(run) if k == "train"][-1] == 7


# The synthetic task with dropout under torchrun (2 DDP ranks), fresh or resumed from checkpoints/last.
DROPOUT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from lmforge.rundir import RunDir
    from lmforge.train.distributed import shutdown_distributed
    from tests.synthetic import cfg, train

    train(RunDir(Path(sys.argv[1])), cfg(distributed="ddp", dropout=0.1, max_steps=8), resume=sys.argv[2] == "resume")
    shutdown_distributed()
""")


@pytest.mark.slow
def test_ddp_resume_with_dropout_is_exact(tmp_path):
    """Each rank draws its own dropout masks: every rank's RNG stream is checkpointed and continued, so a 2-rank run
    resumed from its step-4 checkpoint logs what the uninterrupted run logged."""
    script, run = tmp_path / "dropout.py", make_run(tmp_path / "whole").root
    script.write_text(DROPOUT)
    launch([str(script), str(run), "fresh"], nproc=2)
    trainer = read_state(run / "checkpoints" / "last")["trainer"]
    assert len(trainer["rng_ranks"]) == 2
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "last")
    shutil.copytree(run / "checkpoints" / "pretrain-step-0000004", resumed / "checkpoints" / "last")
    launch([str(script), str(resumed), "resume"], nproc=2)
    whole = [r for r in losses(run) if r[0] > 4]
    after = [r for r in losses(resumed) if r[0] > 4][-len(whole) :]  # the resumed attempt's rows
    assert [(s, k) for s, k, _ in after] == [(s, k) for s, k, _ in whole] and len(whole) == 5
    for (step, split, a), (_, _, b) in zip(after, whole, strict=True):
        assert a == pytest.approx(b, abs=1e-6), (step, split)


def test_a_rank_without_a_saved_rng_stream_gets_its_own():
    from lmforge.train.checkpoint import restore_rng_state, rng_state

    torch.manual_seed(5)
    trainer = {"rng": rng_state()}
    draws = {}
    for rank in (0, 1, 1):
        assert restore_rng_state(trainer, rank, seed=0, step=4) == 1
        draws.setdefault(rank, []).append(torch.rand(3))
    assert not torch.equal(draws[0][0], draws[1][0])  # distinct masks per rank
    assert torch.equal(draws[1][0], draws[1][1])  # and deterministic
    torch.manual_seed(5)
    assert torch.equal(draws[0][0], torch.rand(3))  # rank 0 continues the saved stream
