"""Token -> word attention aggregation, for the attention explorer (web UI, /api/attention, probes).

A model attends between subword tokens; people read words. A word's tokens are found from the
tokenizer's character offsets, then a token-level attention map A (query rows, key columns) becomes a
word-level map W by

    W[i, j] = mean over the tokens q of word i of ( sum over the tokens k of word j of A[q, k] )

so every row of W is still a probability distribution (the attending word's tokens are averaged, the
attended word's tokens pooled). Optional steps, in this order:

- discount the first token: most heads park spare attention on the first position (an "attention
  sink"), which makes every row of a heatmap peak at the first word. Dropping column 0 and
  renormalising each row shows how the remaining attention is spread.
- log scale: log(p + eps) mapped back to [0, 1], so small but non-zero attention stays visible.
- row normalisation: each row divided by its maximum, so every word's strongest link is 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer

# A word: a special token (<|question|>), a run of letters/digits/underscores with inner apostrophes
# (don't, Sarah's), or a single other non-space character (punctuation).
WORD_RE = re.compile(r"<\|\w+\|>|\w+(?:['’]\w+)*|[^\w\s]")
LOG_EPS = 1e-3  # log scale floor: attention of 0.01 maps to about 0.35, of 0.1 to about 0.67


@dataclass
class Word:
    text: str
    start: int  # character offsets in the text
    end: int
    tokens: list[int]  # positions of the word's tokens in the token sequence


def group_tokens(text: str, offsets: list[tuple[int, int]]) -> list[Word]:
    """Words of `text` with the tokens (given by character `offsets`) that make them up.

    A token belongs to the word holding its first non-space character; a whitespace-only token joins
    the next word (the previous one at the end), so every token belongs to exactly one word. Words that
    share a token (one token for "),", say) are shown as one word, so every word keeps its text.
    """
    spans = [(m.start(), m.end()) for m in WORD_RE.finditer(text)] or [(0, len(text))]
    char_word = [-1] * len(text)
    for w, (a, b) in enumerate(spans):
        char_word[a:b] = [w] * (b - a)
    covered = [sorted({char_word[c] for c in range(a, min(b, len(text))) if char_word[c] >= 0}) for a, b in offsets]
    # one group per run of words joined by shared tokens (a token's characters are contiguous: its words are too)
    group = list(range(len(spans)))
    for words_of_token in covered:
        for w in words_of_token[1:]:
            group[w] = group[words_of_token[0]]
    owner: list[int | None] = [group[ws[0]] if ws else None for ws in covered]
    for t in range(len(owner)):  # whitespace-only tokens: attach to the next word, else the previous
        if owner[t] is None:
            later = [w for w in owner[t + 1 :] if w is not None]
            earlier = [w for w in owner[:t] if w is not None]
            owner[t] = later[0] if later else (earlier[-1] if earlier else 0)
    words = {}
    for w, (a, b) in enumerate(spans):
        first = words.setdefault(group[w], Word(text[a:b], a, b, []))
        first.end, first.text = b, text[first.start : b]
    for t, w in enumerate(owner):
        words[w].tokens.append(t)
    return [w for w in words.values() if w.tokens]


def tokenize_words(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[Word]]:
    """Token ids of `text` (special-token strings such as <|question|> included) and its words."""
    enc = tokenizer.encode_markup(text)
    return enc.ids, group_tokens(text, enc.offsets)


def membership(words: list[Word], n_tokens: int) -> torch.Tensor:
    """(n_words, n_tokens) 0/1 matrix: row w marks the tokens of word w."""
    m = torch.zeros(len(words), n_tokens)
    for w, word in enumerate(words):
        m[w, word.tokens] = 1.0
    return m


def discount_first_token(attn: torch.Tensor) -> torch.Tensor:
    """Drop attention to token 0 and renormalise each row over the other tokens.

    The first query can only see token 0, so its row becomes all zeros.
    """
    out = attn.clone()
    out[..., 0] = 0.0
    total = out.sum(-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-12), torch.zeros_like(out))


def to_words(attn: torch.Tensor, query_words: list[Word], key_words: list[Word] | None = None) -> torch.Tensor:
    """Token attention (..., Tq, Tk) -> word attention (..., Wq, Wk): mean over the query word's tokens,
    sum over the key word's tokens."""
    key_words = query_words if key_words is None else key_words
    mq = membership(query_words, attn.shape[-2]).to(attn)
    mk = membership(key_words, attn.shape[-1]).to(attn)
    mq = mq / mq.sum(-1, keepdim=True)
    return mq @ attn @ mk.transpose(0, 1)


