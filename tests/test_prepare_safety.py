"""`lmforge prepare` never destroys a usable run: source names are plain folder names, a failing or changed
preparation leaves the previous shards in place, and shards under trained checkpoints are not swapped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.config import DataConfig, SourceConfig
from lmforge.data import shards as shards_mod
from lmforge.errors import LmforgeError

from .test_data_shards import make_docs, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def recipe(path: Path, sources: str) -> Path:
    """tiny.toml with its [data] section replaced by `sources` (TOML)."""
    tiny = (REPO / "recipes" / "tiny.toml").read_text()
    head, rest = tiny.split("[data]\n", 1)
    path.write_text(
        head
        + "[data]\nval_fraction = 0.1\nshard_tokens = 4096\nworkers = 1\n"
        + sources
        + "\n[qa]\n"
        + rest.split("\n[qa]\n", 1)[1]
    )
    return path


TWO = '[[data.sources]]\nname = "a"\nlocal = "a.jsonl"\n[[data.sources]]\nname = "b"\nlocal = "b.jsonl"\n'


@pytest.fixture
def lm(capsys):
    """Run the CLI as a user would: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


@pytest.fixture
def prepared(tmp_path, lm):
    """A run with a tokenizer and the shards of two sources a and b (data files under tmp_path/ud)."""
    ud = tmp_path / "ud"
    write_jsonl(ud / "a.jsonl", make_docs(300, 1))
    write_jsonl(ud / "b.jsonl", make_docs(100, 2))
    rec = recipe(tmp_path / "r.toml", TWO)
    run = tmp_path / "run"
    assert lm("tokenizer", "train", rec, "--run-dir", run, "--data-dir", ud, "--tokenizer.vocab_size", "400")[0] == 0
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud)
    assert rc == 0, err
    return rec, run, ud


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- finding 1: names are folders


@pytest.mark.parametrize("name", ["..", "VICTIM", ""])
def test_a_source_name_that_is_not_a_plain_folder_name_is_refused_and_nothing_is_deleted(tmp_path, lm, prepared, name):
    rec, run, ud = prepared
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("precious")
    name = str(victim) if name == "VICTIM" else name
    line = f'name = "{name}"\n' if name else ""
    bad = recipe(tmp_path / "bad.toml", TWO + f'[[data.sources]]\n{line}local = "a.jsonl"\n')
    before = snapshot(run)
    rc, out, err = lm("prepare", bad, "--run-dir", run, "--data-dir", ud)
    assert rc == 2 and err.count("\n") == 1 and "data.sources[2].name: " in err
    assert ("required" if not name else "is not allowed") in err
    assert (victim / "important.txt").read_text() == "precious"
    assert snapshot(run) == before


def test_shard_folders_are_only_ever_deleted_inside_the_data_folder(tmp_path, prepared):
    # defence in depth: a name that got past the config validation still cannot delete outside RUN/data
    _, run, ud = prepared
    from lmforge.tokenizer import Tokenizer

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("precious")
    for name in ("..", str(victim)):
        data = DataConfig(sources=[SourceConfig(name=name, local=str(ud / "a.jsonl"))], val_fraction=0.1, workers=1)
        with pytest.raises(LmforgeError, match="refusing to delete|not a folder inside"):
            shards_mod.prepare_shards(data, Tokenizer.load(run / "tokenizer.json"), None, run / "data")
    assert (victim / "important.txt").read_text() == "precious"
    assert (run / "tokenizer.json").is_file() and (run / "config.toml").is_file()


# --------------------------------------------------------------------------- finding 2: a failing prepare


def test_a_failing_prepare_leaves_the_previous_shards_and_manifest_as_they_were(tmp_path, lm, prepared):
    rec, run, ud = prepared
    before = snapshot(run / "data")
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud, "--data.sources.a.local", "a-typo.jsonl")
    assert rc == 2 and err.count("\n") == 1 and "no local files match 'a-typo.jsonl'" in err
    # a changed first source is made aside; the second one fails: nothing of the run's shards is touched
    (ud / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    rc, out, err = lm(
        "prepare",
        rec,
        "--run-dir",
        run,
        "--data-dir",
        ud,
        "--data.sources.a.max_docs",
        "50",
        "--data.sources.b.local",
        "broken.jsonl.gz",
    )
    assert rc == 2 and "broken.jsonl.gz" in err.splitlines()[-1]
    assert {k: v for k, v in snapshot(run / "data").items() if not k.startswith(".staging")} == before
    assert lm("data", "inspect", run)[0] == 0
    # the next successful preparation uses what was made aside, and leaves nothing staged
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud, "--data.sources.a.max_docs", "50")
    assert rc == 0 and "a: 50 docs" in out
    assert not (run / "data" / ".staging").exists()
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert [e["docs"] for e in manifest["sources"]] == [50, 100]


