"""SQuAD-style question answering as language modelling.

Prompt format (special tokens from lmforge.tokenizer):
  with context:  <|context|>{context}<|question|>{question}<|answer|> {answer}<|endoftext|>
  closed-book:                      <|question|>{question}<|answer|> {answer}<|endoftext|>
The answer keeps a leading space, so its tokens are those it has inside the passage. The loss is on the
answer and its end-of-text only; prompt and padding positions are masked (-100).
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.data.sources import QAExample, some_ids
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge")

IGNORE_INDEX = -100


@dataclass
class EncodedQA:
    ids: list[int]  # prompt followed by answer + end-of-text (training) or the prompt alone (inference)
    prompt_len: int
    context_truncated: bool = False


# --------------------------------------------------------------------------- checking examples


def example_problem(ex: QAExample) -> str | None:
    """Why an example cannot be used (for training or scoring), or None when it is fine."""
    if not ex.question.strip():
        return "empty question"
    if not ex.context.strip():
        return "empty context"
    answers = [a for a in ex.answers if a.strip()]
    if not answers:
        return "empty answer"
    if not any(a in ex.context for a in answers):
        return "answer text not in the context"
    return None


def clean_examples(examples: list[QAExample], what: str) -> tuple[list[QAExample], Counter]:
    """Drop unusable examples with a warning naming their ids; returns (kept, count per reason).

    Within a kept example, empty answers are dropped (with their offsets), and gold answers absent from the
    context are moved after those in it: training learns the first answer, which is then really in the
    passage, while scoring takes the best over every gold answer, as the official SQuAD v1.1 script does.
    """
    kept: list[QAExample] = []
    dropped: Counter = Counter()
    named: dict[str, list[str]] = {}
    for ex in examples:
        problem = example_problem(ex)
        if problem is not None:
            dropped[problem] += 1
            named.setdefault(problem, []).append(ex.id or "?")
            continue
        pairs = [
            (a, s) for a, s in zip(ex.answers, ex.answer_starts or [-1] * len(ex.answers), strict=False) if a.strip()
        ]
        pairs.sort(key=lambda pair: pair[0] not in ex.context)  # stable: file order within each group
        if [a for a, _ in pairs] != ex.answers:
            ex = QAExample(ex.id, ex.question, ex.context, [a for a, _ in pairs], [s for _, s in pairs], ex.title)
        kept.append(ex)
    for problem, ids in named.items():
        log.warning("%s: skipped %d example(s) with %s: %s", what, len(ids), problem, some_ids(ids))
    return kept, dropped


# --------------------------------------------------------------------------- prompts


@functools.lru_cache(maxsize=64)
def _encode_with_offsets(tokenizer: Tokenizer, text: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    # SQuAD has ~5 questions per paragraph, listed together: caching the last contexts avoids
    # re-tokenizing each paragraph for every question (about 4x faster encoding of the train set)
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    return tuple(enc.ids), tuple(enc.offsets)


# words too common to say which part of a passage a question is about (for best-match windows)
STOP_WORDS = frozenset(
    "a an the of in on at to for by with from and or is was were are be been being what which who whom whose "
    "when where why how did do does that this these those as it its into than there their they he she his her "
    "not no".split()
)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if w not in STOP_WORDS}


def best_match_start(context: str, offsets: Sequence[tuple[int, int]], budget: int, question: str) -> int:
    """Start token of the `budget`-token window most like the question (the retrieval step of the SQuAD
    paper's sliding-window baseline): the window sharing the most content words with it (stride a quarter
    window), then moved to centre the shared words, as answers sit near them on either side."""
    wanted = content_words(question)
    n = len(offsets)
    ends = [end for _, end in offsets]
    # (question word, index of the token it starts in) for every occurrence in the context
    hits = [
        (m.group().lower(), bisect.bisect_right(ends, m.start()))
        for m in re.finditer(r"\w+", context)
        if m.group().lower() in wanted
    ]

    def shared(start: int) -> int:
        return len({word for word, at in hits if start <= at < start + budget})

    starts = sorted(set(range(0, n - budget + 1, max(1, budget // 4))) | {n - budget})
    best = max(starts, key=lambda s: (shared(s), -s))
    inside = [at for _, at in hits if best <= at < best + budget]
    if not inside:
        return best
    centre = (inside[0] + inside[-1]) // 2
    return min(max(0, centre - budget // 2), n - budget)


def answer_window_start(offsets: Sequence[tuple[int, int]], budget: int, answer_start: int, salt: str) -> int:
    """Start token of a `budget`-token window holding the answer at a position that varies between
    examples (fixed per example: derived from `salt`), so the model does not learn that answers sit
    in the middle of the passage, as they would if every window were centred on them."""
    n = len(offsets)
    answer_tok = next((i for i, (_, end) in enumerate(offsets) if end > answer_start), n - 1)
    lowest = max(0, answer_tok - budget + min(8, budget // 2))  # leave room for the answer's tokens
    highest = min(answer_tok, n - budget)
    if highest <= lowest:
        return min(max(0, lowest), n - budget)
    return lowest + zlib.crc32(salt.encode()) % (highest - lowest + 1)


def _context_window(
    tokenizer: Tokenizer, context: str, budget: int, answer_start: int | None, question: str, select: str
) -> tuple[list[int], bool]:
    """Context tokens cut to `budget`, and whether they were cut. With the answer position known
    (training) the window holds the answer; otherwise `select` says which window: "truncate" (the
    beginning) or "best_match" (the one most like the question), narrowed to whole words."""
    ids, offsets = _encode_with_offsets(tokenizer, context)
    if len(ids) <= budget:
        return list(ids), False
    if budget <= 0:
        return [], True
    if answer_start is not None and answer_start >= 0:
        start = answer_window_start(offsets, budget, answer_start, question)
        return list(ids[start : start + budget]), True
    start = best_match_start(context, offsets, budget, question) if select == "best_match" else 0
    start, end = whole_word_window(context, offsets, start, start + budget)
    return list(ids[start:end]), True


def _cuts_word(text: str, pos: int) -> bool:
    """Whether cutting `text` at character `pos` splits a word or number (two characters of one kind)."""
    return (
        0 < pos < len(text)
        and not text[pos - 1].isspace()
        and not text[pos].isspace()
        and _char_class(text[pos - 1]) == _char_class(text[pos])
    )


def whole_word_window(text: str, offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The token range [start, end) of `text` narrowed so that it neither starts nor ends inside a word.

    A window read at inference must hold whole words: an answer taken from it could otherwise be a piece
    of one ("Super Bow" for "Super Bowl"). Unchanged when not even one whole word fits.
    """
    end = min(end, len(offsets))
    first = start
    while first < end and _cuts_word(text, offsets[first][0]):
        first += 1
    last = end
    while last > first and last < len(offsets) and _cuts_word(text, offsets[last][0]):
        last -= 1
    whole_words = last > first and text[offsets[first][0] : offsets[last - 1][1]].strip()
    return (first, last) if whole_words else (start, end)


