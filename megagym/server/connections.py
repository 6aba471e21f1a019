"""Connection limits for `megagym serve`: what uvicorn does not bound on its own.

Owns: the HTTP protocol class given to uvicorn (its httptools protocol plus deadlines) and the
uvicorn keyword arguments built from `ServerConfig`:
- a connection must deliver complete request headers within `header_timeout_s` of opening (or of
  the previous response) — idle, slow or partial headers are closed; headers larger than
  `MAX_HEADER_BYTES` answer 431 and close;
- a request body must be complete within `body_timeout_s` of its headers, else 408 and close
  (the app sees a disconnect and aborts the request);
- idle keep-alive connections close after `keep_alive_s`; more than `max_connections` open
  connections or requests in flight answer 503 (uvicorn's `limit_concurrency`).
Must not: know about requests' content (limits.py) or the engine.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from megagym.server.config import ServerConfig

MAX_HEADER_BYTES = 64 * 1024


class DeadlineProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    body_timeout_s = 20.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._in_headers, self._header_bytes = True, 0
        self._arm(self.header_timeout_s, self._close_stalled)  # a connection that sends nothing

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._reply_and_close(431, b"request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_headers:  # the next request on a kept-alive connection: its first byte
            self._in_headers, self._header_bytes = True, 0
            self._arm(self.header_timeout_s, self._close_stalled)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        super().on_headers_complete()
        self._arm(self.body_timeout_s, self._body_too_slow)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _close_stalled(self) -> None:
        self._deadline = None
        if self._in_headers and not self.transport.is_closing():
            self.transport.close()

    def _body_too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        if not cycle.response_started:
            self._reply_and_close(408, b"request body not received in time")
        else:
            self.transport.close()

    def _reply_and_close(self, status: int, message: bytes) -> None:
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(message), message))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's receive() says disconnect, its send() is a no-op
            self.cycle.message_event.set()
        self.transport.close()


def uvicorn_settings(cfg: ServerConfig) -> dict[str, Any]:
    protocol = type("ServerProtocol", (DeadlineProtocol,), {
        "header_timeout_s": float(cfg.header_timeout_s), "body_timeout_s": float(cfg.body_timeout_s)})
    return dict(http=protocol, limit_concurrency=cfg.max_connections, timeout_keep_alive=cfg.keep_alive_s)
