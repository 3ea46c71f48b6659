"""The pretraining loader: phased mixture proportions, exact resume, prefetch, validation, freeing disk,
and the training loop following the phases."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import DataConfig, PhaseConfig, SourceConfig, TrainConfig
from lmforge.data.loader import Phase, TokenBatcher, resolve_phases
from lmforge.data.shards import prepare_shards, read_index
from lmforge.errors import LmforgeError
from lmforge.model import GPT, GPTConfig
from lmforge.rundir import RunDir
from lmforge.tokenizer import train_tokenizer
from lmforge.train.checkpoint import load_trainer_state, read_state, save_checkpoint
from lmforge.train.loop import train_stage

NAMES = ("web", "books", "stories", "squad")
BLOCK, BATCH = 32, 8


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = f"alpha{seed} beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    sources = []
    for i, (name, n) in enumerate(zip(NAMES, (400, 200, 60, 40), strict=True)):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(n, i)))
        sources.append(SourceConfig(name=name, local=str(path)))
    tok = train_tokenizer(texts(100, 9), vocab_size=320, sample_chars=100_000)
    cfg = DataConfig(sources=sources, shard_tokens=2048, val_fraction=0.1, workers=1)
    prepare_shards(cfg, tok, None, root / "data")
    return root / "data"


PHASES = [
    Phase("web only", 20 * BATCH * BLOCK, {"web": 1.0}),
    Phase("mix", 0, {"web": 50, "books": 30, "stories": 10, "squad": 10}),
]


def batcher(shards: Path, **kw) -> TokenBatcher:
    args = dict(phases=PHASES, shuffle_buffer=16, seed=7)
    args.update(kw)
    return TokenBatcher(shards, "train", BLOCK, BATCH, **args)


def digest(batch) -> str:
    x, y = batch
    return hashlib.sha256(x.numpy().tobytes() + y[:, -1:].numpy().tobytes()).hexdigest()


def test_phases_follow_budgets_and_realised_proportions_match_weights(shards):
    loader = batcher(shards)
    counts = np.zeros(len(NAMES))
    for i in range(2000):
        rows, events = loader.sampler.next_rows()
        sources = [loader.streams[s].name for s, _ in rows]
        if i < 20:
            assert set(sources) == {"web"} and not events
            continue
        if i == 20:
            assert events == [{"event": "phase", "phase": "mix", "label": "phase 2: mix"}]
        for name in sources:
            counts[NAMES.index(name)] += 1
    realised = counts / counts.sum()
    assert np.abs(realised - np.array([0.5, 0.3, 0.1, 0.1])).max() < 0.02


def test_resumed_loader_sees_exactly_the_uninterrupted_batches(shards, tmp_path):
    plain = batcher(shards, prefetch=0)
    reference = [digest(plain.next_batch()) for _ in range(60)]
    first = batcher(shards, prefetch=3)
    seen = [digest(first.next_batch()) for _ in range(17)]
    model = GPT(GPTConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=BLOCK))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, {"step": 17}, {"data": first.state_dict()})  # through the real checkpoint files
    for _ in range(5):  # the interrupted run went on past its checkpoint
        first.next_batch()
    first.close()
    resumed = batcher(shards, prefetch=3)
    resumed.load_state_dict(load_trainer_state(ckpt, read_state(ckpt))["data"])
    seen += [digest(resumed.next_batch()) for _ in range(43)]
    assert seen == reference  # crosses the phase change and several passes over the small sources
    assert len(set(reference)) == len(reference)


def test_validation_is_fixed_and_held_out(shards):
    val = TokenBatcher(shards, "val", BLOCK, BATCH, seed=1)
    a, b = val.fixed_batches(3), val.fixed_batches(3)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
    manifest = json.loads((shards / "manifest.json").read_text())
    train, held = set(), set()
    for entry in manifest["sources"]:
        for split, hashes in (("train", train), ("val", held)):
            for shard in entry["shards"][split]:
                hashes.update(read_index(shards / shard["index"])["hash"].tolist())
    assert held and not train & held


def test_consumed_shards_are_deleted_only_when_asked_and_after_a_checkpoint(tmp_path, shards):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    phases = [Phase("books", 0, {"books": 1.0})]
    keep = batcher(data, phases=phases, shuffle_buffer=4)
    for _ in range(12):
        keep.next_batch()
    keep.state_dict()
    keep.checkpoint_saved()
    books = sorted((data / "books").glob("train-*.bin"))
    assert len(books) >= 3  # never deleted by default
    loader = batcher(data, phases=phases, shuffle_buffer=4, delete_consumed=True)
    for _ in range(12):
        loader.next_batch()
    loader.checkpoint_saved()  # no checkpoint saved yet: nothing may go
    assert sorted((data / "books").glob("train-*.bin")) == books
    loader.state_dict()
    loader.checkpoint_saved()
    left = sorted((data / "books").glob("train-*.bin"))
    assert 0 < len(left) < len(books) and left == books[-len(left) :]
    with pytest.raises(LmforgeError, match="delete_consumed"):
        for _ in range(200):  # a second pass needs the deleted shards
            loader.next_batch()


def test_no_phases_is_one_phase_with_the_source_weights():
    data = DataConfig(sources=[SourceConfig(name="a", local="x", weight=2), SourceConfig(name="b", local="y")])
    assert resolve_phases(data) == [Phase("mixture", 0, {"a": 2.0, "b": 1.0})]
    data.phases = [PhaseConfig(name="", tokens=10, weights={"a": 1}), PhaseConfig(name="all")]
    assert resolve_phases(data) == [Phase("phase 1", 10, {"a": 1}), Phase("all", 0, {"a": 2.0, "b": 1.0})]


class Recording(TokenBatcher):
    """Records every batch handed to the loop; can drop a STOP file after n batches (a graceful interruption)."""

    def __init__(self, *args, stop_after: int = 0, run: RunDir | None = None, **kw):
        super().__init__(*args, **kw)
        self.hashes: list[str] = []
        self.stop_after, self.run = stop_after, run

    def next_batch(self):
        batch = super().next_batch()
        self.hashes.append(digest(batch))
        if self.stop_after and len(self.hashes) == self.stop_after:
            self.run.stop_file.touch()
        return batch


def test_training_loop_follows_phases_and_resumes_on_the_same_batches(shards, tmp_path):
    def train(run_dir: Path, resume=False, stop_after=0) -> Recording:
        run = RunDir(run_dir)
        run.root.mkdir(exist_ok=True)
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=BLOCK))
        phases = [Phase("web only", 5 * BATCH * BLOCK, {"web": 1.0}), PHASES[1]]
        data = Recording(
            shards, "train", BLOCK, BATCH, seed=3, phases=phases, prefetch=2, stop_after=stop_after, run=run
        )
        val = TokenBatcher(shards, "val", BLOCK, BATCH, seed=4)
        cfg = TrainConfig(
            max_steps=10,
            batch_size=BATCH,
            warmup_steps=1,
            eval_interval=5,
            eval_batches=1,
            checkpoint_interval=5,
            log_interval=5,
            device="cpu",
            dtype="float32",
        )
        train_stage(model, data, val, cfg, run, "pretrain", 10, resume=resume, seed=0)
        return data

    whole = train(tmp_path / "whole")
    assert whole._thread is None  # the loop stopped the prefetch thread
    events = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    phase_events = [e for e in events if e.get("event") == "phase"]
    assert [(e["stage"], e["step"], e["label"]) for e in phase_events] == [("pretrain", 6, "phase 2: mix")]
    assert (tmp_path / "whole" / "plots" / "loss.png").is_file()
    part1 = train(tmp_path / "split", stop_after=3)
    part2 = train(tmp_path / "split", resume=True)
    assert part1.hashes + part2.hashes == whole.hashes


def test_phase_plan_warns_about_a_phase_the_run_never_reaches(caplog):
    from lmforge.data.loader import log_phase_plan

    log_phase_plan(PHASES, tokens_per_step=BATCH * BLOCK, total_steps=50)
    assert "never" not in caplog.text and "after this run" not in caplog.text
    log_phase_plan(PHASES, tokens_per_step=BATCH * BLOCK, total_steps=20)
    assert "data phase 2 'mix' starts at step 20, after this run's 20 steps" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "missing", "manifest"])
def test_damaged_shards_or_manifest_are_one_line_naming_the_file(tmp_path, shards, damage):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    shard = data / "web" / "train-00000.bin"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
        expected = f"{shard}: damaged shard (1,000 bytes, the manifest says"
    elif damage == "missing":
        shard.unlink()
        expected = f"{shard}: shard missing; delete {shard.parent} and run `lmforge prepare` again"
    else:
        (data / "manifest.json").write_text("{")
        expected = f"{data / 'manifest.json'}: unreadable manifest ("
    with pytest.raises(LmforgeError) as err:
        loader = batcher(data, phases=[Phase("web", 0, {"web": 1.0})], shuffle_buffer=4)
        for _ in range(4):
            loader.next_batch()
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    assert "delete_consumed" not in str(err.value)


def test_the_validation_mixture_takes_the_recipes_weights_not_the_manifests(shards):
    # weights are a recipe property: the manifest holds none, and an override after prepare must reach validation
    manifest = json.loads((shards / "manifest.json").read_text())
    assert all("weight" not in e for e in manifest["sources"])
    val = TokenBatcher(shards, "val", BLOCK, BATCH, seed=1, weights={"web": 5, "books": 1, "stories": 1, "squad": 1})
    names = [s.name for s in val.streams]
    want = np.array([{"web": 5, "books": 1, "stories": 1, "squad": 1}[n] for n in names], dtype=float)
    assert np.allclose(val.eval_probs, want / want.sum())
    plain = TokenBatcher(shards, "val", BLOCK, BATCH, seed=1)
    assert np.allclose(plain.eval_probs, 1 / len(plain.streams))
