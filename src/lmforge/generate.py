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


def sample_next(
    logits: torch.Tensor, params: SamplingParams, history: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next token for each row of logits (B, V) given the ids so far (B, T)."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    # the largest logit shifted to 0 first: a tiny temperature (or penalty) then gives -inf, never inf - inf = nan
    logits = logits.nan_to_num(posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    logits = filter_logits(logits, params.top_k, params.top_p)
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
def generate_stream(model: GPT, prompt_ids: list[int], params: SamplingParams, use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1). Stops at a stop id (not yielded) or max_new_tokens.

    The prompt is cut from the left so that prompt + new tokens fit in the model's block.
    """
    model.eval()
    device = model.tok_emb.weight.device
    block = model.cfg.block_size
    max_new = min(params.max_new_tokens, block - 1)
    prompt_ids = prompt_ids[-(block - max_new) :] if prompt_ids else []
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
def greedy_batch_scored(
    model: GPT, prompts: list[list[int]], max_new_tokens: int, stop_id: int, pad_id: int
) -> tuple[list[list[int]], list[float]]:
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
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
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


def greedy_batch(
    model: GPT, prompts: list[list[int]], max_new_tokens: int, stop_id: int, pad_id: int
) -> list[list[int]]:
    """Greedy continuations of several prompts at once (see greedy_batch_scored)."""
    return greedy_batch_scored(model, prompts, max_new_tokens, stop_id, pad_id)[0]


@dataclass
class SpanQuery:
    """One question for extractive decoding: the spans passage[s:e] (s in `starts`, e in `ends`) compete as
    the continuation of `prompt`; `baseline` is the prompt for calibration (the passage without the question);
    `accept(span)`, when given, rules candidates out."""

    prompt: list[int]
    passage: list[int]
    starts: Sequence[int]
    ends: Sequence[int]
    baseline: list[int] | None = None
    accept: Callable[[list[int]], bool] | None = None


def best_span(
    model: GPT,
    prompt: list[int],
    passage: list[int],
    starts: Sequence[int],
    ends: Sequence[int],
    max_tokens: int,
    stop_id: int,
    max_rows: int = 0,
    baseline: list[int] | None = None,
    baseline_weight: float = 0.0,
    accept: Callable[[list[int]], bool] | None = None,
    max_starts: int = 0,
) -> tuple[list[int], float]:
    """Extractive decoding of one question: best_spans of a single SpanQuery."""
    query = SpanQuery(prompt, passage, starts, ends, baseline, accept)
    return best_spans(model, [query], max_tokens, stop_id, baseline_weight, max_starts, max_rows)[0]


@torch.inference_mode()
def best_spans(
    model: GPT,
    queries: list[SpanQuery],
    max_tokens: int,
    stop_id: int,
    baseline_weight: float = 0.0,
    max_starts: int = 0,
    max_rows: int = 0,
) -> list[tuple[list[int], float]]:
    """Extractive decoding: for each query, of its spans with at most `max_tokens` tokens (and no more than the
    block leaves after the batch's longest prompt), the one the model likes best as the continuation of its
    prompt, and its score ([], -inf when none qualifies).

    The score is the mean log-probability per token of the span followed by `stop_id`, as in
    greedy_batch_scored, so answers from different windows compare. With `baseline` prompts (the same
    passage without the question, in every query) and a `baseline_weight` w, the score is
    mean(prompt) - w * mean(baseline): spans the model likes whatever the question is asked lose to those this
    question makes likely (PMI-style calibration, as in Holtzman et al. 2021, "Surface form competition").
    `accept(span)` rules candidates out (e.g. spans made only of the question's words): the best accepted one
    wins.
    With `max_starts` k, only spans from the k starts whose first token the prompt makes likeliest (calibrated
    alike) are scored; a query whose spans from them are all refused is decoded again with every start.

    The prompts run once, as one left-padded batch; the spans then run in batches of up to `max_rows` rows
    (one row per start, up to `max_tokens` tokens), each row on a copy of its prompt's KV cache. max_rows 0:
    32 on a CPU, where larger batches of rows (their cache copies and vocabulary-wide log-probabilities) were
    slower, and 256 on a GPU.
    """
    model.eval()
    max_rows = max_rows or (32 if model.tok_emb.weight.device.type == "cpu" else 256)
    results: list[tuple[list[int], float]] = [([], -math.inf)] * len(queries)
    live = [i for i, q in enumerate(queries) if q.starts]
    if not live:
        return results
    width = min(max_tokens, model.cfg.block_size - max(len(queries[i].prompt) for i in live))
    if width <= 0:
        return results
    scorers = [_PromptBatch(model, [queries[i].prompt for i in live], width)]
    calibrated = bool(baseline_weight) and all(queries[i].baseline is not None for i in live)
    if calibrated:
        scorers.append(_PromptBatch(model, [queries[i].baseline for i in live], width))
    starts = [list(queries[i].starts) for i in live]
    if max_starts:
        first = scorers[0].first - baseline_weight * scorers[1].first if calibrated else scorers[0].first
        starts = [
            _likeliest(first[row], queries[i].passage, row_starts, max_starts)
            for row, (i, row_starts) in enumerate(zip(live, starts, strict=True))
        ]
    rows = [(row, s) for row, row_starts in enumerate(starts) for s in row_starts]
    scores, spans = _span_scores(scorers, [queries[i] for i in live], rows, width, stop_id, baseline_weight, max_rows)
    retry, at = [], 0
    for row, i in enumerate(live):  # each query's rows are consecutive
        mine = slice(at, at + len(starts[row]))
        at = mine.stop
        results[i] = _pick(queries[i], scores[mine], spans[mine])
        if not results[i][0] and len(starts[row]) < len(queries[i].starts):
            retry.append(i)  # every span from the likeliest starts was refused: all the starts compete
    if retry:
        again = best_spans(model, [queries[i] for i in retry], max_tokens, stop_id, baseline_weight, 0, max_rows)
        for i, found in zip(retry, again, strict=True):
            results[i] = found
    return results


def _likeliest(first: torch.Tensor, passage: list[int], starts: list[int], keep: int) -> list[int]:
    """The `keep` starts whose first token gets the highest score in `first` (vocab,), in passage order."""
    if len(starts) <= keep:
        return starts
    score = first[torch.tensor([passage[s] for s in starts], device=first.device)]
    return [starts[k] for k in score.topk(keep).indices.sort().values.tolist()]


def _span_scores(
    scorers: list[_PromptBatch],
    queries: list[SpanQuery],
    rows: list[tuple[int, int]],
    width: int,
    stop_id: int,
    baseline_weight: float,
    max_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, spans), both (rows, width) on the CPU: row k is queries[q].passage[s : s + width] (then stop
    tokens) for rows[k] = (q, s), and column j the score of its first j + 1 tokens as an answer (-inf where
    the span may not end there)."""
    device = scorers[0].first.device
    # every query's passage, then `width` + 1 stop tokens, end to end; may_end marks where a span may stop
    tokens, may_end, offsets = [], [], [0]
    for q in queries:
        tokens += list(q.passage) + [stop_id] * (width + 1)
        ends = torch.zeros(len(q.passage) + width + 1, dtype=torch.bool)
        ends[[e for e in q.ends if 0 < e <= len(q.passage)]] = True
        may_end.append(ends)
        offsets.append(offsets[-1] + len(q.passage) + width + 1)
    flat_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
    flat_ends = torch.cat(may_end).to(device)
    owners = torch.tensor([q for q, _ in rows], dtype=torch.long, device=device)
    begins = torch.tensor([offsets[q] + s for q, s in rows], dtype=torch.long, device=device)
    steps = torch.arange(width, device=device)
    spans = flat_tokens[begins[:, None] + steps]
    lengths = steps + 1
    scores = []
    for at in range(0, len(rows), max_rows):
        part, who = spans[at : at + max_rows], owners[at : at + max_rows]
        score = scorers[0].mean_logprobs(part, who, stop_id, lengths)
        if len(scorers) > 1:
            score = score - baseline_weight * scorers[1].mean_logprobs(part, who, stop_id, lengths)
        ok = flat_ends[begins[at : at + max_rows, None] + lengths]
        scores.append(score.masked_fill(~ok, -math.inf))
    return torch.cat(scores).cpu(), spans.cpu()


def _pick(query: SpanQuery, scores: torch.Tensor, spans: torch.Tensor) -> tuple[list[int], float]:
    """The best candidate of one query's rows (scores and spans as _span_scores gives them) that `accept` takes."""
    width = spans.shape[1]
    flat = scores.flatten()
    if query.accept is None:
        top, at = flat.max(0)
        ranked = [(float(top), int(at))]
    else:  # best first: the first accepted candidate wins
        values, order = flat.sort(descending=True)
        ranked = zip(values.tolist(), order.tolist(), strict=True)
    for top, at in ranked:
        if top == -math.inf:
            break
        r, j = divmod(at, width)
        span = spans[r, : j + 1].tolist()
        if query.accept is None or query.accept(span):
            return span, top
    return [], -math.inf


class _PromptBatch:
    """Prompts run once as one left-padded batch, whose KV cache then scores batches of continuations."""

    def __init__(self, model: GPT, prompts: list[list[int]], width: int):
        self.model = model
        device = model.tok_emb.weight.device
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)  # padding: masked out
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, longest - len(p) :] = 1
        self.cache = model.new_cache(len(prompts), longest + width)
        self.first = model(ids, cache=self.cache, attention_mask=mask, last_only=True)[:, -1].float().log_softmax(-1)

    def mean_logprobs(
        self, spans: torch.Tensor, owners: torch.Tensor, stop_id: int, lengths: torch.Tensor
    ) -> torch.Tensor:
        """(rows, width): column j is the mean log-probability of a row's first j+1 tokens, then `stop_id`, after
        the prompt of batch row owners[row]."""
        logp = self.model(spans, cache=self.cache.select(owners)).float().log_softmax(-1)  # (rows, width, vocab)
        token_lp = torch.cat(
            [self.first[owners, spans[:, 0]][:, None], logp[:, :-1].gather(-1, spans[:, 1:, None]).squeeze(-1)], 1
        )
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


def stream_text(
    decode: Callable[[list[int]], str], tokens: Iterable[int], stop: Sequence[str] = ()
) -> Iterator[tuple[str, int, bool]]:
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
