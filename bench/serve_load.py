"""The server under load: N concurrent streaming clients for S seconds against `lmforge serve` on 127.0.0.1.

    python bench/serve_load.py [--run RUN] [--clients 32] [--seconds 30] [--max-tokens 16]

Without --run it builds a run directory with the cpu-small model shape (6 layers, 6 heads, n_embd 384,
block 256, vocab 8192), randomly initialised (speed does not depend on the weights), and a BPE tokenizer
trained on a small sample of ../shared/data. The server is the real command (`python -m lmforge.cli serve`)
in its own process, with the recipe's default limits (32 generating in one batch, 64 waiting). The baseline, measured in
the same run, is one client alone; the ratio shows what sharing the server costs each request.

Last line: `serve: N requests, E errors, p50 ttft X ms, p95 ttft Y ms`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Once upon a time",
    "The president said that",
    "In the middle of the river",
    "She opened the door and",
    "The history of the city",
    "When the sun rose over the hills",
    "Science is the study of",
    "The little dog ran to",
]


def build_run(root: Path, data_dir: Path) -> Path:
    """A servable run directory: cpu-small recipe and shape, random weights, a small trained tokenizer."""
    import gzip

    import torch

    from lmforge.config import load_recipe, save_recipe
    from lmforge.pipeline import model_config
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.checkpoint import save_checkpoint

    run = root / "cpu-small-random"
    recipe = load_recipe(REPO / "recipes" / "cpu-small.toml")
    save_recipe(recipe, run / "config.toml")
    path = data_dir / "pretrain" / "tinystories" / "tinystories_samples.jsonl.gz"
    texts = [json.loads(line)["text"] for line in gzip.open(path, "rt", encoding="utf-8")]
    tok = train_tokenizer(texts, recipe.tokenizer.vocab_size, 2_000_000)
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    from lmforge.model import GPT

    model = GPT(model_config(recipe, tok))
    save_checkpoint(run / "checkpoints" / "best", model, {"stage": "pretrain", "step": 0})
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "serve", str(run), "--port", str(port), *overrides], env=env
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise SystemExit("the server exited during startup")
    proc.terminate()
    raise SystemExit("the server did not come up within 120 s")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float | None, int, bool]:
    """(time to first token in s, tokens received, ok) for one streaming completion."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return None, 0, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and ttft is None:
                    ttft = time.perf_counter() - start
    except httpx.HTTPError:
        return None, 0, False
    return ttft, tokens, done and ttft is not None


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> tuple[list[float], int, int, int, float]:
    results: list[tuple[float | None, int, bool]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        end = time.perf_counter() + seconds
        start = time.perf_counter()

        async def worker(i: int) -> None:
            n = 0
            while time.perf_counter() < end:
                results.append(await one_request(client, PROMPTS[(i + n) % len(PROMPTS)], max_tokens))
                n += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    ttfts = [t for t, _, ok in results if ok]
    errors = sum(1 for _, _, ok in results if not ok)
    tokens = sum(n for _, n, ok in results if ok)
    return ttfts, len(results), errors, tokens, elapsed


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="serve this run directory instead of a random cpu-small model")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-concurrent", type=int, help="override serve.max_concurrent (requests generating at once)")
    ap.add_argument("--no-batching", action="store_true", help="serve.batching = false: one thread per request")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-serve-load-") as tmp:
        run = args.run or build_run(Path(tmp), args.data_dir)
        port = free_port()
        overrides = ["--serve.max_concurrent", str(args.max_concurrent)] if args.max_concurrent else []
        overrides += ["--serve.batching", "false"] if args.no_batching else []
        server = start_server(run, port, overrides)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(load(url, 1, 2.0, args.max_tokens))  # warm-up
            base_ttft, base_n, base_err, base_tokens, base_s = asyncio.run(load(url, 1, 8.0, args.max_tokens))
            ttft, n, errors, tokens, elapsed = asyncio.run(load(url, args.clients, args.seconds, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=30)
    base_p50 = pct(base_ttft, 50)
    print(f"model: {'random cpu-small shape' if not args.run else args.run}; {args.max_tokens} new tokens per request")
    print(
        f"baseline, 1 client : {base_n} requests, {base_err} errors, {base_n / base_s:.2f} requests/s, "
        f"{base_tokens / base_s:.1f} tokens/s, p50 ttft {base_p50 * 1e3:.0f} ms"
    )
    print(
        f"load, {args.clients} clients: {n} requests, {errors} errors, {n / elapsed:.2f} requests/s, "
        f"{tokens / elapsed:.1f} tokens/s, p50 ttft {pct(ttft, 50) * 1e3:.0f} ms, p95 ttft {pct(ttft, 95) * 1e3:.0f} ms"
    )
    print(
        f"ratios (load / 1 client): throughput {(tokens / elapsed) / max(base_tokens / base_s, 1e-9):.2f}, "
        f"p50 ttft {pct(ttft, 50) / base_p50:.2f}"
    )
    print(
        f"serve: {n} requests, {errors} errors, p50 ttft {pct(ttft, 50) * 1e3:.0f} ms, "
        f"p95 ttft {pct(ttft, 95) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
