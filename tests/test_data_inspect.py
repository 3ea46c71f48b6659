"""`lmforge data inspect RUN` on the tiny run: counts per source, histograms, decoded samples."""

from __future__ import annotations

import json

from lmforge.cli import main


def test_data_inspect_reports_what_the_model_sees(tiny_run, capsys):
    manifest = json.loads((tiny_run / "data" / "manifest.json").read_text())
    assert main(["data", "inspect", str(tiny_run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {s["name"]: s for s in report["sources"]}
    assert set(by_name) == {e["name"] for e in manifest["sources"]}
    for entry in manifest["sources"]:
        got = by_name[entry["name"]]
        assert (got["docs"], got["train_tokens"]) == (entry["docs"], entry["train_tokens"])
        assert sum(got["doc_tokens"].values()) == entry["docs"]  # every document in the length histogram
    assert abs(sum(s["train_share"] for s in report["sources"]) - 1) < 1e-3
    stories = by_name["tinystories"]
    assert stories["samples"] and all(isinstance(t, str) and len(t) > 20 for t in stories["samples"])
    assert stories["top_tokens"][0]["share"] > 0.01
    assert main(["data", "inspect", str(tiny_run)]) == 0
    text = capsys.readouterr().out
    assert "tinystories" in text and "sample: " in text and "most frequent" in text


def test_data_inspect_of_a_non_run_is_one_line(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run directory not found" in err
    assert main(["data", "inspect", str(tmp_path), "--samples", "-1"]) == 2
    assert capsys.readouterr().err == "lmforge: error: --samples must be >= 0 (got -1)\n"


def test_prepare_again_keeps_the_finished_shards(copy_run, data_dir, capsys):
    run = copy_run()
    before = {p: p.stat().st_mtime_ns for p in (run / "data").rglob("*.bin")}
    assert before
    assert main(["prepare", "--run-dir", str(run), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "tinystories: " in out and "duplicates" in out and f"lmforge data inspect {run}" in out
    assert {p: p.stat().st_mtime_ns for p in (run / "data").rglob("*.bin")} == before