# --------------------------------------------------------------------------- findings 4, 13: the reuse key


def test_a_file_edited_in_place_at_the_same_size_is_prepared_again(lm, prepared):
    rec, run, ud = prepared
    text = (ud / "a.jsonl").read_text()
    edited = text.replace("river", "rover")
    assert edited != text and len(edited) == len(text)
    (ud / "a.jsonl").write_text(edited)
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud)
    assert rc == 0 and "a: already prepared" not in err
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "tokenizer.json")
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    first = manifest["sources"][0]["shards"]["train"][0]
    ids = np.fromfile(run / "data" / first["file"], dtype=np.uint16)
    assert "rover" in tok.decode(ids[:2000].tolist()) and "river" not in tok.decode(ids[:2000].tolist())


def test_the_reuse_key_names_files_under_the_data_dir_and_chains_sources_only_for_dedup(
    tmp_path, lm, prepared, monkeypatch
):
    rec, run, ud = prepared
    monkeypatch.chdir(tmp_path)
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", "ud")  # relative: the same files
    assert rc == 0 and "a: already prepared" in err and "b: already prepared" in err
    moved = tmp_path / "moved"
    ud.rename(moved)  # a data folder moved elsewhere keeps its files' sizes and times
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", moved)
    assert rc == 0 and "a: already prepared" in err and "b: already prepared" in err
    # with data.dedup = false, a change to the first source does not make the second one again
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", moved, "--data.dedup", "false")
    assert rc == 0 and "a: already prepared" not in err and "b: already prepared" not in err  # dedup: other shards
    rc, out, err = lm(
        "prepare",
        rec,
        "--run-dir",
        run,
        "--data-dir",
        moved,
        "--data.dedup",
        "false",
        "--data.sources.a.max_docs",
        "50",
    )
    assert rc == 0 and "a: already prepared" not in err and "b: already prepared" in err


# --------------------------------------------------------------------------- finding 2: shards under checkpoints

PRETRAIN = (
    "--pretrain.max_steps",
    "2",
    "--pretrain.batch_size",
    "2",
    "--pretrain.eval_interval",
    "1",
    "--pretrain.eval_batches",
    "1",
    "--pretrain.checkpoint_interval",
    "1",
    "--pretrain.warmup_steps",
    "0",
)


def test_prepare_refuses_to_change_the_shards_checkpoints_were_trained_on(lm, prepared):
    rec, run, ud = prepared
    rc, out, err = lm("pretrain", "--run-dir", run, *PRETRAIN)
    assert rc == 0, err
    assert lm("prepare", rec, "--run-dir", run, "--data-dir", ud)[0] == 0  # nothing changes: fine
    before = snapshot(run / "data")
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud, "--data.sources.a.max_docs", "50")
    assert rc == 2 and err.count("\n") == 1
    assert "has checkpoints" in err and "would change the shards of a, b" in err and "--force" in err
    assert snapshot(run / "data") == before
    # a mistyped path says so, not that the shards would change
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud, "--data.sources.b.local", "typo.jsonl")
    assert rc == 2 and "no local files match 'typo.jsonl'" in err and "would change" not in err
    assert snapshot(run / "data") == before
    # --force replaces them; pretraining then refuses to resume checkpoints trained on other shards
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud, "--data.sources.a.max_docs", "50", "--force")
    assert rc == 0 and "a: 50 docs" in out
    rc, out, err = lm("pretrain", "--run-dir", run, "--resume", *PRETRAIN[:1], "3", *PRETRAIN[2:])
    assert rc == 2 and err.count("\n") == 1 and "cannot resume pretraining" in err and "other token shards" in err


def test_pretrain_resumes_on_the_same_shards_after_a_prepare_that_changed_nothing(lm, prepared):
    rec, run, ud = prepared
    assert lm("pretrain", "--run-dir", run, *PRETRAIN)[0] == 0
    assert lm("prepare", rec, "--run-dir", run, "--data-dir", ud)[0] == 0
    rc, out, err = lm("pretrain", "--run-dir", run, "--resume", *PRETRAIN[:1], "3", *PRETRAIN[2:])
    assert rc == 0, err


