"""`lmforge prepare` never destroys a usable run: source names are plain folder names, a failing or changed
preparation leaves the previous shards in place, and shards under trained checkpoints are not swapped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import DataConfig, SourceConfig
from lmforge.data import shards as shards_mod
from lmforge.errors import LmforgeError

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the river runs past old mill where children play and birds sing in tall green trees while "
         "a quiet farmer counts his sheep under bright morning light").split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def recipe(path: Path, sources: str) -> Path:
    """tiny.toml with its [data] section replaced by `sources` (TOML)."""
    tiny = (REPO / "recipes" / "tiny.toml").read_text()
    head, rest = tiny.split("[data]\n", 1)
    path.write_text(head + "[data]\nval_fraction = 0.1\nshard_tokens = 4096\nworkers = 1\n" + sources + "\n[qa]\n"
                    + rest.split("\n[qa]\n", 1)[1])
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
def test_a_source_name_that_is_not_a_plain_folder_name_is_refused_and_nothing_is_deleted(tmp_path, lm, prepared,
                                                                                         name):
    rec, run, ud = prepared
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("precious")
    name = str(victim) if name == "VICTIM" else name
    line = f'name = "{name}"\n' if name else ""
    bad = recipe(tmp_path / "bad.toml", TWO + f"[[data.sources]]\n{line}local = \"a.jsonl\"\n")
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
