"""Attention probes: does a pronoun attend to the word it refers to?

The seed project checked coreference by eye on heatmaps ("her" -> "Sarah"; it failed on "The ball
rolled. It stopped."). `run_probes` makes that a measurement: for each probe sentence, word-level
attention (lmforge.attention: mean over heads, per layer and mean over layers), the word each pronoun
attends to most and whether it is the referent, both raw and with the first token (the attention sink)
discounted, plus the single layer/head that attends most to the referent. Written as a table
(JSON + Markdown) and heatmap PNGs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.attention import WordAttention, most_attended, word_attention
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write, atomic_write_json, atomic_write_text
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge")


@dataclass(frozen=True)
class Probe:
    text: str
    pronoun: str  # the first word equal to this (case-sensitive) is probed
    referent: str  # the word the pronoun refers to


PROBES = (
    Probe("Sarah said she would bring the map.", "she", "Sarah"),
    Probe("John lost his keys in the garden.", "his", "John"),
    Probe("The ball rolled. It stopped.", "It", "ball"),
    Probe("The bear ate the cake because it was hungry.", "it", "bear"),
    Probe("Mary thanked Tom because he had helped her.", "he", "Tom"),
    Probe("The dog chased the cat until it climbed a tree.", "it", "cat"),
)

VARIANTS = {"raw": False, "first_token_discounted": True}


def parse_probe(spec: str) -> Probe:
    """'TEXT|PRONOUN|REFERENT' -> Probe (the command line form)."""
    parts = spec.split("|")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise LmforgeError(f"probe {spec!r}: expected 'SENTENCE|PRONOUN|REFERENT'")
    return Probe(*(p.strip() for p in parts))


def _word_index(words: list[str], word: str, probe: Probe, before: int | None = None) -> int:
    matches = [i for i, w in enumerate(words) if w == word and (before is None or i < before)]
    if not matches:
        raise LmforgeError(
            f"probe {probe.text!r}: word {word!r} not found"
            f"{' before the pronoun' if before is not None else ''} (words: {words})"
        )
    return matches[0] if before is None else matches[-1]


def _best_head(wa: WordAttention, p: int, r: int) -> dict:
    """The single (layer, head) giving the referent the largest share of the pronoun's attention."""
    to_ref = wa.per_head[:, :, p, r]  # (layers, heads)
    flat = int(to_ref.argmax())
    layer, head = divmod(flat, to_ref.shape[1])
    top = most_attended(wa.per_head[layer, head])[p]
    return {"layer": layer, "head": head, "weight": round(float(to_ref[layer, head]), 4), "top_is_referent": top == r}


def probe_one(model: GPT, tokenizer: Tokenizer, probe: Probe, discount_first: bool) -> tuple[dict, WordAttention]:
    wa = word_attention(model, tokenizer, probe.text, discount_first=discount_first)
    words = [w.text for w in wa.words]
    p = _word_index(words, probe.pronoun, probe)
    r = _word_index(words, probe.referent, probe, before=p)
    overall = most_attended(wa.mean.mean(0))[p]
    per_layer = [top[p] for top in wa.top]
    result = {
        "most_attended": words[overall] if overall is not None else None,
        "correct": overall == r,
        "referent_weight": round(float(wa.mean.mean(0)[p, r]), 4),
        "per_layer": [words[i] if i is not None else None for i in per_layer],
        "layers_correct": sum(i == r for i in per_layer),
        # the first word holds the attention sink: raw attention to it says little about coreference
        "referent_is_first_word": r == 0,
        "best_head": _best_head(wa, p, r),
    }
    return result, wa


