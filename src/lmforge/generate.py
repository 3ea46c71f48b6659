"""Text generation with the KV cache: sampling (temperature, top-k, top-p, repetition penalty),
batched greedy decoding with left padding (used by evaluation), and extractive span scoring (an answer
that is the passage span the model finds likeliest)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.model import GPT


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the text
    seed: int | None = None
    stop_ids: set[int] = field(default_factory=set)
    min_new_tokens: int = 0  # stop ids cannot be sampled before this many new tokens


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present: positive logits divided, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus. logits: (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token for each row of logits (B, V) given the ids so far (B, T)."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def hold_back_stops(logits: torch.Tensor, params: SamplingParams, step: int) -> torch.Tensor:
    """Rule out the stop ids while fewer than params.min_new_tokens tokens have been generated."""
    if step >= params.min_new_tokens or not params.stop_ids:
        return logits
    return logits.index_fill(-1, torch.tensor(sorted(params.stop_ids), device=logits.device), float("-inf"))


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@torch.inference_mode()
def generate_stream(model: GPT, prompt_ids: list[int], params: SamplingParams,
                    use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1). Stops at a stop id (not yielded) or max_new_tokens.

    The prompt is cut from the left so that prompt + new tokens fit in the model's block.
    """
    model.eval()
    device = model.tok_emb.weight.device
    block = model.cfg.block_size
    max_new = min(params.max_new_tokens, block - 1)
    prompt_ids = prompt_ids[-(block - max_new):] if prompt_ids else []
    if not prompt_ids:
        raise ValueError("empty prompt")
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    gen = _generator(params.seed, device)
    cache = model.new_cache(1) if use_cache else None
    logits = model(ids, cache=cache, last_only=True)[:, -1]
    for step in range(max_new):
        nxt = sample_next(hold_back_stops(logits, params, step), params, ids, gen)
        token = int(nxt)
        if token in params.stop_ids:
            return
        yield token
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if ids.shape[1] >= block:
            return
        step_in = nxt[:, None] if use_cache else ids
        logits = model(step_in, cache=cache, last_only=True)[:, -1]


def generate(model: GPT, prompt_ids: list[int], params: SamplingParams, use_cache: bool = True) -> list[int]:
    return list(generate_stream(model, prompt_ids, params, use_cache=use_cache))


@torch.inference_mode()
def greedy_batch_scored(model: GPT, prompts: list[list[int]], max_new_tokens: int, stop_id: int,
                        pad_id: int) -> tuple[list[list[int]], list[float]]:
    """Greedy continuations of several prompts at once: left-padded, one shared KV cache.

    Each returned list stops before the first `stop_id`. The second list holds each continuation's mean
    log-probability per token (the stop token included when it was produced), so continuations of
    different prompts can be ranked, e.g. answers from different windows of one long context.
    """
    model.eval()
    device = model.tok_emb.weight.device
    width = max(len(p) for p in prompts)
    max_new = min(max_new_tokens, model.cfg.block_size - width)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    cache = model.new_cache(len(prompts), width + max_new)
    logits = model(ids, cache=cache, attention_mask=mask, last_only=True)[:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    logprob = torch.zeros(len(prompts), device=device)
    count = torch.zeros(len(prompts), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new):
        nxt = logits.argmax(-1)
        step_lp = logits.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        logprob += torch.where(done, 0.0, step_lp)
        count += (~done).float()
        done |= nxt == stop_id
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(nxt[row]))
        if bool(done.all()):
            break
        logits = model(nxt[:, None], cache=cache, last_only=True)[:, -1]
    return out, (logprob / count.clamp(min=1)).tolist()


