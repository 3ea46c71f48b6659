"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (QA prompt format), /v1/models.

Streaming responses are server-sent events: one `data: {chunk}` per piece of text, then `data: [DONE]`.
Generation runs in worker threads so the event loop keeps answering other requests meanwhile.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from lmforge.config import GenerateConfig, ServeConfig
from lmforge.generate import SamplingParams
from lmforge.model import GPT
from lmforge.serve.host import AnswerSettings, ModelHost, Piece
from lmforge.serve.limits import Admission, Ticket
from lmforge.serve.schemas import ChatRequest, CompletionRequest, RequestError, SamplingFields


def sampling_params(
    req: SamplingFields, max_tokens: int | None, defaults: GenerateConfig, cfg: ServeConfig, model: GPT
) -> SamplingParams:
    """The request's sampling settings; unset ones come from the run's [generate] recipe section."""
    max_new = max_tokens or defaults.max_new_tokens
    if max_new > cfg.max_tokens:
        raise RequestError(f"max_tokens: at most {cfg.max_tokens} (serve.max_tokens)", "max_tokens")
    if max_new >= model.cfg.block_size:
        raise RequestError(f"max_tokens: at most {model.cfg.block_size - 1} for this model's block", "max_tokens")
    if req.min_tokens > max_new:
        raise RequestError(f"min_tokens: must not exceed max_tokens ({max_new})", "min_tokens")
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=pick(req.temperature, defaults.temperature),
        top_k=pick(req.top_k, defaults.top_k),
        top_p=pick(req.top_p, defaults.top_p),
        repetition_penalty=pick(req.repetition_penalty, defaults.repetition_penalty),
        seed=req.seed,
        min_new_tokens=req.min_tokens,
    )


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _pieces(
    ticket: Ticket, host: ModelHost, name: str, ids: list[int], params: SamplingParams, stop: list[str]
) -> AsyncIterator[Piece]:
    """Generate in a worker thread, one piece at a time, holding a generation slot throughout."""
    try:
        async with ticket.slot():
            it = host.stream(name, ids, params, stop)
            while (piece := await anyio.to_thread.run_sync(next, it, None)) is not None:
                yield piece
    finally:
        ticket.release()


async def _span_piece(
    ticket: Ticket, host: ModelHost, name: str, ids: list[int], settings: AnswerSettings
) -> AsyncIterator[Piece]:
    """The span answer as one piece (it is chosen whole, not token by token), made in a worker thread."""
    try:
        async with ticket.slot():
            text, n = await anyio.to_thread.run_sync(host.span_answer, name, ids, settings)
            yield Piece(text, n, "stop")
    finally:
        ticket.release()


async def _answer_pieces(pieces: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """A chat answer's pieces without the space it starts with (" Paris" in the QA format), so the streamed
    deltas join to the same text as the whole message."""
    try:
        started = False
        async for piece in pieces:
            if not started:
                piece = Piece(piece.text.lstrip(), piece.tokens, piece.finish_reason)
                started = bool(piece.text)
            yield piece
    finally:
        await pieces.aclose()


def openai_router(
    host: ModelHost,
    cfg: ServeConfig,
    defaults: GenerateConfig,
    admission: Admission,
    answering: AnswerSettings | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/v1")
    answering = answering or AnswerSettings()

    async def respond(
        req: SamplingFields,
        model_name: str,
        prompt_tokens: int,
        pieces_for: Callable[[Ticket], AsyncIterator[Piece]],
        kind: str,
        chunk: Callable[[str, str | None, dict], dict],
        whole: Callable[[str, str, dict], dict],
    ):
        """`pieces_for(ticket)` yields the completion's pieces, for a prompt of `prompt_tokens` tokens."""
        ticket = admission.admit()
        pieces = pieces_for(ticket)
        meta = {"id": f"{kind}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        if not req.stream:
            text, last = [], None
            async for last in pieces:
                text.append(last.text)
            return whole("".join(text), last.finish_reason, {**meta, "usage": _usage(prompt_tokens, last.tokens)})

        async def events():
            first = True
            try:
                async for piece in pieces:
                    if piece.text or first or piece.finish_reason:
                        yield _sse(chunk(piece.text, piece.finish_reason, meta, first=first))
                        first = False
                    if piece.finish_reason and req.include_usage():
                        yield _sse(
                            {
                                **meta,
                                "object": chunk("", None, meta)["object"],
                                "choices": [],
                                "usage": _usage(prompt_tokens, piece.tokens),
                            }
                        )
                yield _sse("[DONE]")
            except Exception as exc:  # noqa: BLE001 - the response has started: report in-band, as OpenAI does
                yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
            finally:  # a client that hung up frees its slot now, not at garbage collection
                await pieces.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def model_object(checkpoint: dict) -> dict:
        return {
            "id": checkpoint["id"],
            "object": "model",
            "created": int(time.time()),
            "owned_by": "lmforge",
            "stage": checkpoint["stage"],
            "active": checkpoint["active"],
        }

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [model_object(c) for c in host.checkpoints()]}

    @router.get("/models/{model_id}")
    async def model(model_id: str):
        checkpoints = host.checkpoints()
        for checkpoint in checkpoints:
            if checkpoint["id"] == model_id:
                return model_object(checkpoint)
        available = ", ".join(c["id"] for c in checkpoints)
        raise RequestError(f"unknown model '{model_id}' (available: {available})", "model", 404)

    @router.post("/completions")
    async def completions(req: CompletionRequest):
        name = host.resolve_model_name(req.model)
        model = host.model(name)
        params = sampling_params(req, req.max_tokens, defaults, cfg, model)
        ids = host.completion_ids(model, req.prompt, params.max_new_tokens)

        def chunk(text, finish, meta, first=False):
            return {
                **meta,
                "object": "text_completion",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        def whole(text, finish, meta):
            return {
                **meta,
                "object": "text_completion",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        source = lambda ticket: _pieces(ticket, host, name, ids, params, req.stop_list())  # noqa: E731
        return await respond(req, name, len(ids), source, "cmpl", chunk, whole)

    @router.post("/chat/completions")
    async def chat_completions(req: ChatRequest):
        name = host.resolve_model_name(req.model)
        model = host.model(name)
        question, context = req.question(), req.context_text()
        if req.decoding == "span":
            if context is None or not answering.with_context:
                why = "give one" if answering.with_context else "this run was fine-tuned closed-book (qa.mode)"
                raise RequestError(
                    f"decoding: span answers are taken from a context; {why} (or use decoding 'sample')", "decoding"
                )
            ids = host.qa_prompt(model, question, context, "span", 0, answering)
            source = lambda ticket: _span_piece(ticket, host, name, ids, answering)  # noqa: E731
        else:
            params = sampling_params(req, req.max_completion_tokens or req.max_tokens, defaults, cfg, model)
            ids = host.qa_prompt(model, question, context, "sample", params.max_new_tokens, answering)
            source = lambda ticket: _answer_pieces(_pieces(ticket, host, name, ids, params, req.stop_list()))  # noqa: E731

        def chunk(text, finish, meta, first=False):
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {
                **meta,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        def whole(text, finish, meta):
            return {
                **meta,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }

        return await respond(req, name, len(ids), source, "chatcmpl", chunk, whole)

    return router
