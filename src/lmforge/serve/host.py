"""The models a server holds: one run directory's tokenizer and its checkpoints, loaded on first use.

Requests never share KV state: with batching (the default) each request owns its rows of the batch
cache of its checkpoint's Batcher; without, each runs generate_stream in its own thread with a fresh cache.
Both only read the shared weights.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.attention import (
    Word,
    discount_first_token,
    display,
    input_focus,
    most_attended,
    to_words,
    token_attention,
    tokenize_words,
)
from lmforge.data.qa import answer_ids, build_prompt, encode_for_inference
from lmforge.errors import LmforgeError
from lmforge.evaluate import SpanOptions, span_answer
from lmforge.generate import SamplingParams, generate_stream, stream_text
from lmforge.model import GPT
from lmforge.pipeline import check_tokenizer, resolve_checkpoint
from lmforge.rundir import RunDir
from lmforge.serve.batcher import Batcher
from lmforge.serve.schemas import RequestError
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import model_from_checkpoint, read_state
from lmforge.train.precision import model_autocast

KNOWN_CHECKPOINTS = ("best", "last", "pretrained")


@dataclass
class Piece:
    text: str
    tokens: int  # completion tokens so far
    finish_reason: str | None = None  # set on the last piece: "stop" or "length"


@dataclass
class AnswerSettings:
    """How span answers are made: the run's [eval] settings, so the server answers as `lmforge eval` scored."""

    decoding: str = "greedy"  # the recipe's eval.decoding: the web page's default answer style
    max_new_tokens: int = 32  # longest span, in tokens
    context_tokens: int = 0  # passage window (0: as much as fits the block)
    span: SpanOptions = SpanOptions()  # how a span is chosen (calibration, question words)
    dtype: str = "float32"  # eval.dtype: the precision span answers are computed in
    with_context: bool = True  # qa.mode = "context"; a closed-book model is asked without the passage, as eval asks it

    @classmethod
    def of(cls, recipe) -> AnswerSettings:
        e = recipe.eval
        return cls(
            e.decoding,
            e.max_new_tokens,
            recipe.answer_context_tokens,
            SpanOptions.of(e),
            e.dtype,
            recipe.qa.mode == "context",
        )