def greedy_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, stop_id: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of several prompts at once (see greedy_batch_scored)."""
    return greedy_batch_scored(model, prompts, max_new_tokens, stop_id, pad_id)[0]


@torch.inference_mode()
def best_span(model: GPT, prompt: list[int], passage: list[int], starts: Sequence[int], ends: Sequence[int],
              max_tokens: int, stop_id: int, max_rows: int = 256, baseline: list[int] | None = None,
              baseline_weight: float = 0.0, accept: Callable[[list[int]], bool] | None = None,
              max_starts: int = 0) -> tuple[list[int], float]:
    """Extractive decoding: of the spans passage[s:e] with s in `starts`, e in `ends` and at most
    `max_tokens` tokens, the one the model likes best as the continuation of `prompt`, and its score.

    The score is the mean log-probability per token of the span followed by `stop_id`, as in
    greedy_batch_scored, so answers from different windows compare. With a `baseline` prompt (the same
    passage without the question) and a `baseline_weight` w, the score is mean(prompt) - w * mean(baseline):
    spans the model likes whatever the question is asked lose to those this question makes likely
    (PMI-style calibration, as in Holtzman et al. 2021, "Surface form competition"). `accept(span)`, when
    given, rules candidates out (e.g. spans made only of the question's words): the best accepted one wins.
    Each prompt runs once; the spans then run as one batch (up to `max_rows` rows) on copies of its KV
    cache, one row per start.
    """
    model.eval()
    width = min(max_tokens, model.cfg.block_size - len(prompt))
    if width <= 0 or not starts:
        return [], -math.inf
    scorers = [_SpanScorer(model, prompt, width)]
    if baseline is not None and baseline_weight:
        scorers.append(_SpanScorer(model, baseline, width))
    if max_starts and len(starts) > max_starts:
        chosen = _likeliest_starts(scorers, passage, starts, max_starts, baseline_weight)
        found = _best_of(scorers, passage, chosen, ends, width, stop_id, max_rows, baseline_weight, accept)
        if found[0]:
            return found
        # every span from those starts was ruled out: all the starts compete
    return _best_of(scorers, passage, starts, ends, width, stop_id, max_rows, baseline_weight, accept)


def _best_of(scorers: list[_SpanScorer], passage: list[int], starts: Sequence[int], ends: Sequence[int], width: int,
             stop_id: int, max_rows: int, baseline_weight: float,
             accept: Callable[[list[int]], bool] | None) -> tuple[list[int], float]:
    """best_span's search over the spans from `starts`, with its prompt (and baseline) already run."""
    device = scorers[0].first.device
    lengths = torch.arange(1, width + 1, device=device)
    may_end = torch.zeros(len(passage) + width + 1, dtype=torch.bool, device=device)
    may_end[[e for e in ends if 0 < e <= len(passage)]] = True
    # row s of the batch is passage[s : s + width], then stop tokens: gathered on the device in one go
    padded = torch.tensor(list(passage) + [stop_id] * width, dtype=torch.long, device=device)
    best: tuple[list[int], float] = ([], -math.inf)
    for at in range(0, len(starts), max_rows):
        rows = torch.tensor(list(starts[at : at + max_rows]), device=device)
        spans = padded[rows[:, None] + torch.arange(width, device=device)]
        score = scorers[0].mean_logprobs(spans, stop_id, lengths)
        if len(scorers) > 1:
            score = score - baseline_weight * scorers[1].mean_logprobs(spans, stop_id, lengths)
        score = score.masked_fill(~may_end[rows[:, None] + lengths[None]], -math.inf).flatten()
        if accept is None:
            top, flat = score.max(0)
            ranked = [(float(top), int(flat))]
        else:  # every candidate in order, read off the device in one go
            values, order = score.sort(descending=True)
            ranked = zip(values.tolist(), order.tolist(), strict=True)
        for top, flat in ranked:  # best first: the first accepted candidate is this batch's best
            if top <= best[1]:
                break
            r, j = divmod(flat, width)
            span = spans[r, : j + 1].tolist()
            if accept is None or accept(span):
                best = (span, top)
                break
    return best


def _likeliest_starts(scorers: list[_SpanScorer], passage: list[int], starts: Sequence[int], keep: int,
                      baseline_weight: float) -> list[int]:
    """The `keep` starts whose first token the prompt makes likeliest (calibrated as the spans' scores are), in
    passage order."""
    first = torch.tensor([passage[s] for s in starts], device=scorers[0].first.device)
    score = scorers[0].first[first]
    if len(scorers) > 1:
        score = score - baseline_weight * scorers[1].first[first]
    chosen = score.topk(keep).indices.sort().values.tolist()
    return [starts[i] for i in chosen]


class _SpanScorer:
    """A prompt run once, whose KV cache then scores batches of candidate continuations."""

    def __init__(self, model: GPT, prompt: list[int], width: int):
        self.model = model
        self.cache = model.new_cache(1, len(prompt) + width)
        ids = torch.tensor([prompt], device=model.tok_emb.weight.device)
        self.first = model(ids, cache=self.cache, last_only=True)[0, -1].float().log_softmax(-1)

    def mean_logprobs(self, spans: torch.Tensor, stop_id: int, lengths: torch.Tensor) -> torch.Tensor:
        """(rows, width): column j is the mean log-probability of a row's first j+1 tokens, then `stop_id`."""
        logp = self.model(spans, cache=self.cache.repeat(len(spans))).float().log_softmax(-1)  # (rows, width, vocab)
        token_lp = torch.cat([self.first[spans[:, :1]], logp[:, :-1].gather(-1, spans[:, 1:, None]).squeeze(-1)], 1)
        return (token_lp.cumsum(1) + logp[..., stop_id]) / (lengths + 1)


def _held_back(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def stream_text(decode: Callable[[list[int]], str], tokens: Iterable[int],
                stop: Sequence[str] = ()) -> Iterator[tuple[str, int, bool]]:
    """Turn a stream of token ids into text pieces, ending before the first stop string.

    Yields (new text, tokens consumed so far, hit_stop) once per token; a piece is empty while a
    multi-byte character is incomplete or while the text might be the start of a stop string (that
    text is released once it cannot be). hit_stop is True on the last piece when a stop string ended it.
    """
    stop = [s for s in stop if s]
    ids: list[int] = []
    sent = 0
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield "", len(ids), False
            continue
        hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in stop) if i >= 0]
        if hits:
            yield text[sent : min(hits)], len(ids), True
            return
        safe = len(text) - _held_back(text, stop)
        if safe > sent:
            yield text[sent:safe], len(ids), False
            sent = safe
        else:
            yield "", len(ids), False
    text = decode(ids)
    if len(text) > sent:
        yield text[sent:], len(ids), False