# --------------------------------------------------------------------------- finding 18


def test_prepare_without_a_tokenizer_says_to_train_one_and_makes_nothing(tmp_path, lm):
    ud = tmp_path / "ud"
    write_jsonl(ud / "a.jsonl", make_docs(30, 1))
    write_jsonl(ud / "b.jsonl", make_docs(30, 2))
    run = tmp_path / "run"
    rc, out, err = lm("prepare", recipe(tmp_path / "r.toml", TWO), "--run-dir", run, "--data-dir", ud)
    assert rc == 2 and err.count("\n") == 1 and "run `lmforge tokenizer train" in err
    assert not run.exists()


# --------------------------------------------------------------------------- finding 14


def test_a_relative_local_is_looked_up_under_the_data_dir_only(tmp_path, lm, prepared, monkeypatch):
    rec, run, ud = prepared
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "cwdonly.jsonl", make_docs(50, 5))  # in the current directory, not in the data dir
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud, "--data.sources.b.local", "cwdonly.jsonl")
    assert rc == 2
    assert (
        err.splitlines()[-1] == f"lmforge: error: source 'b': no local files match 'cwdonly.jsonl' under data dir {ud}"
    )
    # without a data dir, a relative glob is relative to the current directory; an absolute one is used as given
    from lmforge.config import SourceConfig
    from lmforge.data.sources import local_files

    assert local_files(SourceConfig(name="b", local="cwdonly.jsonl"), None) == [Path("cwdonly.jsonl")]
    absolute = SourceConfig(name="b", local=str(tmp_path / "cwdonly.jsonl"))
    assert local_files(absolute, ud) == [tmp_path / "cwdonly.jsonl"]


# --------------------------------------------------------------------------- findings 10, 17: data inspect


def test_data_inspect_shows_the_sampled_mixture_from_the_recipes_current_weights(tmp_path, lm, prepared):
    rec, run, ud = prepared
    rc, out, err = lm("prepare", rec, "--run-dir", run, "--data-dir", ud, "--data.sources.a.weight", "3")
    assert rc == 0 and "a: already prepared" in err  # a weight is not a shard property: nothing is made again
    rc, out, err = lm("data", "inspect", run, "--json")
    report = json.loads(out)
    assert [(s["name"], s["weight"]) for s in report["sources"]] == [("a", 3.0), ("b", 1.0)]
    assert report["mixture"] == [{"phase": "mixture", "tokens": 0, "shares": {"a": 0.75, "b": 0.25}}]
    assert sum(s["train_share"] for s in report["sources"]) == pytest.approx(1, abs=1e-3)
    text = lm("data", "inspect", run)[1]
    assert "tok share" in text and "of the train tokens in the shards" in text
    assert "phase 1 'mixture' (until the end): a 75.0%, b 25.0%" in text
    phased = recipe(
        tmp_path / "phased.toml",
        TWO + '[[data.phases]]\nname = "a first"\ntokens = 4096\n'
        'weights = { a = 1 }\n[[data.phases]]\nname = "mix"\nweights = { a = 1, b = 3 }\n',
    )
    assert lm("prepare", phased, "--run-dir", run, "--data-dir", ud)[0] == 0
    text = lm("data", "inspect", run)[1]
    assert (
        "phase 1 'a first' (4,096 tokens): a 100.0%" in text
        and "phase 2 'mix' (until the end): a 25.0%, b 75.0%" in text
    )


def test_data_inspect_reports_shards_deleted_once_consumed(lm, prepared):
    rec, run, ud = prepared
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    first = manifest["sources"][0]["shards"]["train"][0]
    (run / "data" / first["file"]).unlink()  # as data.delete_consumed does (SourceStream.delete_before)
    (run / "data" / first["index"]).unlink()
    rc, out, err = lm("data", "inspect", run, "--json")
    assert rc == 0, err
    a = json.loads(out)["sources"][0]
    assert a["deleted_shards"] == {"train": 1, "val": 0} and a["docs"] == manifest["sources"][0]["docs"]
    assert sum(a["doc_tokens"].values()) == a["docs"] - first["docs"]
    rc, out, err = lm("data", "inspect", run)
    assert rc == 0 and "1 deleted once consumed (data.delete_consumed)" in out
