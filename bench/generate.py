"""Generation speed on CPU: the KV cache vs recomputing the whole prefix, and lmforge vs Hugging Face
`transformers` generate on the same weights. Greedy, batch 1. Everything is measured in this run.

    python bench/generate.py [--quick] [--threads N]

On a busy shared CPU pass `--threads 1`: with more threads than free cores OpenMP barriers stall, and they
stall a model of many small operations (HF's generate) more than lmforge's, which skews the ratio.

Model: the cpu-small shape (6 layers, 6 heads, n_embd 384, vocab 8192) with a 2,048-token block,
randomly initialised (speed does not depend on the weights). The HF baseline is a LlamaForCausalLM of
identical dimensions holding the same weights (lmforge's model is the Llama architecture); both must
produce the same greedy tokens.

Last line: `generate: lmforge/hf X.XX, no-cache/cache at 1024 ctx X.XX`
  lmforge/hf           tokens/s of lmforge over tokens/s of HF generate (>= 1 means lmforge is faster)
  no-cache/cache       per-token time without the cache over per-token time with it (the cache's speed-up)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import add_threads_option, apply_threads_option  # noqa: E402

from lmforge.generate import SamplingParams, generate_stream  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=8192, n_layer=6, n_head=6, n_embd=384, block_size=2048)


def per_token_seconds(model: GPT, prompt: list[int], new: int, use_cache: bool, reps: int) -> float:
    """Marginal cost of one more token: (time for `new` tokens - time to the first) / (new - 1), median."""
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    samples = []
    for _ in range(reps):
        stream = generate_stream(model, prompt, params, use_cache=use_cache)
        next(stream)  # the prompt's forward pass (prefill) is not part of the per-token cost
        first = time.perf_counter()
        n = 1 + sum(1 for _ in stream)
        assert n == new, n
        samples.append((time.perf_counter() - first) / (new - 1))
    return statistics.median(samples)


def hf_twin(model: GPT):
    """A transformers LlamaForCausalLM of the same dimensions holding the same weights."""
    from lmforge.export import to_hf_model

    return to_hf_model(model)


def hf_tokens_per_second(hf, prompt: list[int], new: int, reps: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    out = None
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        rates.append(new / (time.perf_counter() - start))
    return statistics.median(rates), out[0, len(prompt) :].tolist()


def lmforge_tokens_per_second(model: GPT, prompt: list[int], new: int, reps: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    rates, out = [], []
    for _ in range(reps):
        start = time.perf_counter()
        out = list(generate_stream(model, prompt, params))
        rates.append(new / (time.perf_counter() - start))
    return statistics.median(rates), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (a smoke run)")
    add_threads_option(ap)
    args = ap.parse_args()
    apply_threads_option(args)
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    reps = 1 if args.quick else 3
    per_token_seconds(model, list(range(64)), 3, True, 1)  # warm-up: the first timed cell pays no one-time costs
    print(
        f"model: {model.num_parameters() / 1e6:.1f}M parameters, block {CFG.block_size}, "
        f"torch threads {torch.get_num_threads()}"
    )

    print("\nper-token cost vs context (greedy, batch 1):")
    print(f"{'context':>8} {'cache ms/tok':>13} {'no-cache ms/tok':>16} {'no-cache/cache':>15}")
    g = torch.Generator().manual_seed(1)
    ratio_1024 = 0.0
    for ctx in (64, 256, 1024):
        prompt = torch.randint(0, CFG.vocab_size, (ctx,), generator=g).tolist()
        cached = per_token_seconds(model, prompt, 5 if args.quick else 17, True, reps)
        uncached = per_token_seconds(model, prompt, 3 if args.quick else 5, False, reps)
        ratio_1024 = uncached / cached
        print(f"{ctx:>8} {cached * 1e3:>13.2f} {uncached * 1e3:>16.2f} {uncached / cached:>15.2f}")

    new = 16 if args.quick else 64
    prompt = torch.randint(0, CFG.vocab_size, (64,), generator=g).tolist()
    hf = hf_twin(model)
    lmforge_rate, ours = lmforge_tokens_per_second(model, prompt, new, reps)  # also warms up
    hf_rate, theirs = hf_tokens_per_second(hf, prompt, new, reps)
    lmforge_rate, ours = lmforge_tokens_per_second(model, prompt, new, reps)
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(
        f"\nlmforge vs transformers {__import__('transformers').__version__} generate "
        f"(64-token prompt, {new} new tokens, greedy):"
    )
    print(f"  lmforge {lmforge_rate:.1f} tokens/s, hf {hf_rate:.1f} tokens/s; same greedy tokens: {same}/{new}")
    print(f"generate: lmforge/hf {lmforge_rate / hf_rate:.2f}, no-cache/cache at 1024 ctx {ratio_1024:.2f}")


if __name__ == "__main__":
    main()
