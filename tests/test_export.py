"""Hugging Face export: transformers loads it offline and computes what lmforge computes."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import LmforgeError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    from lmforge.export import export_hf

    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    export_hf(tiny_run, out)
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _hf(exported):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        exported, local_files_only=True, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    return model, tok


def test_exported_tokenizer_reads_special_strings_as_transformers_users_expect(tmp_path):
    """lmforge encodes "<|question|>" in text as plain text; the exported tokenizer keeps transformers' default
    (prompts written with the special-token strings get their ids), and `split_special_tokens=True` gives
    lmforge's own encoding."""
    from lmforge.export import hf_tokenizer
    from lmforge.tokenizer import train_tokenizer

    ours = train_tokenizer(["Paris is the capital of France. What is the capital?"] * 50, 300, 10_000, min_frequency=1)
    hf_tokenizer(ours, 128).save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Paris is the capital.<|question|>What is the capital?<|answer|>"
    prompt = [
        *ours.encode("Paris is the capital."),
        ours.question_id,
        *ours.encode("What is the capital?"),
        ours.answer_id,
    ]
    assert theirs(text, add_special_tokens=False)["input_ids"] == prompt
    split = theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert split == ours.encode(text) and not set(split) & ours.special_ids
    assert theirs.decode(split, skip_special_tokens=True) == text
    assert ours.encode("<|question|>") != [ours.question_id]  # the export did not change lmforge's tokenizer


def test_export_files_and_model_card(exported, tiny_run):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    ):
        assert (exported / name).is_file(), name
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    card = (exported / "README.md").read_text()
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    assert f"{report['squad']['f1']:.2f}" in card and "squad-contexts" in card and 'name = "tiny"' in card


def test_hf_logits_and_greedy_generation_match_lmforge(exported, tiny_run):
    import lmforge
    from lmforge.generate import SamplingParams, generate, greedy_batch

    ours, our_tok = lmforge.load(tiny_run)
    theirs, their_tok = _hf(exported)
    text = "<|context|>Paris is the capital of France.<|question|>What is the capital of France?<|answer|>"
    ids = their_tok(text, add_special_tokens=False)["input_ids"]
    prompt = [
        our_tok.context_id,
        *our_tok.encode("Paris is the capital of France."),
        our_tok.question_id,
        *our_tok.encode("What is the capital of France?"),
        our_tok.answer_id,
    ]
    assert ids == prompt  # same tokenizer, special tokens included
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff < 1e-4

    expected = generate(ours, ids, SamplingParams(max_new_tokens=12, temperature=0.0))
    out = theirs.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12
    )
    assert out[0, len(ids) :].tolist()[: len(expected)] == expected

    # batched, left-padded: lmforge's evaluation decoding agrees with transformers' generate
    prompts = [ids, our_tok.encode("Once upon a time there was")]
    batch = their_tok(
        [their_tok.decode(p) for p in prompts], add_special_tokens=False, padding=True, return_tensors="pt"
    )
    hf_out = theirs.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None, min_new_tokens=8)
    ours_out = greedy_batch(ours, prompts, 8, stop_id=-1, pad_id=our_tok.pad_id)
    width = batch["input_ids"].shape[1]
    assert [row[width:].tolist() for row in hf_out] == ours_out


def test_import_hf_round_trip(exported, tiny_run, tmp_path):
    import lmforge
    from lmforge.export import import_hf

    run = import_hf(exported, tmp_path / "imported")
    back, _ = lmforge.load(run.root, "pretrained")
    orig, tok = lmforge.load(tiny_run)
    x = torch.tensor([tok.encode("The bear ate the cake because it was hungry.")])
    with torch.no_grad():
        assert torch.equal(back(x), orig(x))
    with pytest.raises(LmforgeError, match="not empty"):
        import_hf(exported, run.root)


