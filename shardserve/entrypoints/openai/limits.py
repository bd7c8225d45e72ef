"""What one client may hold: a bounded request body (counted as it arrives) and deadlines for idle connections
and for request heads that trickle in (slowloris). The server's flags (cli.py) set the deadlines and the bounds on
queued work and on draining."""
from __future__ import annotations

import asyncio
import logging

import h11
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from shardserve.entrypoints.openai.errors import error_response

logger = logging.getLogger("shardserve.server")
MAX_BODY_BYTES = 4 << 20
TIMEOUT_REQUEST_HEADER = 10.0           # s: a request's head must be complete this long after it may start


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes", headers={"Connection": "close"})


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, whether it declares its length or not.

    A `Content-Length` over the limit is refused before anything is read; a chunked body is counted as it arrives
    and refused as soon as it passes the limit (the route reading it gets the 413 as its exception), so the rest is
    never read nor buffered. The 413 says `Connection: close`: the server drops the connection and its unread rest.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if declared_too_large(next((v for k, v in scope["headers"] if k == b"content-length"), None), self.limit):
            return await self._refuse(scope, receive, send)
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:                    # it escaped the app's own handlers (it read the body itself)
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await too_large_response(self.limit)(scope, receive, send)


def declared_too_large(length: str | bytes | None, limit: int) -> bool:
    """A Content-Length (str or the raw header bytes) that is not a number, or is past the limit."""
    return length is not None and (not length.isdigit() or int(length) > limit)


def too_large_response(limit: int):
    """The 413 for a body past `limit`, in OpenAI's error shape, closing the connection."""
    exc = BodyTooLarge(limit)
    return error_response(exc.status_code, exc.detail, "invalid_request_error", headers=exc.headers)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two more deadlines, so idle and slow (slowloris) clients cannot hold connections:

    - a new connection that sends nothing is closed after `timeout_keep_alive` (uvicorn only arms that timer
      after a response);
    - a request's head must be complete within `header_timeout` s of the connection opening or the previous
      response ending, however its bytes trickle in (uvicorn's keep-alive timer stops at the first byte).
    """
    header_timeout: float = TIMEOUT_REQUEST_HEADER

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return
        logger.info("closing a connection whose request head did not arrive within %s s", self.header_timeout)
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})