def plot_heatmaps(wa: WordAttention, probe: Probe, title: str, path: Path) -> None:
    """One PNG: the head-mean word attention of every layer and the mean over layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    words = [w.text for w in wa.words]
    maps = [*wa.mean, wa.mean.mean(0)]
    names = [f"layer {i}" for i in range(len(wa.mean))] + ["mean over layers"]
    n = len(maps)
    size = 0.35 * len(words) + 1.5
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.6), squeeze=False)
    for ax, m, name in zip(axes[0], maps, names, strict=True):
        ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=max(float(m.max()), 1e-6))
        ax.set_xticks(range(len(words)), words, rotation=90, fontsize=8)
        ax.set_yticks(range(len(words)), words, fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{title}: {probe.text}  ({probe.pronoun} -> {probe.referent})", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=80))
    plt.close(fig)


def run_probes(
    model: GPT,
    tokenizer: Tokenizer,
    out_dir: Path,
    probes: tuple[Probe, ...] | list[Probe] = PROBES,
    plots: bool = True,
) -> dict:
    """Probe every sentence in both variants; write report.json, report.md and heatmaps into out_dir."""
    results = []
    for i, probe in enumerate(probes):
        row = {**asdict(probe)}
        for variant, discount in VARIANTS.items():
            result, wa = probe_one(model, tokenizer, probe, discount)
            row[variant] = result
            if plots:
                png = out_dir / f"probe{i}-{variant}.png"
                plot_heatmaps(wa, probe, variant.replace("_", " "), png)
                result["heatmap"] = png.name
        results.append(row)
    summary = {v: sum(r[v]["correct"] for r in results) for v in VARIANTS}
    report = {
        "n_probes": len(results),
        "correct": summary,
        "n_layers": model.cfg.n_layer,
        "n_heads": model.cfg.n_head,
        "probes": results,
    }
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", probe_markdown(report))
    _remove_stale_heatmaps(out_dir, {r[v].get("heatmap") for r in results for v in VARIANTS})
    return report


def _remove_stale_heatmaps(out_dir: Path, written: set[str | None]) -> None:
    """Heatmaps an earlier probe set left in out_dir (named as this module names them) would read as part of
    this report: they go."""
    ours = re.compile(rf"probe\d+-({'|'.join(map(re.escape, VARIANTS))})\.png")
    for path in out_dir.glob("probe*.png"):
        if ours.fullmatch(path.name) and path.name not in written:
            path.unlink()


def probe_markdown(report: dict) -> str:
    lines = [
        "# Attention probes (coreference)",
        "",
        "Word-level attention, mean over heads and over layers; 'most attended' is the earlier word the pronoun "
        "attends to most (itself excluded). 'best head' is the single layer/head giving the referent the largest "
        "share (first token discounted). * marks a referent that is the first word, where the raw attention "
        "sink makes 'correct' cheap: read the discounted column.",
        "",
        f"Correct: {report['correct']['raw']}/{report['n_probes']} raw, "
        f"{report['correct']['first_token_discounted']}/{report['n_probes']} with the first token discounted.",
        "",
        "| sentence | pronoun -> referent | most attended (raw) | most attended (first token discounted) "
        "| layers right (discounted) | best layer/head (weight) |",
        "|---|---|---|---|---|---|",
    ]

    def mark(res: dict) -> str:
        return f"{res['most_attended']} {'✓' if res['correct'] else '✗'}"

    for r in report["probes"]:
        d = r["first_token_discounted"]
        b = d["best_head"]
        star = "*" if d["referent_is_first_word"] else ""
        lines.append(
            f"| {r['text']} | {r['pronoun']} -> {r['referent']}{star} | {mark(r['raw'])} | {mark(d)} "
            f"| {d['layers_correct']}/{report['n_layers']} | L{b['layer']} H{b['head']} ({b['weight']:.2f}"
            f"{', top' if b['top_is_referent'] else ''}) |"
        )
    return "\n".join(lines) + "\n"


def probe_run(
    run_dir: str | Path, checkpoint: str = "best", out: str | Path | None = None, probes: list[Probe] | None = None
) -> tuple[dict, Path]:
    """Probe a run's model; results go to RUN/probe/ unless `out` is given."""
    from lmforge.pipeline import load

    model, tok = load(run_dir, checkpoint)
    out_dir = Path(out) if out else Path(run_dir) / "probe"
    try:
        report = run_probes(model, tok, out_dir, tuple(probes) if probes else PROBES)
    except ValueError as exc:  # word_attention: text too long for the block
        raise LmforgeError(f"probe: {exc}") from None
    log.info("probes: %s -> %s", report["correct"], out_dir)
    return report, out_dir
