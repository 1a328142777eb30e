"""Mutated request streams sent to a live PIBL over loopback sockets.

Whatever arrives, PIBL answers with well-formed HTTP (or closes), never leaves an exception to
the event loop, never hangs, and keeps serving well-formed clients afterwards.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Backend, ProxyThread, RawServer

CORPUS = [
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /cache/f?cc=max-age=60 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n",
    b"HEAD /h HTTP/1.0\r\n\r\n",
    b"PUT /u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
]
SPECIAL = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b":",
    b" ",
    b"\t",
    b"\xff",
    b"0",
    b"-",
    b",",
    b"\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "cut"]))
        if op == "flip" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif op == "insert":
            data[where:where] = draw(st.sampled_from(SPECIAL) | st.binary(max_size=8))
        elif op == "delete":
            del data[where : where + draw(st.integers(1, 6))]
        elif op == "repeat":
            line_start = data.rfind(b"\n", 0, where) + 1
            line_end = data.find(b"\n", where)
            if line_end != -1:
                data[line_end + 1 : line_end + 1] = data[line_start : line_end + 1]
        elif op == "cut":
            del data[where:]
    return bytes(data)


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, read until PIBL closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
def live(backends: list[Backend], make_proxy: Callable[..., ProxyThread]) -> Any:
    proxy = make_proxy(backends, timeouts={"client_header": 2, "client_body": 2})
    return proxy, proxy.record_loop_errors()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=mutated())
def test_mutated_streams_get_http_answers_and_break_nothing(live: Any, data: bytes) -> None:
    proxy, errors = live
    answer = exchange(proxy.port, data)
    if answer:
        assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:80]
        status = int(answer[9:12])
        assert 100 <= status <= 599
    assert errors == [], errors[0]


def test_still_serving_after_fuzzing(live: Any) -> None:
    proxy, errors = live
    for seed in range(40):
        data = bytearray(CORPUS[seed % len(CORPUS)])
        data[(seed * 7) % len(data)] ^= 0x5A
        exchange(proxy.port, bytes(data))
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        assert [client.get(f"/after/{i}").status_code for i in range(3)] == [200, 200, 200]
    assert errors == []


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\n\r\n',
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
]


class RawBackend(RawServer):
    """Answers every connection with the bytes set in ``reply``, then closes."""

    def __init__(self) -> None:
        self.reply = RESPONSES[0]
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
            head += chunk
        conn.sendall(self.reply)
        conn.shutdown(socket.SHUT_WR)


@pytest.fixture
def raw_live(make_proxy: Callable[..., ProxyThread]) -> Iterator[Any]:
    backend = RawBackend()
    proxy = make_proxy(
        [backend.url],
        timeouts={"upstream_response": 2},
        retries={"tries": 1},
        health={"enabled": False, "max_fails": 1000},
    )
    yield proxy, backend, proxy.record_loop_errors()
    backend.close()


@st.composite
def mutated_response(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(RESPONSES)))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if op == "flip" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif op == "insert":
            data[where:where] = draw(st.sampled_from(SPECIAL) | st.binary(max_size=8))
        elif op == "delete":
            del data[where : where + draw(st.integers(1, 6))]
        elif op == "cut":
            del data[where:]
    return bytes(data)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(reply=mutated_response())
def test_mutated_backend_responses_give_http_answers(raw_live: Any, reply: bytes) -> None:
    proxy, backend, errors = raw_live
    backend.reply = reply
    answer = exchange(proxy.port, b"GET /r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 "), (reply, answer[:80])
    assert 200 <= int(answer[9:12]) <= 599
    assert errors == [], errors[0]
