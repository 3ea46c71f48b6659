"""Coreference attention probes: the measurement logic on crafted attention, and the real run end to end."""

from __future__ import annotations

import json

import torch

from lmforge.attention import WordAttention, tokenize_words
from lmforge.probe import PROBES, Probe, parse_probe, probe_one, run_probes


def test_probe_logic_on_crafted_attention(tiny_run, monkeypatch):
    import lmforge
    import lmforge.probe as probe_mod

    model, tok = lmforge.load(tiny_run)
    probe = Probe("The bear ate the cake because it was hungry.", "it", "bear")
    _, words = tokenize_words(tok, probe.text)
    texts = [w.text for w in words]
    p, bear, cake = texts.index("it"), texts.index("bear"), texts.index("cake")
    n, layers, heads = len(words), 3, 2
    per_head = torch.zeros(layers, heads, n, n)
    for i in range(n):
        per_head[:, :, i, 0] = 1.0  # everything on the first word ...
    per_head[:, :, p] = 0.0
    per_head[0, :, p, cake] = 1.0  # ... layer 0: "it" -> cake (wrong)
    per_head[1, 0, p, bear] = 0.9  # layer 1 head 0: "it" -> bear (the best single head)
    per_head[1, 0, p, cake] = 0.1
    per_head[1, 1, p, cake] = 1.0
    per_head[2, :, p, bear] = 0.6
    per_head[2, :, p, cake] = 0.4
    mean = per_head.mean(1)
    from lmforge.attention import most_attended

    crafted = WordAttention(words, per_head, mean, [most_attended(m) for m in mean])
    monkeypatch.setattr(probe_mod, "word_attention", lambda *a, **k: crafted)
    result, _ = probe_one(model, tok, probe, discount_first=True)
    # over layers: bear = (0.45 + 0.6) / 3 = 0.35, cake = (1 + 0.55 + 0.4) / 3 = 0.65
    assert result["most_attended"] == "cake" and result["correct"] is False
    assert result["per_layer"] == ["cake", "cake", "bear"] and result["layers_correct"] == 1
    assert result["best_head"] == {"layer": 1, "head": 0, "weight": 0.9, "top_is_referent": True}
    assert abs(result["referent_weight"] - 0.35) < 1e-6


def test_probe_run_writes_table_and_heatmaps(tiny_run, tmp_path):
    from lmforge.cli import main

    out = tmp_path / "probe"
    assert main(["probe", str(tiny_run), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_probes"] == len(PROBES)
    for i, row in enumerate(report["probes"]):
        for variant in ("raw", "first_token_discounted"):
            res = row[variant]
            assert res["most_attended"] in row["text"]
            assert len(res["per_layer"]) == report["n_layers"]
            png = out / res["heatmap"]
            assert png.name == f"probe{i}-{variant}.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report.md").read_text()
    assert table.count("\n| ") == len(PROBES) + 1  # header + one row per probe
    assert "It -> ball" in table


def test_custom_probes_and_bad_specs(tiny_run, tmp_path):
    from lmforge.cli import main

    assert parse_probe("A cat sat. It slept.|It|cat") == Probe("A cat sat. It slept.", "It", "cat")
    out = tmp_path / "p"
    assert main(["probe", str(tiny_run), "--out", str(out)]) == 0  # the built-in set: six heatmap pairs
    (out / "probe-notes.png").write_bytes(b"the user's own file")
    assert main(["probe", str(tiny_run), "--out", str(out), "--probe", "A cat sat. It slept.|It|cat"]) == 0
    assert json.loads((out / "report.json").read_text())["n_probes"] == 1
    # the earlier set's heatmaps are gone, so the folder shows this report's only; other files stay
    assert sorted(p.name for p in out.glob("*.png")) == [
        "probe-notes.png",
        "probe0-first_token_discounted.png",
        "probe0-raw.png",
    ]
    assert main(["probe", str(tiny_run), "--probe", "no separators"]) == 2
    assert main(["probe", str(tiny_run), "--out", str(out), "--probe", "A cat sat.|It|cat"]) == 2  # no pronoun


def test_run_probes_without_plots(tiny_run, tmp_path):
    import lmforge

    model, tok = lmforge.load(tiny_run)
    report = run_probes(model, tok, tmp_path, [Probe("John lost his keys.", "his", "John")], plots=False)
    assert report["probes"][0]["raw"]["referent_is_first_word"] is True
    assert not list(tmp_path.glob("*.png"))