def log_scale(x: torch.Tensor, eps: float = LOG_EPS) -> torch.Tensor:
    """log(x + eps) mapped so that 0 -> 0 and 1 -> 1 (monotone): small values become visible."""
    return (torch.log(x + eps) - math.log(eps)) / (math.log(1 + eps) - math.log(eps))


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Divide each row by its maximum (rows of zeros stay zero)."""
    peak = x.amax(-1, keepdim=True)
    return torch.where(peak > 0, x / peak.clamp_min(1e-12), torch.zeros_like(x))


def display(x: torch.Tensor, log: bool = False, normalize: bool = False) -> torch.Tensor:
    if log:
        x = log_scale(x)
    if normalize:
        x = normalize_rows(x)
    return x


def most_attended(word_attn: torch.Tensor, exclude_self: bool = True) -> list[int | None]:
    """For each row (attending word) of a (W, W) map, the column (word) with the most attention.

    With exclude_self a word's attention to itself does not count; the first word then has no answer
    (None), as it can only see itself in a causal model. A word with no attention left for any other word
    (the second word once the first token is discounted) has none either.
    """
    scores = word_attn.clone().float()
    if exclude_self:
        scores.fill_diagonal_(float("-inf"))
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))  # causal
    out: list[int | None] = []
    for row in scores:
        best = int(row.argmax())
        out.append(best if float(row[best]) > 0 else None)
    return out


@dataclass
class WordAttention:
    words: list[Word]
    per_head: torch.Tensor  # (layers, heads, words, words), after the display options
    mean: torch.Tensor  # (layers, words, words): mean over heads, after the display options
    top: list[list[int | None]]  # per layer: for each word, the word its head-mean attends to most


@torch.inference_mode()
def token_attention(model: GPT, ids: list[int]) -> torch.Tensor:
    """Attention probabilities (layers, heads, T, T) of one sequence."""
    model.eval()
    device = model.tok_emb.weight.device
    _, probs = model.forward_with_attention(torch.tensor([ids], dtype=torch.long, device=device))
    return torch.stack([p[0] for p in probs]).float().cpu()


def word_attention(
    model: GPT,
    tokenizer: Tokenizer,
    text: str,
    *,
    discount_first: bool = False,
    log: bool = False,
    normalize: bool = False,
    max_tokens: int | None = None,
) -> WordAttention:
    """Word-by-word attention of `text` for every layer and head, plus the mean over heads.

    `top` (most attended word) is taken from the head mean before log/normalisation (both monotone per
    row, so the answer is the same), after the first-token discount when that is on.
    """
    ids, words = tokenize_words(tokenizer, text)
    limit = min(max_tokens or model.cfg.block_size, model.cfg.block_size)
    if not ids:
        raise ValueError("empty text")
    if len(ids) > limit:
        raise ValueError(f"text is {len(ids)} tokens; at most {limit} are allowed")
    attn = token_attention(model, ids)
    if discount_first:
        attn = discount_first_token(attn)
    per_head = to_words(attn, words)
    mean = per_head.mean(1)
    top = [most_attended(layer) for layer in mean]
    return WordAttention(words, display(per_head, log, normalize), display(mean, log, normalize), top)


def input_focus(
    attn: torch.Tensor, prompt_words: list[Word], prompt_len: int, n_new: int, discount_first: bool = False
) -> torch.Tensor:
    """How much each prompt word was attended to while each new token was generated.

    `attn` (layers, heads, T, T) covers prompt + generated tokens; new token i was predicted at
    position prompt_len - 1 + i, so those rows are used. Returns (layers, heads, n_new, prompt words).
    """
    if discount_first:
        attn = discount_first_token(attn)
    rows = attn[..., prompt_len - 1 : prompt_len - 1 + n_new, :prompt_len]
    mk = membership(prompt_words, prompt_len).to(rows)
    return rows @ mk.transpose(0, 1)