class ModelHost:
    def __init__(self, run_dir: str | Path, checkpoint: str = "best", device: str = "cpu", batch_rows: int = 0):
        """batch_rows > 0: decode up to that many concurrent requests of a checkpoint in one batched step."""
        self.run = RunDir(Path(run_dir))
        if not self.run.root.is_dir():
            raise LmforgeError(f"run directory not found: {self.run.root}")
        self.name = self.run.root.name
        self.device = device
        self.tokenizer = Tokenizer.load(self.run.tokenizer)
        self._models: dict[str, GPT] = {}
        self._batchers: dict[str, Batcher] = {}
        self.batch_rows = batch_rows
        self._paths: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.active = self._register(checkpoint)
        self.model(self.active)  # fail at startup, not on the first request

    # ----------------------------------------------------------------- checkpoints

    def _register(self, checkpoint: str) -> str:
        path = resolve_checkpoint(self.run, checkpoint)
        name = checkpoint if checkpoint in KNOWN_CHECKPOINTS else path.name
        self._paths[name] = path
        return name

    def checkpoints(self) -> list[dict]:
        """The checkpoints that can be served: the run's best/last/pretrained plus any PATH given."""
        for name in KNOWN_CHECKPOINTS:
            if name not in self._paths:
                try:
                    self._register(name)
                except LmforgeError:
                    pass
        out = []
        for name, path in self._paths.items():
            stage = None
            try:
                stage = read_state(path).get("stage")
            except LmforgeError:
                pass
            out.append({"id": name, "stage": stage, "loaded": name in self._models, "active": name == self.active})
        return out

    def model(self, name: str | None = None) -> GPT:
        name = name or self.active
        if name not in self._paths:
            self.checkpoints()
        if name not in self._paths:
            raise RequestError(f"unknown model '{name}' (available: {', '.join(self._paths)})", "model", 404)
        with self._lock:  # one load per checkpoint even when requests arrive together
            if name not in self._models:
                check_tokenizer(self._paths[name], self.tokenizer, self.run.tokenizer)
                self._models[name] = model_from_checkpoint(self._paths[name]).to(self.device).eval()
            return self._models[name]

    def resolve_model_name(self, requested: str | None) -> str:
        """A request's `model`: a checkpoint id, or the run's name / empty for the active checkpoint."""
        if not requested or requested in (self.name, "lmforge"):
            return self.active
        self.model(requested)  # raises a 404 RequestError for an unknown name
        return requested

    def switch(self, name: str) -> str:
        if not name:
            raise RequestError("checkpoint: give a checkpoint id", "checkpoint")
        self.model(name)
        self.active = name
        return name

    def free_inactive(self) -> list[str]:
        """Forget loaded checkpoints other than the active one (they reload on demand)."""
        with self._lock:
            dropped = [n for n in self._models if n != self.active]
            for n in dropped:
                del self._models[n]
                if n in self._batchers:
                    self._batchers.pop(n).close()
        return dropped

    def loaded_models(self) -> dict[str, GPT]:
        return dict(self._models)

    # ----------------------------------------------------------------- prompts

    def completion_ids(self, model: GPT, prompt: str, max_tokens: int) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise RequestError("prompt is empty", "prompt")
        if len(ids) + max_tokens > model.cfg.block_size:
            raise RequestError(
                f"prompt is {len(ids)} tokens: with max_tokens={max_tokens} it does not fit the "
                f"model's {model.cfg.block_size}-token block (shorten it or lower max_tokens)",
                "prompt",
            )
        return ids

    def chat_ids(self, model: GPT, question: str, context: str | None, max_tokens: int) -> list[int]:
        built = build_prompt(self.tokenizer, question, context or None, model.cfg.block_size - max_tokens)
        if built is None:
            raise RequestError(
                f"the question does not fit the model's {model.cfg.block_size}-token block with "
                f"max_tokens={max_tokens}",
                "messages",
            )
        return built[0]

    def span_prompt(self, model: GPT, question: str, context: str, settings: AnswerSettings) -> list[int]:
        """The prompt `lmforge eval` builds for a span answer (a long context cut to its window most like the
        question)."""
        enc = encode_for_inference(
            self.tokenizer, question, context, model.cfg.block_size, settings.max_new_tokens, settings.context_tokens
        )
        if enc is None:
            raise RequestError(f"the question does not fit the model's {model.cfg.block_size}-token block", "messages")
        return enc.ids

    def qa_prompt(
        self, model: GPT, question: str, context: str | None, decoding: str, max_tokens: int, settings: AnswerSettings
    ) -> list[int]:
        """The prompt a chat request is answered from: eval's span prompt (`decoding` "span", with a context),
        else the generation prompt leaving room for `max_tokens`. A closed-book run's prompt has no context."""
        context = context if settings.with_context else None
        if decoding == "span" and context:
            return self.span_prompt(model, question, context, settings)
        return self.chat_ids(model, question, context, max_tokens)

    def span_answer(self, name: str, prompt_ids: list[int], settings: AnswerSettings) -> tuple[str, int]:
        """(answer, answer tokens): the span of the prompt's passage that checkpoint `name` finds likeliest."""
        model = self.model(name)
        with model_autocast(model, settings.dtype):  # in this (worker) thread
            ids, _ = span_answer(model, self.tokenizer, prompt_ids, settings.max_new_tokens, settings.span)
        return self.tokenizer.decode(ids).strip(), len(ids)

    # ----------------------------------------------------------------- generation

    def _tokens(self, name: str, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        model = self.model(name)
        if not self.batch_rows:
            return generate_stream(model, prompt_ids, params)
        with self._lock:
            if name not in self._batchers:
                self._batchers[name] = Batcher(model, self.batch_rows)
            batcher = self._batchers[name]
        return batcher.tokens(prompt_ids, params)

    def stream(self, name: str, prompt_ids: list[int], params: SamplingParams, stop: list[str]) -> Iterator[Piece]:
        """Text pieces of one completion from checkpoint `name`; the last one carries the finish reason."""
        model = self.model(name)
        params.stop_ids = {self.tokenizer.eot_id}
        block = model.cfg.block_size
        limit = min(params.max_new_tokens, block - 1)
        prompt_len = min(len(prompt_ids), block - limit)
        count = 0
        for text, count, hit_stop in stream_text(self.tokenizer.decode, self._tokens(name, prompt_ids, params), stop):
            if hit_stop:
                yield Piece(text, count, "stop")
                return
            if text:
                yield Piece(text, count)
        full = count >= limit or prompt_len + count >= block
        yield Piece("", count, "length" if full else "stop")

    # ----------------------------------------------------------------- attention

    def attention(
        self,
        model: GPT,
        text: str,
        completion: str | None,
        max_tokens: int,
        discount_first: bool,
        log: bool,
        normalize: bool,
        answer: bool = False,
    ) -> dict:
        """Word attention of `text` (all layers and heads) and, with a completion, its input focus. `answer`:
        the text is a QA prompt and the completion an answer, made of the tokens the model gives (" Paris")."""
        ids, words = tokenize_words(self.tokenizer, text)
        if not ids:
            raise RequestError("text is empty", "text")
        new_ids = []
        if completion:
            new_ids = answer_ids(self.tokenizer, completion) if answer else self.tokenizer.encode(completion)
        total = len(ids) + len(new_ids)
        limit = min(max_tokens, model.cfg.block_size)
        if total > limit:
            raise RequestError(f"text is {total} tokens; at most {limit} can be analysed", "text")
        attn = token_attention(model, ids + new_ids)
        prompt_attn = attn[..., : len(ids), : len(ids)]
        if discount_first:
            prompt_attn = discount_first_token(prompt_attn)
        per_head = to_words(prompt_attn, words)
        mean = per_head.mean(1)
        layers_mean = mean.mean(0)
        out = {
            "words": [w.text for w in words],
            "tokens": [self.tokenizer.id_to_token(i) for i in ids],
            "n_layer": model.cfg.n_layer,
            "n_head": model.cfg.n_head,
            "per_head": _rounded(display(per_head, log, normalize)),
            "mean": _rounded(display(mean, log, normalize)),
            "layers_mean": _rounded(display(layers_mean, log, normalize)),
            "top": {
                "per_head": [[most_attended(h) for h in layer] for layer in per_head],
                "mean": [most_attended(layer) for layer in mean],
                "layers_mean": most_attended(layers_mean),
            },
        }
        if new_ids:
            out["focus"] = self._focus(attn, words, len(ids), new_ids, discount_first)
        return out

    def _focus(
        self, attn: torch.Tensor, words: list[Word], prompt_len: int, new_ids: list[int], discount_first: bool
    ) -> dict:
        focus = input_focus(attn, words, prompt_len, len(new_ids), discount_first).mean(1)  # mean over heads
        return {
            "tokens": [self.tokenizer.decode([i]) for i in new_ids],
            "per_layer": _rounded(focus),  # (layers, new tokens, prompt words)
            "mean": _rounded(focus.mean(0).mean(0)),  # (prompt words,): over layers and new tokens
        }


def _rounded(x: torch.Tensor) -> list:
    return torch.round(x.float(), decimals=5).tolist()