def answer_position(ex: QAExample) -> int | None:
    """Character offset of the first gold answer; found by search when the file's offset is missing or wrong."""
    answer = ex.answers[0]
    start = ex.answer_starts[0] if ex.answer_starts else -1
    if start >= 0 and ex.context.startswith(answer, start):
        return start
    found = ex.context.find(answer)
    return found if found >= 0 else None


def build_prompt(
    tokenizer: Tokenizer,
    question: str,
    context: str | None,
    budget: int,
    answer_start: int | None = None,
    context_tokens: int = 0,
    select: str = "best_match",
) -> tuple[list[int], bool] | None:
    """Prompt ids fitting `budget` tokens, or None when even the question does not fit.

    The context gets what the question leaves of the budget, at most `context_tokens` (0: no cap).
    """
    q_ids = [tokenizer.question_id] + tokenizer.encode(question) + [tokenizer.answer_id]
    if len(q_ids) > budget:
        return None
    if context is None:
        return q_ids, False
    room = budget - len(q_ids) - 1
    if context_tokens:
        room = min(room, context_tokens)
    ctx_ids, truncated = _context_window(tokenizer, context, room, answer_start, question, select)
    return [tokenizer.context_id] + ctx_ids + q_ids, truncated


def answer_ids(tokenizer: Tokenizer, answer: str) -> list[int]:
    """The answer's tokens with a leading space, as it reads inside a passage (" Denver Broncos"), so
    the tokens to produce are the very tokens to copy from the context; decoding strips the space."""
    return tokenizer.encode(" " + answer.strip())


