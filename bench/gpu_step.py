"""GPU training-step throughput: lmforge vs a Hugging Face LlamaForCausalLM of identical dimensions.

Every variant trains on the same random batches with bf16 autocast, TF32, torch.compile and fused AdamW
(lmforge's optimizer groups for both models), and differs only in the model and where the fp32
cross-entropy is computed:
  lmforge, loss inside   torch.compile(model)(x, targets=y): what `lmforge pretrain` runs
  lmforge, loss outside  lm_loss(torch.compile(model)(x), y): the trainer before the loss moved inside
  hf, loss outside       lm_loss(torch.compile(hf)(x).logits, y)
  hf, loss inside        torch.compile(lambda x, y: lm_loss(hf(x).logits, y)): the same fusion for HF
Tokens/s is the mean over the timed steps (after warm-up steps that pay the compilation), with the
device synchronised only at the ends, so it measures the GPU's work, not the trainer's host-side
bookkeeping. MFU is against the card's datasheet dense bf16 peak (lmforge.train.precision).

    python bench/gpu_step.py                          # gpt2-124m and seed-67m, batch 32
    python bench/gpu_step.py --only gpt2-124m --profile   # also the top CUDA kernels of lmforge's step
    python bench/gpu_step.py --device cpu --eager --only tiny --batch 2 --steps 2   # a dry run
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train import gpt_config, hf_llama  # noqa: E402  (bench/train.py)

from lmforge.config import TrainConfig  # noqa: E402
from lmforge.model import GPT, lm_loss  # noqa: E402
from lmforge.train.optim import make_optimizer  # noqa: E402
from lmforge.train.precision import autocast, enable_tf32, flops_per_token, peak_flops  # noqa: E402

VARIANTS = ("lmforge, loss inside", "lmforge, loss outside", "hf, loss outside", "hf, loss inside")


def loss_function(name: str, model: torch.nn.Module, compiled: bool):
    """(x, y) -> loss for one variant."""
    wrap = torch.compile if compiled else (lambda f: f)
    if name == "lmforge, loss inside":
        engine = wrap(model)
        return lambda x, y: engine(x, targets=y)
    if name == "lmforge, loss outside":
        engine = wrap(model)
        return lambda x, y: lm_loss(engine(x), y)
    if name == "hf, loss outside":
        engine = wrap(model)
        return lambda x, y: lm_loss(engine(input_ids=x, use_cache=False).logits, y)
    if name == "hf, loss inside":
        return wrap(lambda x, y: lm_loss(model(input_ids=x, use_cache=False).logits, y))
    raise ValueError(name)


def time_variant(
    name: str, recipe: str, batch: int, steps: int, warmup: int, device: torch.device, compiled: bool, profile: bool
) -> dict:
    cfg = gpt_config(recipe)
    torch.manual_seed(0)
    model = (hf_llama(cfg) if name.startswith("hf") else GPT(cfg)).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), device)
    loss_of = loss_function(name, model, compiled)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=g) for _ in range(4)]
    batches = [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches]

    def step(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        with autocast(device, torch.bfloat16):
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    synchronize(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * batch * cfg.block_size / elapsed
    n_params = sum(p.numel() for p in model.parameters())
    peak, _ = peak_flops(device, torch.bfloat16)
    result = {
        "variant": name,
        "recipe": recipe,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * elapsed / steps,
        "warmup_s": warmup_s,
        "loss": float(loss.detach()),
        "params_M": n_params / 1e6,
        "mfu": tokens_per_s * flops_per_token(cfg, n_params) / peak if peak else None,
        "memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if profile:
        result["profile"] = profile_steps(step, device)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step, device: torch.device, n: int = 5) -> str:
    """The kernels that take the time of n steps, most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(n):
            step(i)
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=["gpt2-124m", "seed-67m"], help="recipes (model shapes)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first; the first compiles")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (dry runs)")
    parser.add_argument("--profile", action="store_true", help="profile lmforge's step (the first variant)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds: skip what would start after it")
    args = parser.parse_args()
    device = torch.device(args.device)
    enable_tf32(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, batch {args.batch}, {args.steps} timed steps", flush=True)
    begin = time.perf_counter()
    results = []
    for recipe in args.only:
        for i, variant in enumerate(args.variants):
            if args.deadline and time.perf_counter() - begin > args.deadline:
                print(f"deadline: skipped {recipe} / {variant}", flush=True)
                continue
            r = time_variant(
                variant, recipe, args.batch, args.steps, args.warmup, device, not args.eager, args.profile and i == 0
            )
            gc.collect()  # the variant's model and optimizer state are garbage now: free their memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.append(r)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            memory = f"{r['memory_gb']:.1f} GB" if r["memory_gb"] is not None else "n/a"
            print(
                f"{recipe:10s} {variant:22s} {r['tokens_per_s']:>12,.0f} tokens/s  {r['step_ms']:7.1f} ms/step  "
                f"MFU {mfu}  peak memory {memory}  warm-up {r['warmup_s']:.0f} s  loss {r['loss']:.3f}",
                flush=True,
            )
            if "profile" in r:
                print(r["profile"], flush=True)
        by = {r["variant"]: r["tokens_per_s"] for r in results if r["recipe"] == recipe}
        for ours, theirs in (
            ("lmforge, loss inside", "hf, loss inside"),
            ("lmforge, loss outside", "hf, loss outside"),
            ("lmforge, loss inside", "lmforge, loss outside"),
        ):
            if ours in by and theirs in by:
                print(f"{recipe:10s} {ours} / {theirs}: {by[ours] / by[theirs]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
