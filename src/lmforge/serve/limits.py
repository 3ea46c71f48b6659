"""Back-pressure: a bounded number of requests generating at once, a bounded wait queue (then 429),
and a cap on request body size (then 413)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

from lmforge.serve.schemas import RequestError


class Admission:
    """`max_running` requests work at once and up to `max_waiting` more wait their turn; others get 429.

    `admit()` is called before a response starts (so a refusal is a clean 429); the returned ticket's
    `slot()` is held while the request uses the model, and `release()` ends the ticket.
    """

    def __init__(self, max_running: int, max_waiting: int):
        self.max_running = max_running
        self.capacity = max_running + max_waiting
        self.semaphore = asyncio.Semaphore(max_running)
        self.admitted = 0
        self.running = 0

    def admit(self) -> Ticket:
        if self.admitted >= self.capacity:
            raise RequestError(
                f"server busy: {self.admitted} requests in flight (limit {self.capacity}); retry later", None, 429
            )
        self.admitted += 1
        return Ticket(self)

    @property
    def waiting(self) -> int:
        return self.admitted - self.running


class Ticket:
    def __init__(self, admission: Admission):
        self.admission = admission
        self.released = False

    @asynccontextmanager
    async def slot(self):
        async with self.admission.semaphore:
            self.admission.running += 1
            try:
                yield
            finally:
                self.admission.running -= 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.admitted -= 1


class BodyTooLarge(Exception):
    pass


class StartTracking:
    """An ASGI `send` wrapper that notes whether the response has started (its headers went out): after
    that, an error can no longer be answered with a response of its own."""

    def __init__(self, send):
        self.send = send
        self.started = False

    async def __call__(self, message):
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413 (by Content-Length, or while
    reading a body sent without one)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0
        too_large = False
        tracked_send = StartTracking(send)

        async def counting_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def refusing_send(message):
            # FastAPI answers a body it could not read with a 400 of its own: the 413 goes out instead
            if not too_large:
                await tracked_send(message)
            elif message["type"] == "http.response.start" and not tracked_send.started:
                await self._refuse(tracked_send)

        try:
            await self.app(scope, counting_receive, refusing_send)
        except BodyTooLarge:
            if not tracked_send.started:
                await self._refuse(tracked_send)

    async def _refuse(self, send):
        body = json.dumps(
            {
                "error": {
                    "message": f"request body larger than {self.limit} bytes",
                    "type": "invalid_request_error",
                    "param": "body",
                    "code": "request_too_large",
                }
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})
