"""Recipe keys for data: phases, filters and sharding options are typed and validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import ConfigError, load_recipe, recipe_from_dict
from lmforge.data.loader import resolve_phases

REPO = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {"data": {"sources": [{"name": "web", "local": "w/*.jsonl"}, {"name": "books", "local": "b/*.jsonl"}]}}


def test_phases_load_and_override():
    data = base()
    data["data"]["phases"] = [
        {"name": "web first", "tokens": 1000, "weights": {"web": 1}},
        {"name": "mix", "weights": {"web": 0.5, "books": 0.5}},
    ]
    recipe = recipe_from_dict(data, {"data.phases.1.weights.books": "0.25", "data.shard_tokens": "4096"})
    assert recipe.data.phases[1].weights == {"web": 0.5, "books": 0.25}
    assert recipe.data.shard_tokens == 4096


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "data.sources\\[1\\].name: required"),
        ("..", "data.sources\\[1\\].name: '..' is not allowed"),
        (".", "data.sources\\[1\\].name: '.' is not allowed"),
        ("/tmp/victim", "data.sources\\[1\\].name: '/tmp/victim' is not allowed"),
        ("a/b", "is not allowed"),
        (".hidden", "is not allowed"),
        ("manifest.json", "is not allowed"),
        ("web", "source names must be unique: 'web' is used more than once"),
        ("WEB", "source names must be unique: 'web'"),
    ],
)
def test_source_names_are_plain_folder_names(name, message):
    data = base()
    data["data"]["sources"][1]["name"] = name
    if not name:
        del data["data"]["sources"][1]["name"]
    with pytest.raises(ConfigError, match=message) as exc:
        recipe_from_dict(data)
    assert "\n" not in str(exc.value)


def test_ordinary_source_names_are_accepted():
    data = base()
    data["data"]["sources"][1]["name"] = "squad-contexts_v1.1"
    assert recipe_from_dict(data).data.sources[1].name == "squad-contexts_v1.1"


@pytest.mark.parametrize(
    "phases, overrides, message",
    [
        ([{"weights": {"nope": 1}}], {}, "data.phases\\[0\\].weights.nope: no such source"),
        ([{"tokens": 0, "weights": {"web": 1}}, {"weights": {"web": 1}}], {}, "only the last phase"),
        ([{"weights": {"web": "a lot"}}], {}, "expected float"),
        ([{"weights": {"web": 0}}], {}, "must not all be 0"),
        ([], {"data.sources.web.min_score": "high"}, "expected float"),
        ([], {"data.sources.web.template": "{0}"}, "template"),
        ([], {"data.workers": "-1"}, "data.workers"),
        (
            [],
            {"data.sources.web.sample_by": "sentence"},
            "data.sources\\[0\\].sample_by: must be one of auto, document",
        ),
        ([], {"data.phases.0.weights.web": "1"}, "no entry"),
    ],
)
def test_bad_data_keys_are_one_line_errors(phases, overrides, message):
    data = base()
    if phases:
        data["data"]["phases"] = phases
    with pytest.raises(ConfigError, match=message) as exc:
        recipe_from_dict(data, overrides)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["seed-67m", "gpt2-124m"])
def test_seed_recipes_declare_the_seed_mixture_in_phases(name):
    recipe = load_recipe(REPO / "recipes" / f"{name}.toml")
    hubs = {s.name: (s.hub, s.hub_config) for s in recipe.data.sources}
    assert hubs["fineweb-edu"] == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    assert hubs["cosmopedia-v2"] == ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2")
    assert hubs["tinystories"][0] == "roneneldan/TinyStories" and hubs["squad-contexts"][0] == "rajpurkar/squad"
    assert all(s.local for s in recipe.data.sources)  # offline stand-ins under --data-dir
    first, mix = resolve_phases(recipe.data)
    assert set(first.weights) == {"fineweb-edu"} and first.tokens > 0
    assert mix.weights == {"fineweb-edu": 50, "cosmopedia-v2": 30, "tinystories": 10, "squad-contexts": 10}
