"""Training-step throughput: lmforge vs a Hugging Face LlamaForCausalLM of identical dimensions.

Both models get the same batch, block, thread count, loss (next-token cross-entropy in fp32), optimizer
(torch AdamW, fused where available) and precision; their steps are interleaved round by round so that
load from other processes on a shared machine hits both alike, and each ratio is the median over rounds
of the ratio within a round (tokens/s columns are medians of step times).
Precisions: fp32, bf16 autocast, and lmforge's default (`dtype = "auto"`: bf16 where the CPU/GPU has
native bf16) against HF in fp32. MFU is lmforge's default-precision throughput against this machine's
matmul peak, measured in the same run in the same dtype (lmforge.train.precision).

This process sets malloc up as `lmforge pretrain` does (precision.keep_freed_memory), so every model in it,
the HF ones included, runs with that setting. One more HF fp32 model trains in a second, plain Python
process with the C library's default malloc, as a script of its own would run it; its steps take turns
with the others (one process runs at a time). "default/hf-fp32" compares lmforge as it trains by default
with that plain process; "same process" compares it with the HF fp32 model beside it.

    python bench/train.py                 # tiny, cpu-small, seed-67m (a few minutes on 2 cores)
    python bench/train.py --rounds 5      # more timed steps per variant: steadier figures
    python bench/train.py --compile       # also both models under torch.compile (train.compile = true)

Ends with the contract line:
    train: cpu-small lmforge/hf tokens/s X.XX, default/hf-fp32 X.XX, seed-67m X.XX, mfu X%
("lmforge/hf" at lmforge's default precision, same process; "seed-67m" likewise; "default/hf-fp32" against
the plain process; mfu is seed-67m's).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.config import TrainConfig, load_recipe  # noqa: E402
from lmforge.model import GPT, GPTConfig, lm_loss  # noqa: E402
from lmforge.train.optim import make_optimizer  # noqa: E402
from lmforge.train.precision import (  # noqa: E402
    autocast,
    flops_per_token,
    keep_freed_memory,
    measured_matmul_peak,
    resolve_dtype,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CPU = torch.device("cpu")
# (recipe, batch size): seed-67m uses a small batch to keep the whole bench to a few minutes on 2 cores
SHAPES = (("tiny", 16), ("cpu-small", 8), ("seed-67m", 2))


def gpt_config(recipe_name: str) -> GPTConfig:
    r = load_recipe(RECIPES / f"{recipe_name}.toml")
    m = r.model
    return GPTConfig(
        vocab_size=m.vocab_size or r.tokenizer.vocab_size,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        block_size=m.block_size,
        dropout=0.0,
        mlp_hidden=m.mlp_hidden,
        rope_theta=m.rope_theta,
        norm_eps=m.norm_eps,
    )


def hf_llama(cfg: GPTConfig) -> torch.nn.Module:
    """A transformers LlamaForCausalLM of identical dimensions (its own random weights)."""
    from transformers import LlamaForCausalLM

    from lmforge.export import llama_config

    return LlamaForCausalLM(llama_config(cfg))


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    optimizer: object
    dtype: torch.dtype
    hf: bool
    times: list[float]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        with autocast(CPU, self.dtype):
            logits = self.model(input_ids=x).logits if self.hf else self.model(x)
        lm_loss(logits, y).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def make_variant(name: str, cfg: GPTConfig, hf: bool, dtype: torch.dtype, compiled: bool = False) -> Variant:
    torch.manual_seed(0)
    model = hf_llama(cfg) if hf else GPT(cfg)
    model.train()
    if compiled:  # what train.compile = true does; the first (untimed) round pays the compilation
        model = torch.compile(model)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), CPU)  # same AdamW groups and kernel for both
    return Variant(name, model, optimizer, dtype, hf, [])


PLAIN_HF = "hf fp32, plain process"


def plain_process_worker(conn, recipe: str, threads: int) -> None:
    """Trains the HF fp32 model in a fresh interpreter (spawned: nothing of the parent's malloc setting),
    one step per (x, y) received, and sends back each step's time; None ends it."""
    torch.set_num_threads(threads)
    variant = make_variant(PLAIN_HF, gpt_config(recipe), True, torch.float32)
    conn.send("ready")
    while (batch := conn.recv()) is not None:
        conn.send(variant.step(*batch))


class PlainProcessVariant:
    """The HF fp32 model of plain_process_worker, timed like an in-process Variant."""

    def __init__(self, recipe: str):
        self.name, self.times = PLAIN_HF, []
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=plain_process_worker, args=(child_conn, recipe, torch.get_num_threads()), daemon=True
        )
        self.process.start()
        assert self.conn.recv() == "ready"

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.conn.send((x, y))  # this process waits while the other one steps: they never run at once
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def bench_shape(recipe: str, batch: int, rounds: int, compiled: bool = False) -> dict[str, float]:
    cfg = gpt_config(recipe)
    f32, bf16 = torch.float32, torch.bfloat16
    plain = PlainProcessVariant(recipe)
    variants = [
        make_variant("lmforge fp32", cfg, False, f32),
        make_variant("hf fp32", cfg, True, f32),
        make_variant("lmforge bf16", cfg, False, bf16),
        make_variant("hf bf16", cfg, True, bf16),
        plain,
    ]
    if compiled:
        variants += [
            make_variant("lmforge bf16 compiled", cfg, False, bf16, compiled=True),
            make_variant("hf bf16 compiled", cfg, True, bf16, compiled=True),
        ]
    g = torch.Generator().manual_seed(0)
    tokens = batch * cfg.block_size
    default = resolve_dtype("auto", CPU)
    peak = 0.0
    for r in range(rounds + 1):  # round 0 warms up allocators and kernels
        # the peak is re-measured every round, beside the steps, and the best kept: a shared machine's
        # load changes by the minute, and a peak from another moment would skew MFU either way
        peak = max(peak, measured_matmul_peak.__wrapped__(default, n=2048))
        ids = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=g)
        x, y = ids[:, :-1], ids[:, 1:]
        for v in variants if r % 2 == 0 else reversed(variants):  # alternate order: neither always goes first
            t = v.step(x, y)
            if r > 0:
                v.times.append(t)
    plain.close()
    tok_s = {v.name: tokens / statistics.median(v.times) for v in variants}
    times = {v.name: v.times for v in variants}

    def ratio(ours: str, theirs: str) -> float:
        """Median over rounds of the per-round speed ratio: steps of one round ran back to back, under
        the same load, so pairing them cancels most of a shared machine's drift."""
        return statistics.median(b / a for a, b in zip(times[ours], times[theirs], strict=True))

    n_params = variants[0].model.num_parameters()
    fpt = flops_per_token(cfg, n_params)
    default_name = "bf16" if default == bf16 else "fp32"
    out = {
        "params_M": n_params / 1e6,
        "tokens": tokens,
        "lm_fp32": tok_s["lmforge fp32"],
        "hf_fp32": tok_s["hf fp32"],
        "lm_bf16": tok_s["lmforge bf16"],
        "hf_bf16": tok_s["hf bf16"],
        "ratio_fp32": ratio("lmforge fp32", "hf fp32"),
        "ratio_bf16": ratio("lmforge bf16", "hf bf16"),
        "ratio_same": ratio(f"lmforge {default_name}", f"hf {default_name}"),
        "default_vs_hf_fp32_same_process": ratio(f"lmforge {default_name}", "hf fp32"),
        "hf_fp32_plain": tok_s[PLAIN_HF],
        "default_vs_hf_fp32": ratio(f"lmforge {default_name}", PLAIN_HF),
        "mfu": tok_s[f"lmforge {default_name}"] * fpt / peak,
        "peak_gflops": peak / 1e9,
    }
    if compiled:
        out["lm_compiled"] = tok_s["lmforge bf16 compiled"]
        out["compiled_vs_hf_bf16"] = ratio("lmforge bf16 compiled", "hf bf16")
        out["compiled_vs_hf_compiled"] = ratio("lmforge bf16 compiled", "hf bf16 compiled")
        out["compiled_vs_hf_fp32"] = ratio("lmforge bf16 compiled", "hf fp32")
    return out


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice); on a busy "
        "shared machine 1 thread avoids OpenMP barrier stalls",
    )