def test_imported_run_keeps_the_recipe_and_is_evaluable(exported, tiny_run, data_dir, tmp_path):
    """The export's model card carries the recipe: the imported run answers with the original's settings,
    and `eval` scores it (without token shards, on questions alone, saying so)."""
    from lmforge.config import load_recipe
    from lmforge.export import import_hf
    from lmforge.pipeline import eval_stage

    run = import_hf(exported, tmp_path / "imported")
    recipe, original = load_recipe(run.config), load_recipe(tiny_run / "config.toml")
    assert recipe.eval == original.eval and recipe.qa == original.qa and recipe.data == original.data
    assert recipe.model.n_layer == original.model.n_layer
    report = eval_stage(load_recipe(run.config, {"eval.squad_questions": "4"}), run, data_dir)
    assert report["squad"]["n"] == 4 and "val_loss" not in report
    assert "lmforge prepare --run-dir" in report["text_metrics_skipped"]
    assert "| bits per byte | not measured |" in (run.eval / "report.md").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        ("not json", "not a valid JSON model config"),
        ({"hidden_size": None}, "missing or not a positive integer: hidden_size"),
        ({"vocab_size": 64}, "vocab_size 64 is smaller than its tokenizer's"),
    ],
)
def test_import_refuses_bad_configs_in_one_line(exported, tmp_path, change, message):
    import shutil

    from lmforge.export import import_hf

    src = tmp_path / "src"
    shutil.copytree(exported, src)
    config = json.loads((src / "config.json").read_text())
    if isinstance(change, dict):
        config.update(change)
        (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    else:
        (src / "config.json").write_text(change)
    with pytest.raises(LmforgeError, match=message):
        import_hf(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_refuses_other_architectures(exported, tmp_path):
    import shutil

    from lmforge.export import import_hf

    other = tmp_path / "gqa"
    shutil.copytree(exported, other)
    config = json.loads((other / "config.json").read_text())
    config["num_key_value_heads"] = 1
    config["tie_word_embeddings"] = False
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match=r"grouped-query attention .*; untied"):
        import_hf(other, tmp_path / "run")


def test_export_refuses_to_overwrite_other_folders(tiny_run, tmp_path):
    from lmforge.cli import main

    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert main(["export", str(tiny_run), str(target), "--format", "hf"]) == 2
    assert (target / "notes.txt").read_text() == "keep me"


def test_reexport_replaces_only_the_files_it_writes(exported, tiny_run, tmp_path):
    import shutil

    from lmforge.export import export_hf

    clone = tmp_path / "hub-clone"  # a clone of the Hub repository holding an earlier export
    shutil.copytree(exported, clone)
    (clone / ".git").mkdir()
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (clone / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (clone / "NOTES.md").write_text("keep me")
    (clone / "config.json").write_text("{}")  # stale: the export replaces it
    export_hf(tiny_run, clone)
    assert (clone / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (clone / ".gitattributes").read_text() == "*.safetensors filter=lfs\n"
    assert (clone / "NOTES.md").read_text() == "keep me"
    assert json.loads((clone / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not list(tmp_path.glob(".staging-*"))


def test_export_into_an_existing_empty_folder(tiny_run, tmp_path):
    from lmforge.export import export_hf

    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(tiny_run, empty)
    assert (empty / "model.safetensors").is_file()


def test_model_card_reports_only_the_exported_checkpoints_scores(tiny_run, tmp_path):
    from lmforge.export import export_hf

    out = export_hf(tiny_run, tmp_path / "pretrained-hf", checkpoint="pretrained")
    card = (out / "README.md").read_text()
    assert "Checkpoint `pretrained` was not evaluated" in card
    assert "exact match" not in card and "| SQuAD v1.1 dev F1" not in card


def test_model_card_names_the_decoding_of_its_scores(tiny_run):
    from lmforge.config import load_recipe
    from lmforge.export import model_card
    from lmforge.rundir import RunDir

    run = RunDir(tiny_run)
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    checkpoint = tiny_run / "checkpoints" / "best"
    greedy = model_card(load_recipe(run.config), run, checkpoint, report)
    assert "generated greedily (`do_sample=False`, at most 16 new tokens)" in greedy
    report["squad"]["decoding"] = {"strategy": "span", "description": "extractive", "max_new_tokens": 16}
    span = model_card(load_recipe(run.config), run, checkpoint, report)
    assert "Decoding: span (extractive; max_new_tokens 16)" in span
    assert "greedy generation from this model gives other answers" in span and "do_sample=False" not in span
