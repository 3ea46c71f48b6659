"""The lmforge server: the OpenAI-compatible API, the explorer API (/api/*) and the web page at /."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lmforge.config import GenerateConfig, ServeConfig
from lmforge.serve.host import AnswerSettings, ModelHost
from lmforge.serve.limits import Admission, BodyLimit, StartTracking
from lmforge.serve.memory import free_memory, memory_report
from lmforge.serve.openai_api import openai_router
from lmforge.serve.schemas import AttentionRequest, CheckpointRequest, RequestError

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("lmforge")

# pydantic's names for union members and wrappers: not fields, so left out of the `param` path
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def error_body(message: str, param: str | None, code: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """First validation problem as one line naming the field (OpenAI's error shape)."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        msg = f"invalid JSON body ({err.get('ctx', {}).get('error', 'parse error')})"
        return JSONResponse(error_body(msg, "body", "invalid_json"), status_code=400)
    param = _param(tuple(err["loc"]))
    if err["type"] == "missing" and param is None:
        return JSONResponse(error_body("a JSON body is required", "body"), status_code=400)
    text = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        text = "unknown field"
    return JSONResponse(error_body(f"{param}: {text}" if param else text, param), status_code=400)


class InternalErrors:
    """ASGI middleware: an unexpected exception becomes a logged 500 with an OpenAI-style JSON body.

    (A FastAPI handler for Exception re-raises after answering, and uvicorn then drops the connection.)
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        tracked_send = StartTracking(send)
        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            log.exception("error serving %s", scope.get("path"))
            if scope["type"] == "http" and not tracked_send.started:
                body = error_body(f"internal error: {exc}", None, None, "server_error")
                await JSONResponse(body, status_code=500)(scope, receive, send)


def create_app(
    host: ModelHost, cfg: ServeConfig, defaults: GenerateConfig | None = None, answering: AnswerSettings | None = None
) -> FastAPI:
    defaults = defaults or GenerateConfig()
    answering = answering or AnswerSettings()
    admission = Admission(cfg.max_concurrent, cfg.max_queue)
    app = FastAPI(title="lmforge", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.add_middleware(InternalErrors)
    app.state.host = host
    app.state.admission = admission

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc)

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError):
        code = {404: "model_not_found", 429: "rate_limit_exceeded"}.get(exc.status)
        kind = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(error_body(str(exc), exc.param, code, kind), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), None), status_code=exc.status_code)

    app.include_router(openai_router(host, cfg, defaults, admission, answering))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": host.active, "running": admission.running, "waiting": admission.waiting}

    @app.get("/api/info")
    async def info():
        m = host.model()
        return {
            "run": host.name,
            "active": host.active,
            "checkpoints": host.checkpoints(),
            "model": {**m.cfg.__dict__, "parameters": m.num_parameters()},
            "limits": {
                "max_tokens": min(cfg.max_tokens, m.cfg.block_size - 1),
                "max_attention_tokens": min(cfg.max_attention_tokens, m.cfg.block_size),
                "max_concurrent": cfg.max_concurrent,
                "max_queue": cfg.max_queue,
            },
            "defaults": {k: v for k, v in defaults.__dict__.items() if k != "seed"},
            "answering": dataclasses.asdict(answering),
        }

    @app.post("/api/checkpoint")
    async def switch_checkpoint(req: CheckpointRequest):
        name = await anyio.to_thread.run_sync(host.switch, req.checkpoint)
        log.info("serving checkpoint %s", name)
        return {"active": name, "checkpoints": host.checkpoints()}

    @app.post("/api/attention")
    async def attention(req: AttentionRequest):
        req.check()
        model = host.model(host.resolve_model_name(req.model))
        text = req.text
        if req.question is not None:  # the prompt the chat route answers from (a long context: the same window)
            context = (req.context or "").strip() or None
            ids = host.qa_prompt(
                model, req.question.strip(), context, req.decoding, req.max_tokens or defaults.max_new_tokens, answering
            )
            text = host.tokenizer.decode(ids, skip_special=False)
        ticket = admission.admit()
        try:
            async with ticket.slot():
                return await anyio.to_thread.run_sync(
                    lambda: host.attention(
                        model,
                        text,
                        req.completion,
                        cfg.max_attention_tokens,
                        req.discount_first,
                        req.log_scale,
                        req.normalize,
                        answer=req.question is not None,
                    )
                )
        finally:
            ticket.release()

    @app.get("/api/memory")
    async def memory():
        return await anyio.to_thread.run_sync(memory_report, host.loaded_models())

    @app.post("/api/memory/free")
    async def memory_free():
        dropped = host.free_inactive()
        result = await anyio.to_thread.run_sync(free_memory)
        return {**result, "unloaded_checkpoints": dropped}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
