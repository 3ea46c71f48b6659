"""Shared fixtures: the real data samples, and a tiny recipe run trained once per test session."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

# Tests never use the network: Hugging Face libraries read these once, at import, so they are set before any
# test imports them (and subprocesses inherit them). Hub loading code is exercised through local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.toml"


def test_data_dir() -> Path:
    return Path(os.environ.get("LMFORGE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = test_data_dir()
    if not (d / "squad" / "dev-v1.1.json").is_file():
        pytest.skip(f"real data samples not found at {d} (set LMFORGE_TEST_DATA)")
    return d


@pytest.fixture(autouse=True)
def _lmforge_logs_propagate():
    # the CLI turns propagation off; tests want caplog to see lmforge warnings
    logging.getLogger("lmforge").propagate = True
    yield


def tiny_recipe(**overrides: str):
    from lmforge.config import load_recipe

    return load_recipe(TINY, overrides)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir) -> Path:
    """The tiny recipe trained end to end (tokenizer, shards, pretrain, finetune, eval). Read-only for tests:
    copy it (`copy_run`) before changing anything."""
    from lmforge.pipeline import run_recipe

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    report = run_recipe(tiny_recipe(), run_dir, data_dir)
    assert report["run_dir"] == str(run_dir)
    return run_dir


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    def _copy() -> Path:
        dst = tmp_path / "run-copy"
        shutil.copytree(tiny_run, dst)
        return dst

    return _copy


def fresh_run(tiny_run: Path, dst: Path, stage: str = "pretrain") -> Path:
    """A run directory with the tiny run's recipe, tokenizer and shards, ready to start `stage` (fine-tuning
    starts from the tiny run's pretrained checkpoint), and nothing trained in it yet."""
    from lmforge.rundir import RunDir
    from lmforge.train.checkpoint import copy_checkpoint

    dst.mkdir(parents=True)
    for name in ("config.toml", "tokenizer.json"):
        shutil.copy2(tiny_run / name, dst / name)
    shutil.copytree(tiny_run / "data", dst / "data")
    if stage == "finetune":
        copy_checkpoint(RunDir(tiny_run).checkpoint("pretrained"), RunDir(dst).checkpoint("pretrained"))
    return dst