def encode_for_training(
    tokenizer: Tokenizer, ex: QAExample, mode: str, block_size: int, max_answer_tokens: int, context_tokens: int = 0
) -> EncodedQA | str:
    """The training sequence, or the reason the example cannot be used."""
    if not ex.answers or not ex.answers[0].strip():
        return "empty answer"
    target = answer_ids(tokenizer, ex.answers[0]) + [tokenizer.eot_id]
    if len(target) - 1 > max_answer_tokens:
        return f"answer longer than {max_answer_tokens} tokens"
    budget = block_size + 1 - len(target)
    context = ex.context if mode == "context" else None
    built = build_prompt(tokenizer, ex.question, context, budget, answer_position(ex), context_tokens)
    if built is None:
        return "question longer than the block"
    prompt, truncated = built
    return EncodedQA(prompt + target, len(prompt), truncated)


def encode_for_inference(
    tokenizer: Tokenizer,
    question: str,
    context: str | None,
    block_size: int,
    max_new_tokens: int,
    context_tokens: int = 0,
    select: str = "best_match",
) -> EncodedQA | None:
    """The prompt for a question; a context longer than the room left is cut to one window (`select`)."""
    built = build_prompt(tokenizer, question, context, block_size - max_new_tokens, None, context_tokens, select)
    if built is None:
        return None
    return EncodedQA(built[0], len(built[0]), built[1])


def encode_examples(
    tokenizer: Tokenizer,
    examples: list[QAExample],
    mode: str,
    block_size: int,
    max_answer_tokens: int,
    what: str,
    context_tokens: int = 0,
) -> list[EncodedQA]:
    encoded = []
    skipped: Counter = Counter()
    for ex in examples:
        item = encode_for_training(tokenizer, ex, mode, block_size, max_answer_tokens, context_tokens)
        if isinstance(item, str):
            skipped[item] += 1
        else:
            encoded.append(item)
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        log.warning("%s: %d of %d QA examples skipped (%s)", what, sum(skipped.values()), len(examples), reasons)
    truncated = sum(e.context_truncated for e in encoded)
    if truncated:
        log.info(
            "%s: %d contexts cut to a window holding the answer (block_size=%d, qa.context_tokens=%d)",
            what,
            truncated,
            block_size,
            context_tokens,
        )
    return encoded


def prompt_passage(tokenizer: Tokenizer, prompt: Sequence[int]) -> list[int]:
    """The passage tokens inside a with-context prompt (between the context and question markers)."""
    if not prompt or prompt[0] != tokenizer.context_id or tokenizer.question_id not in prompt:
        return []
    return list(prompt[1 : list(prompt).index(tokenizer.question_id)])


def without_question(tokenizer: Tokenizer, prompt: Sequence[int]) -> list[int]:
    """A with-context prompt with its question left out (passage, question marker, answer marker): what the
    model expects as an answer from the passage alone, whatever is asked."""
    return list(prompt[: list(prompt).index(tokenizer.question_id) + 1]) + [tokenizer.answer_id]


def _char_class(ch: str) -> int:
    return 0 if ch.isalpha() else 1 if ch.isdigit() else 2