def apply_threads_option(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per variant and recipe (default 4)")
    parser.add_argument("--only", nargs="*", help="recipes to run (default: tiny cpu-small seed-67m)")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave this process's malloc as the C library sets it (as LMFORGE_SYSTEM_MALLOC=1 does for lmforge)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time both models under torch.compile (bf16; adds a compilation of each model per recipe)",
    )
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads_option(args)
    kept = False if args.system_malloc else keep_freed_memory()  # as lmforge pretrain does
    default = resolve_dtype("auto", CPU)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, default dtype here: {default}, "
        f"malloc keeps freed memory: {kept}"
    )
    results = {}
    for recipe, batch in SHAPES:
        if args.only and recipe not in args.only:
            continue
        r = bench_shape(recipe, batch, args.rounds, args.compile)
        results[recipe] = r
        print(
            f"{recipe:10s} {r['params_M']:.1f}M params, batch {batch} x {r['tokens'] // batch}: tokens/s "
            f"lmforge fp32 {r['lm_fp32']:,.0f} / hf fp32 {r['hf_fp32']:,.0f} = {r['ratio_fp32']:.2f}x | "
            f"lmforge bf16 {r['lm_bf16']:,.0f} / hf bf16 {r['hf_bf16']:,.0f} = {r['ratio_bf16']:.2f}x | "
            f"default/hf-fp32 {r['default_vs_hf_fp32_same_process']:.2f}x same process, "
            f"{r['default_vs_hf_fp32']:.2f}x plain process ({r['hf_fp32_plain']:,.0f}) | MFU {r['mfu']:.0%} of "
            f"measured {r['peak_gflops']:.0f} GFLOP/s",
            flush=True,
        )
        if args.compile:
            print(
                f"{'':10s} compiled: lmforge bf16 {r['lm_compiled']:,.0f} tokens/s = {r['compiled_vs_hf_bf16']:.2f}x hf "
                f"bf16, {r['compiled_vs_hf_compiled']:.2f}x hf bf16 compiled, {r['compiled_vs_hf_fp32']:.2f}x hf fp32",
                flush=True,
            )
    if {"cpu-small", "seed-67m"} <= results.keys():
        cs, seed = results["cpu-small"], results["seed-67m"]
        print(
            f"train: cpu-small lmforge/hf tokens/s {cs['ratio_same']:.2f}, default/hf-fp32 "
            f"{cs['default_vs_hf_fp32']:.2f}, seed-67m {seed['ratio_same']:.2f}, mfu {seed['mfu']:.0%}"
        )


if __name__ == "__main__":
    main()
