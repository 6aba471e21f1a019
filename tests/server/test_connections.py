"""Connection deadlines of `megagym serve` (connections.py) on a real uvicorn with a trivial app:
idle, slow or partial requests are closed; oversized headers answer 431. No engine."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from megagym.server.config import ServerConfig
from megagym.server.connections import MAX_HEADER_BYTES, uvicorn_settings
from megagym.server.process import free_port


async def echo_app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server():
    cfg = ServerConfig(model="unused", header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=5)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(echo_app, host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="off", **uvicorn_settings(cfg)))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield port
    srv.should_exit = True
    thread.join(10)


def conversation(port: int, *chunks: bytes) -> tuple[bytes, float]:
    """Send chunks; return everything read until the server closes and how long that took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        for chunk in chunks:
            s.sendall(chunk)
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
        return out, time.monotonic() - t0


def test_idle_and_partial_headers_are_closed(server):
    out, took = conversation(server)
    assert out == b"" and took < 5  # nothing sent: closed after header_timeout_s (0.5 s)
    out, took = conversation(server, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Le")
    assert out == b"" and took < 5


def test_slow_body_gets_408(server):
    out, took = conversation(server, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
    assert out.startswith(b"HTTP/1.1 408") and took < 5


def test_huge_headers_get_431(server):
    out, _ = conversation(server, b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10))
    assert out.startswith(b"HTTP/1.1 431")


def test_complete_requests_and_idle_keep_alive_still_work(server):
    request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(request)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)  # the idle gap under test (> header_timeout_s 0.5 s, < keep_alive_s 5 s), not a wait
        s.sendall(request)
        reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello")