def word_bounds(tokenizer: Tokenizer, ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Where an answer extracted from these tokens may start, and where it may end (exclusive): whole words.

    A token begins a word (or number, or punctuation run) when its text starts with a space, or when its
    first character is of another kind (letter, digit, other) than the last character of the token before
    it, as in "(" + "1998". A span starts at such a token when it holds a letter or digit and is not an
    article (SQuAD scoring drops articles and punctuation, so a span never needs to start with them, and
    one of them alone would score nothing). It ends before any token that begins a word or is whitespace,
    or at the end.
    """
    texts = [tokenizer.decode([i]) for i in ids]
    begins = [
        i == 0
        or not texts[i]
        or not texts[i - 1]
        or texts[i][0].isspace()
        or _char_class(texts[i][0]) != _char_class(texts[i - 1][-1])
        for i in range(len(texts))
    ]
    starts = [
        i
        for i, text in enumerate(texts)
        if begins[i] and any(ch.isalnum() for ch in text) and text.strip().lower() not in ("a", "an", "the")
    ]
    ends = [i for i in range(1, len(texts)) if begins[i]] + ([len(texts)] if texts else [])
    return starts, ends


def context_windows(
    tokenizer: Tokenizer, question: str, context: str, block_size: int, max_new_tokens: int, context_tokens: int = 0
) -> list[EncodedQA] | None:
    """Prompts covering the whole context in overlapping windows (stride: half a window; each narrowed to
    whole words), or None when the question alone does not fit. A context that fits gives exactly one prompt."""
    q_ids = [tokenizer.question_id] + tokenizer.encode(question) + [tokenizer.answer_id]
    budget = block_size - max_new_tokens - len(q_ids) - 1
    if context_tokens:
        budget = min(budget, context_tokens)
    if budget <= 0:
        return None
    ctx, offsets = _encode_with_offsets(tokenizer, context)
    stride = max(1, budget // 2)
    starts = list(range(0, max(len(ctx) - budget, 0) + 1, stride))
    if starts[-1] + budget < len(ctx):
        starts.append(len(ctx) - budget)
    many = len(starts) > 1
    windows = (whole_word_window(context, offsets, s, s + budget) for s in starts)
    prompts = ([tokenizer.context_id, *ctx[s:e], *q_ids] for s, e in windows)
    return [EncodedQA(p, len(p), many) for p in prompts]


def collate(items: list[EncodedQA], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest item; targets are -100 except on answer tokens."""
    width = max(len(it.ids) for it in items) - 1
    x = torch.full((len(items), width), pad_id, dtype=torch.long)
    y = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        ids = torch.tensor(it.ids, dtype=torch.long)
        n = len(it.ids) - 1
        x[row, :n] = ids[:-1]
        y[row, it.prompt_len - 1 : n] = ids[it.prompt_len :]
    return x, y


class QABatcher:
    """Epoch-based shuffled batches of encoded QA examples. Position = (epoch, cursor).

    With `group_by_length` = n > 0, each epoch's shuffled examples are taken n batches at a time, sorted by
    length and cut into batches, and those batches are shuffled: a batch holds examples of similar length,
    so less of it is padding (as Hugging Face's `group_by_length`). The order stays a function of the seed
    and the epoch, so the (epoch, cursor) position still resumes exactly.
    """

    def __init__(self, items: list[EncodedQA], batch_size: int, pad_id: int, seed: int, group_by_length: int = 0):
        if not items:
            raise ValueError("no QA examples")
        self.items = items
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.items), generator=g).tolist()
        return self._grouped(order, g) if self.group_by_length > 0 else order

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        """`order` regrouped into batches of similar length, in shuffled batch order; a last, partial batch
        stays last, so every batch starts at a multiple of batch_size."""
        size = self.batch_size
        group = size * self.group_by_length
        batches = []
        for lo in range(0, len(order), group):
            chunk = sorted(order[lo : lo + group], key=lambda i: len(self.items[i].ids))
            batches += [chunk[b : b + size] for b in range(0, len(chunk), size)]
        tail = [batches.pop()] if len(batches[-1]) < size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return [i for batch in shuffled + tail for i in batch]

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor >= len(self.items):
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += len(idx)
        return collate([self.items[i] for i in idx], self.pad_id)

    def fixed_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n` batches in file order: a fixed evaluation set."""
        out = []
        for b in range(n):
            chunk = self.items[b * self.batch_size : (b + 1) * self.batch_size]
            if not chunk:
                break
            out.append(collate(chunk, self.pad_id))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._permutation(self.epoch)
