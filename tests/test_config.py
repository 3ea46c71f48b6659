import re
import subprocess
import sys

import pytest

from lmforge.config import Recipe, load_recipe, recipe_from_dict, save_recipe
from lmforge.errors import ConfigError

from .conftest import REPO, TINY


def test_recipes_in_repo_all_load():
    for path in sorted((REPO / "recipes").glob("*.toml")):
        recipe = load_recipe(path)
        assert recipe.name == path.stem


def test_seed_recipe_matches_the_seed_hyperparameters():
    r = load_recipe(REPO / "recipes" / "seed-67m.toml")
    assert (r.model.n_layer, r.model.n_head, r.model.n_embd, r.model.block_size) == (8, 12, 768, 512)
    assert r.tokenizer.vocab_size == 12856
    assert (r.pretrain.batch_size, r.pretrain.lr, r.pretrain.eval_interval, r.pretrain.eval_batches) == (
        64,
        3e-4,
        5,
        100,
    )
    assert r.pretrain.patience == 40 and r.model.dropout == 0.1
    assert r.finetune.lr < r.pretrain.lr and r.finetune.dropout < r.model.dropout
    assert r.finetune.epochs == 8 and r.finetune.patience == 2


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"n_layers": 2}}, "unknown key 'model.n_layers'"),
        ({"model": {"n_layer": "two"}}, "model.n_layer: expected int"),
        ({"model": {"n_layer": True}}, "model.n_layer: expected int, got a boolean"),
        ({"model": {"n_embd": 65, "n_head": 2}}, "model.n_embd: 65 is not divisible by model.n_head=2"),
        ({"model": {"block_size": 0}}, "model.block_size: must be > 0"),
        ({"pretrain": {"lr": -1.0}}, "pretrain.lr: must be > 0"),
        ({"data": {"sources": [{"name": "x"}]}}, "data.sources[0]: names neither a local glob"),
        ({"data": {"sources": [{"name": "x", "local": "a", "colour": 1}]}}, "unknown key 'data.sources[0].colour'"),
        ({"qa": {"mode": "open"}}, "qa.mode: must be 'context' or 'closed_book'"),
        ({"qa": {"group_by_length": -1}}, "qa.group_by_length: must be >= 0"),
        ({"eval": {"dtype": "float16"}}, "eval.dtype: must be 'auto', 'float32' or 'bfloat16'"),
        ({"finetune": {"dtype": "fp16"}}, "finetune.dtype: must be 'auto', 'float32' or 'bfloat16'"),
        ({"model": 3}, "model: expected a table"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_int_is_accepted_for_float_fields():
    assert recipe_from_dict({"pretrain": {"lr": 1}}).pretrain.lr == 1.0


def test_overrides_are_typed_and_validated():
    r = load_recipe(
        TINY,
        {
            "model.n_layer": "3",
            "pretrain.lr": "1e-3",
            "qa.mode": "closed_book",
            "data.sources.tinystories.weight": "2.5",
            "data.sources.0.max_docs": "7",
        },
    )
    assert r.model.n_layer == 3 and r.pretrain.lr == 1e-3 and r.qa.mode == "closed_book"
    assert [s.weight for s in r.data.sources if s.name == "tinystories"] == [2.5]
    assert r.data.sources[0].max_docs == 7
    with pytest.raises(ConfigError, match="override --model.n_layer: model.n_layer: expected int"):
        load_recipe(TINY, {"model.n_layer": "x"})
    with pytest.raises(ConfigError, match="unknown key 'model.width'"):
        load_recipe(TINY, {"model.width": "3"})
    with pytest.raises(ConfigError, match="no entry with index or name 'nope'"):
        load_recipe(TINY, {"data.sources.nope.weight": "1"})
    with pytest.raises(ConfigError, match="model.n_embd: 64 is not divisible by model.n_head=3"):
        load_recipe(TINY, {"model.n_head": "3"})
    # an out-of-range value from the command line is blamed on the override, not on the recipe file
    with pytest.raises(ConfigError, match=r"^override --pretrain.lr=-1: pretrain.lr: must be > 0$"):
        load_recipe(TINY, {"pretrain.lr": "-1"})
    with pytest.raises(ConfigError, match=r"^override --pretrain.lr=inf: pretrain.lr: must be a finite number"):
        load_recipe(TINY, {"pretrain.lr": "inf"})
    with pytest.raises(ConfigError, match=r"^override --finetune.grad_clip=nan: finetune.grad_clip: must be a finite"):
        load_recipe(TINY, {"finetune.grad_clip": "nan"})
    # list entries named on the command line, and a wrong type, are blamed on the override too
    with pytest.raises(ConfigError, match=r"^override --data.sources.tinystories.weight=0: data.sources\[1\].weight"):
        load_recipe(TINY, {"data.sources.tinystories.weight": "0"})
    with pytest.raises(ConfigError, match=r"^override --data.sources=3: data.sources: expected a list, got int 3$"):
        load_recipe(TINY, {"data.sources": "3"})
    with pytest.raises(ConfigError, match=r"^override --data.sources.2.weight=-2: data.sources\[2\].weight"):
        load_recipe(TINY, {"data.sources.2.weight": "-2", "data.sources.tinystories.max_docs": "3"})
    with pytest.raises(ConfigError, match=r"^my.toml: pretrain.lr: must be > 0$"):  # other keys overridden
        recipe_from_dict({"pretrain": {"lr": -1}}, {"pretrain.max_steps": "5"}, origin="my.toml")


def test_resolved_config_round_trips(tmp_path):
    r = load_recipe(TINY, {"model.n_layer": "3"})
    save_recipe(r, tmp_path / "config.toml")
    again = load_recipe(tmp_path / "config.toml")
    assert again == r
    assert isinstance(again, Recipe)


def test_invalid_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 2\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_recipe(bad)


def test_cli_reports_config_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.cli",
            "run",
            str(TINY),
            "--run-dir",
            str(tmp_path / "r"),
            "--model.n_head",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: ")
    assert "model.n_embd: 64 is not divisible by model.n_head=3" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_override_values_are_never_taken_for_the_recipe(capsys):
    from lmforge.cli import main, split_overrides

    assert split_overrides(["eval", "--run-dir", "r", "--eval.squad_questions", "16", "--qa.mode=closed_book"]) == (
        ["eval", "--run-dir", "r"],
        {"eval.squad_questions": "16", "qa.mode": "closed_book"},
    )
    assert main(["pretrain", "--run-dir", "/nonexistent/run", "--pretrain.max_steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "give a RECIPE, or a --run-dir" in err and "recipe not found: 5" not in err
    assert main(["pretrain", "--pretrain.max_steps"]) == 2
    assert "override --pretrain.max_steps needs a value" in capsys.readouterr().err


def test_extends_starts_from_another_recipe(tmp_path):
    from lmforge.config import recipe_to_dict

    closed = load_recipe(REPO / "recipes" / "cpu-small-closed-book.toml")
    base = load_recipe(REPO / "recipes" / "cpu-small.toml")
    assert closed.qa.mode == "closed_book" and base.qa.mode == "context"
    differ = {k for k, v in recipe_to_dict(closed).items() if recipe_to_dict(base)[k] != v}
    assert differ == {"name", "qa", "eval"}
    assert recipe_to_dict(closed)["qa"] | {"mode": "context"} == recipe_to_dict(base)["qa"]
    assert recipe_to_dict(closed)["eval"] | {"decoding": "span"} == recipe_to_dict(base)["eval"]

    (tmp_path / "a.toml").write_text(
        'name = "a"\n[model]\nn_layer = 3\nn_head = 2\n[[data.sources]]\nname = "x"\nlocal = "x.txt"\n'
    )
    (tmp_path / "b.toml").write_text(
        'extends = "a.toml"\n[model]\nn_head = 4\n[[data.sources]]\nname = "y"\nlocal = "y.txt"\n'
    )
    b = load_recipe(tmp_path / "b.toml")
    assert (b.name, b.model.n_layer, b.model.n_head) == ("a", 3, 4)  # tables merge key by key
    assert [s.name for s in b.data.sources] == ["y"]  # lists are replaced

    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="extends must be a recipe file name"):
        load_recipe(tmp_path / "c.toml")


def test_log_lines_during_a_progress_bar_get_their_own_line(capsys):
    """A warning while `prepare` or training draws a bar is written through tqdm, which clears the bar first:
    the line starts with [lmforge] instead of following the bar's text."""
    import logging

    from tqdm import tqdm

    from lmforge.cli import _setup_logging

    _setup_logging(False)
    for _ in tqdm(range(2), desc="shard s", file=sys.stderr):
        logging.getLogger("lmforge").warning("bad record skipped")
    segments = re.split(r"[\r\n]", capsys.readouterr().err)
    warned = [s for s in segments if "bad record skipped" in s]
    assert warned == ["[lmforge] bad record skipped"] * 2, segments
