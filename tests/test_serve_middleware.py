"""The server's ASGI middleware on small stand-in apps: a body over the limit sent without a Content-Length,
and an unexpected exception before and after the response has started."""

import asyncio
import logging

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lmforge.serve.app import InternalErrors
from lmforge.serve.limits import BodyLimit


def request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def call_asgi(app, path: str) -> list[dict]:
    """The messages an ASGI app sends for a GET of `path` (without a client that insists on a whole response)."""
    sent: list[dict] = []
    requested = False

    async def receive():  # the request once, then a client that stays connected
        nonlocal requested
        if requested:
            await asyncio.Event().wait()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    asyncio.run(app(scope, receive, send))
    return sent


class Note(BaseModel):
    text: str


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(req: Request):
        return {"bytes": len(await req.body())}

    @app.post("/note")  # FastAPI reads and parses this body itself (and turns a failed read into a 400)
    async def note(body: Note):
        return {"chars": len(body.text)}

    return app


def test_body_limit_counts_a_body_sent_without_content_length():
    app = echo_app()
    app.add_middleware(BodyLimit, limit=1000)  # as the server adds it

    async def chunks(n):  # a generator body goes out chunked: no Content-Length to read the size from
        for _ in range(n):
            yield b"x" * 100

    small = request(app, "POST", "/echo", content=chunks(5))
    assert small.status_code == 200 and small.json() == {"bytes": 500}
    for path in ("/echo", "/note"):
        big = request(app, "POST", path, content=chunks(20), headers={"content-type": "application/json"})
        assert big.status_code == 413, path
        assert big.json()["error"]["code"] == "request_too_large" and "1000 bytes" in big.json()["error"]["message"]
    assert request(app, "POST", "/note", json={"text": "short"}).json() == {"chars": 5}


def test_an_unexpected_error_is_a_500_before_the_response_starts_and_only_logged_after(caplog):
    app = FastAPI()
    app.add_middleware(InternalErrors)  # as the server adds it: inside Starlette's own error middleware

    @app.get("/fails")
    async def fails():
        raise RuntimeError("disk on fire")

    @app.get("/fails-midway")
    async def fails_midway():
        async def pieces():
            yield b"first piece\n"
            raise RuntimeError("lost the model")

        return StreamingResponse(pieces(), media_type="text/plain")

    with caplog.at_level(logging.ERROR, logger="lmforge"):
        r = request(app, "GET", "/fails")
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal error: disk on fire",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert "error serving /fails" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="lmforge"):
        sent = call_asgi(app, "/fails-midway")
    # the status line and first piece already went out: no second response is started over them
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200]
    assert b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body") == b"first piece\n"
    assert "error serving /fails-midway" in caplog.text
