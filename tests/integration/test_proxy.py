"""The core proxy over real loopback sockets, with three real backend servers."""

from __future__ import annotations

import contextlib
import gc
import re
import socket
import struct
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.support import (
    Backend,
    ProxyThread,
    RawServer,
    free_port,
    pattern_sha256,
    raw_request,
    read_responses,
    wait_for,
)


def test_round_robin_six_requests(backends: list[Backend], proxy: ProxyThread) -> None:
    with httpx.Client(base_url=proxy.url) as client:
        names = [client.get(f"/rr/{i}").headers["x-backend"] for i in range(6)]
    assert names == ["b1", "b2", "b3", "b1", "b2", "b3"]
    assert [len(b.seen) for b in backends] == [2, 2, 2]


def test_weighted_rotation(backends: list[Backend], make_proxy: Callable[..., ProxyThread]) -> None:
    entries = [
        {"url": backends[0].url, "weight": 5},
        {"url": backends[1].url},
        {"url": backends[2].url},
    ]
    proxy = make_proxy(entries)
    with httpx.Client(base_url=proxy.url) as client:
        names = [client.get("/w").headers["x-backend"] for _ in range(7)]
    assert names == ["b1", "b1", "b2", "b1", "b3", "b1", "b1"]


def test_forwarding_headers(backends: list[Backend], proxy: ProxyThread) -> None:
    with httpx.Client(base_url=proxy.url) as client:
        r = client.get(
            "/h",
            headers=[
                ("X-Forwarded-For", "10.1.1.1"),
                ("Connection", "keep-alive, X-Secret"),
                ("X-Secret", "hop"),
                ("Keep-Alive", "timeout=5"),
                ("X-Rep", "one"),
                ("X-Rep", "two"),
                ("X-Request-ID", "client-id-42"),
            ],
        )
    assert r.status_code == 200
    assert r.headers["via"] == "1.1 pibl"
    assert r.headers["x-request-id"] == "client-id-42"
    seen = backends[0].seen[-1]
    names = [k.lower() for k, _ in seen.headers]
    assert "x-secret" not in names and "keep-alive" not in names and "connection" not in names
    headers = dict((k.lower(), v) for k, v in seen.headers)
    assert headers["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"
    assert headers["host"] == f"127.0.0.1:{proxy.port}"
    assert headers["x-request-id"] == "client-id-42"
    assert headers["via"] == "1.1 pibl"
    assert [v for k, v in seen.headers if k.lower() == "x-rep"] == ["one", "two"]


def test_response_hop_by_hop_and_repeats(backends: list[Backend], proxy: ProxyThread) -> None:
    raw = raw_request(proxy.port, b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = raw.split(b"\r\n\r\n")[0].decode()
    lines = head.split("\r\n")[1:]
    assert "X-Private" not in head  # named in Connection: removed, and so is the Connection value
    assert not any(line.startswith("Keep-Alive:") for line in lines)
    assert [line for line in lines if line.startswith("Set-Cookie:")] == [
        "Set-Cookie: a=1",
        "Set-Cookie: b=2",
    ]
    assert [line for line in lines if line.startswith("Connection:")] == ["Connection: close"]


def test_keep_alive_and_pipelining_in_order(backends: list[Backend], proxy: ProxyThread) -> None:
    requests = (
        b"".join(b"GET /p/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(10))
        + b"GET /p/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    raw = raw_request(proxy.port, requests)
    bodies = [part for part in raw.split(b"HTTP/1.1 200 OK") if part]
    assert len(bodies) == 11
    order = [b.split(b"GET /p/")[1].split()[0] for b in bodies]
    assert order == [str(i).encode() for i in range(10)] + [b"last"]


def _left_to_the_cyclic_collector(proxy: ProxyThread) -> list[str]:
    """Connection objects that ten ``Connection: close`` requests (and one keep-alive
    request whose client leaves) left in reference cycles: only the cyclic collector
    would free them. One left per connection made it run every few dozen requests."""
    from pibl.http.parse import RequestParser, ResponseParser
    from pibl.proxy.client import ClientConnection
    from pibl.proxy.flow import Deadline
    from pibl.proxy.upstream import UpstreamConnection

    assert proxy.worker is not None
    raw_request(proxy.port, b"GET /warm HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    gc.collect()
    gc.disable()
    try:
        for i in range(10):
            request = f"GET /c/{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            assert b" 200 " in raw_request(proxy.port, request.encode())
        sent = b"GET /k HTTP/1.1\r\nHost: a\r\n\r\n"  # one the client closes, idle
        assert b" 200 " in raw_request(proxy.port, sent, read_all=False)
        assert wait_for(lambda: not proxy.worker.proxy.connections)  # type: ignore[union-attr]
        time.sleep(0.1)  # (the backend's side of a closing upstream connection)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = (ClientConnection, RequestParser, ResponseParser, UpstreamConnection, Deadline)
        return [type(o).__name__ for o in gc.garbage if isinstance(o, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_closed_client_connection_is_freed_at_once_not_by_the_cyclic_collector(
    backends: list[Backend], proxy: ProxyThread
) -> None:
    assert _left_to_the_cyclic_collector(proxy) == []


def test_a_backend_connection_the_backend_closes_is_freed_at_once(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    def answer_and_close(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    closing = RawServer(answer_and_close)
    try:
        assert _left_to_the_cyclic_collector(make_proxy([closing.url])) == []
    finally:
        closing.close()


def test_half_closed_client_gets_its_answers_then_the_connection_closes(
    backends: list[Backend], proxy: ProxyThread
) -> None:
    """Like ``nc -q``: requests, then EOF; keep-alive answers, then PIBL closes (no idle wait)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as s:
        s.sendall(b"GET /h1 HTTP/1.1\r\nHost: x\r\n\r\nGET /h2 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        data = b""
        while chunk := s.recv(65536):  # TimeoutError if PIBL waits for more
            data += chunk
    assert time.monotonic() - started < 2
    assert data.count(b"HTTP/1.1 200") == 2 and data.endswith(b"GET /h2")


def test_http10_client(backends: list[Backend], proxy: ProxyThread) -> None:
    raw = raw_request(proxy.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in raw
    assert raw.endswith(b"GET /old")
    # keep-alive requested by a 1.0 client is honoured
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.settimeout(10)
        s.sendall(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        [first] = read_responses(s, 1)
        assert b"Connection: keep-alive" in first
        s.sendall(b"GET /b HTTP/1.0\r\n\r\n")
        [second] = read_responses(s, 1)
        assert second.endswith(b"GET /b")


def test_http10_client_gets_chunked_body_close_delimited(
    backends: list[Backend], proxy: ProxyThread
) -> None:
    raw = raw_request(proxy.port, b"GET /download?size=1000&chunked=1 HTTP/1.0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert len(body) == 1000


def test_head_request(backends: list[Backend], proxy: ProxyThread) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(
            b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    first, second = data.split(b"HTTP/1.1 200 OK")[1:]
    assert b"Content-Length: 10" in first  # kept from the backend's HEAD answer
    assert first.endswith(b"\r\n\r\n")  # and no body
    assert second.endswith(b"GET /y")


def test_request_bodies_length_and_chunked(backends: list[Backend], proxy: ProxyThread) -> None:
    with httpx.Client(base_url=proxy.url) as client:
        r = client.post("/post", content=b"abc")
        assert r.text.endswith("body=abc")

        def gen():
            yield b"hello "
            yield b"world"

        r = client.post("/chunk", content=gen())
        assert r.text.endswith("body=hello world")
        big = [b"x" * 50_000, b"y" * 50_000]  # more than limits.request_buffer (64 KiB)
        r = client.post("/big", content=iter(big))
        assert r.text.endswith("body=" + "x" * 50_000 + "y" * 50_000)
    seen = {s.path: s for b in backends for s in b.seen}
    # a small chunked body is read whole first and sent with its length (as nginx does)
    assert ("Content-Length", "11") in seen["/chunk"].headers
    assert not any(k.lower() == "transfer-encoding" for k, _ in seen["/chunk"].headers)
    # a large one streams, framed as the client framed it
    assert ("Transfer-Encoding", "chunked") in seen["/big"].headers


def test_small_request_bodies_are_read_whole_before_a_backend_is_chosen(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    head = b"POST /%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    def send_in_two_parts(port: int, path: bytes, between: Callable[[], object]) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(head % path)
            between()
            s.sendall(b"zz\r\nboom\r\n0\r\n\r\n")  # a bad chunk size, after good ones
            return s.recv(65536)

    seen = lambda path: any(s.path == path for b in backends for s in b.seen)  # noqa: E731
    proxy = make_proxy(backends, timeouts={"client_body": 1})
    answer = send_in_two_parts(proxy.port, b"bad", lambda: time.sleep(0.3))
    assert answer.startswith(b"HTTP/1.1 400")
    # a client that stops in the middle of its body: 408, and no backend was kept waiting
    raw = raw_request(
        proxy.port,
        b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf",
    )
    assert raw.startswith(b"HTTP/1.1 408")
    assert not seen("/bad") and not seen("/slow")
    # with buffering off the head and first chunk reach a backend before the bad chunk comes
    streaming = make_proxy(backends, limits={"request_buffer": 0})
    answer = send_in_two_parts(
        streaming.port, b"streamed", lambda: wait_for(lambda: seen("/streamed"))
    )
    assert answer.startswith(b"HTTP/1.1 400")
    assert seen("/streamed")


def test_expect_100_continue(backends: list[Backend], proxy: ProxyThread) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n"
        )
        interim = s.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"12345")
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"body=12345")
    assert all("expect" not in k.lower() for k, _ in backends[0].seen[-1].headers)


def test_expect_too_large_gets_413_without_continue(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, limits={"max_body_bytes": 100})
    raw = raw_request(
        proxy.port,
        b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in raw
    assert not any(b.seen for b in backends)


def test_chunked_body_over_limit_413(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, limits={"max_body_bytes": 100})
    body = b"".join(b"32\r\n" + b"x" * 50 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    raw = raw_request(
        proxy.port, b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    )
    assert raw.startswith(b"HTTP/1.1 413")


MALFORMED = {
    "cl-and-te": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "differing-cl": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "te-gzip": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
    "te-not-final-chunked": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    "te-http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n", 400),
    "bad-header-name": (b"GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n", 400),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "control-char": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\x01c\r\n\r\n", 400),
    "nul-char": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n", 400),
    "missing-host": (b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n", 400),
    "duplicate-host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "bad-host": (b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400),
    "empty-host": (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    "long-target": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "too-many-headers": (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(150))
        + b"\r\n",
        431,
    ),
    "huge-header": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n", 431),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "bad-chunk-size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_rejected_never_forwarded(
    case: str, backends: list[Backend], proxy: ProxyThread
) -> None:
    data, status = MALFORMED[case]
    raw = raw_request(proxy.port, data)
    assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:200]
    assert b"Connection: close" in raw
    time.sleep(0.05)
    assert [len(b.seen) for b in backends] == [0, 0, 0], case
    assert sum(b.connections for b in backends) == 0


def test_malformed_after_valid_pipelined_request(
    backends: list[Backend], proxy: ProxyThread
) -> None:
    raw = raw_request(
        proxy.port,
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 400" in raw
    assert [s.path for b in backends for s in b.seen] == ["/ok"]


def test_slowloris_gets_408(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, timeouts={"client_header": 0.5})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        s.sendall(b"X-A: 1\r\n")
        data = s.recv(65536)
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408")
    assert 0.3 < elapsed < 2.0
    assert not any(b.seen for b in backends)


def test_idle_keepalive_closed(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, timeouts={"client_idle": 0.4})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"GET /"):
            data += s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert s.recv(65536) == b""  # closed by PIBL
        assert 0.2 < time.monotonic() - started < 2.0


def test_killed_backend_502_without_retries(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = make_proxy(
        [backends[0], dead, backends[1]], retries={"tries": 1}, health={"enabled": False}
    )
    responses = [httpx.get(proxy.url + "/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 502, 200]
    assert "the backend failed" in responses[1].text


def test_while_one_dial_checks_a_suspect_backend_the_others_go_elsewhere(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    """One dial at a time finds out whether a backend that failed is still there.

    The middle backend's accept queue is full, so a dial to it hangs until the connect
    timeout. After one such failure (not enough to eject it), a burst of requests arrives:
    the first that picks it dials again; the others that pick it while that dial is pending
    go to another backend at once instead of each waiting out a timeout of their own.
    """
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname(), timeout=5)  # the queue is full
    try:
        proxy = make_proxy(
            [backends[0], f"http://127.0.0.1:{hole.getsockname()[1]}", backends[1]],
            timeouts={"upstream_connect": 0.6},
            health={"enabled": False, "max_fails": 100},
        )
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            assert [client.get("/warm").status_code for _ in range(3)] == [200] * 3

        def timed_get(path: str, out: list[float]) -> None:
            started = time.monotonic()
            assert httpx.get(proxy.url + path, timeout=10).status_code == 200
            out.append(time.monotonic() - started)

        elapsed: list[float] = []
        threads = [
            threading.Thread(target=timed_get, args=(f"/burst/{i}", elapsed)) for i in range(9)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    finally:
        filler.close()
        hole.close()
    assert len(elapsed) == 9
    waited = [e for e in elapsed if e > 0.5]
    # about three of the nine picked the stalled backend; only the one dialling it waits
    assert len(waited) <= 1, sorted(elapsed)


def test_all_backends_dead_503_with_retry_after(make_proxy: Callable[..., ProxyThread]) -> None:
    proxy = make_proxy([f"http://127.0.0.1:{free_port()}" for _ in range(2)])
    started = time.monotonic()
    r = httpx.get(proxy.url + "/x")
    assert time.monotonic() - started < 1.0
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"


def test_backend_killed_mid_flight_502(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    # A backend that accepts and resets without answering.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()

    def reset_all() -> None:
        with contextlib.suppress(OSError):  # (until the test stops listening)
            for _ in range(2):
                conn, _ = lsock.accept()
                conn.recv(65536)
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                conn.close()

    helper = threading.Thread(target=reset_all, daemon=True)
    helper.start()
    proxy = make_proxy([f"http://127.0.0.1:{lsock.getsockname()[1]}"])
    r = httpx.get(proxy.url + "/x")
    # a shutdown wakes an accept() still waiting (a close alone would not), so the helper
    # is gone before the descriptor can be reused
    with contextlib.suppress(OSError):
        lsock.shutdown(socket.SHUT_RDWR)
    helper.join(5)
    lsock.close()
    assert not helper.is_alive()
    assert r.status_code == 502


def test_stalled_backend_504(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, timeouts={"upstream_response": 0.5})
    started = time.monotonic()
    r = httpx.get(proxy.url + "/stall", timeout=10)
    elapsed = time.monotonic() - started
    assert r.status_code == 504
    assert 0.4 < elapsed < 2.0
    # the proxy keeps serving the others normally
    assert httpx.get(proxy.url + "/ok").status_code == 200


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: compress, chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nabcde\r\n0\r\n\r\n",
        b"HTTP/1.1 099 Odd\r\nContent-Length: 5\r\n\r\nabcde",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nabcde",
    ],
    ids=[
        "two-lengths",
        "corrupt-gzip-transfer-coding",
        "unknown-transfer-coding",
        "chunked-not-last",
        "status-099",
        "unasked-101",
    ],
)
def test_malformed_response_502(make_proxy: Callable[..., ProxyThread], answer: bytes) -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()

    def bad() -> None:
        conn, _ = lsock.accept()
        conn.recv(65536)
        conn.sendall(answer)
        time.sleep(0.5)
        conn.close()

    threading.Thread(target=bad, daemon=True).start()
    proxy = make_proxy([f"http://127.0.0.1:{lsock.getsockname()[1]}"])
    raw = raw_request(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    lsock.close()
    assert raw.startswith(b"HTTP/1.1 502")
    assert b"abcde" not in raw


def test_close_delimited_response_rechunked(backends: list[Backend], proxy: ProxyThread) -> None:
    with httpx.Client(base_url=proxy.url) as client:
        for _ in range(3):
            r = client.get("/close")
            assert r.text == "until-close"
            assert r.headers.get("transfer-encoding") == "chunked"


def test_chunked_download_relayed(backends: list[Backend], proxy: ProxyThread) -> None:
    import hashlib

    with httpx.Client(base_url=proxy.url) as client:
        r = client.get("/download?size=3000000&chunked=1")
    assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(3_000_000)


def test_upstream_connections_reused(backends: list[Backend], proxy: ProxyThread) -> None:
    with httpx.Client(base_url=proxy.url) as client:
        for _ in range(30):
            assert client.get("/k").status_code == 200
    assert sum(b.connections for b in backends) == 3


def test_sticky_sessions_by_cookie(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, balance={"sticky": True})
    with httpx.Client(base_url=proxy.url) as first, httpx.Client(base_url=proxy.url) as second:
        a = {first.get("/s").headers["x-backend"] for _ in range(6)}
        b = {second.get("/s").headers["x-backend"] for _ in range(6)}
        assert "pibl_backend" in first.cookies
    assert len(a) == 1 and len(b) == 1  # each client stays on one backend
    # without the cookie, plain rotation
    seen = {httpx.get(proxy.url + "/s").headers["x-backend"] for _ in range(6)}
    assert len(seen) == 3


def test_least_connections_prefers_the_idle_backend(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, balance={"policy": "least_conn"})
    slow = threading.Thread(target=lambda: httpx.get(proxy.url + "/slow?s=1.5", timeout=10))
    slow.start()
    assert wait_for(lambda: any(s.path.startswith("/slow") for b in backends for s in b.seen))
    names = [httpx.get(proxy.url + "/q").headers["x-backend"] for _ in range(4)]
    slow.join()
    busy_name = next(b.name for b in backends if any(s.path.startswith("/slow") for s in b.seen))
    assert busy_name not in names


def test_retries_replay_buffered_bodies_of_idempotent_requests_only(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    """A backend that takes the request and closes without answering, then a good one."""
    taken: list[bytes] = []
    closing = RawServer(lambda conn: taken.append(conn.recv(65536).split(b"\r\n", 1)[0]))
    proxy = make_proxy(
        [
            {"url": closing.url, "weight": 1000},
            {"url": backends[0].url, "weight": 1},
        ],
        health={"enabled": False, "max_fails": 1000},
    )
    errors = proxy.record_loop_errors()
    try:
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            assert client.get("/g").status_code == 200
            r = client.put("/p", content=b"small body")
            assert r.status_code == 200 and r.text.endswith("body=small body")
            assert client.post("/once", content=b"not idempotent").status_code == 502
            big = b"z" * 100_000  # streams (more than request_buffer): cannot be replayed
            assert client.put("/big", content=big).status_code == 502
    finally:
        closing.close()
    assert taken == [
        b"GET /g HTTP/1.1",
        b"PUT /p HTTP/1.1",
        b"POST /once HTTP/1.1",
        b"PUT /big HTTP/1.1",
    ]
    assert [s.path for s in backends[0].seen] == ["/g", "/p"]
    assert "retrying PUT /p HTTP/1.1" in proxy.stream.getvalue()
    gc.collect()  # a task whose exception nobody retrieved reports it when collected
    assert errors == []


def test_a_streamed_body_to_a_backend_that_never_answers_gets_504(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    def read_never_answer(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass

    silent = RawServer(read_never_answer)
    proxy = make_proxy(
        [silent.url],
        timeouts={"upstream_response": 0.5},
        health={"enabled": False},
    )
    errors = proxy.record_loop_errors()
    try:
        r = httpx.put(proxy.url + "/up", content=iter([b"q" * 100_000]), timeout=10)
        assert r.status_code == 504
        time.sleep(0.3)  # the upstream connection is closed after the answer
    finally:
        silent.close()
    gc.collect()
    assert errors == []


def test_a_body_cut_short_does_not_count_against_the_backend(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    """One URL whose responses break mid-body must not take the server out of rotation."""

    def cut_or_ok(conn: socket.socket) -> None:
        if conn.recv(65536).startswith(b"GET /cut"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    server = RawServer(cut_or_ok)
    proxy = make_proxy(
        [server.url],
        health={"enabled": False, "max_fails": 2, "cooldown": 60},
    )
    try:
        for _ in range(6):
            raw = raw_request(proxy.port, b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200") and len(raw.partition(b"\r\n\r\n")[2]) < 100
        assert httpx.get(proxy.url + "/ok", timeout=5).text == "ok"
    finally:
        server.close()
    assert "ejected" not in proxy.stream.getvalue()
    assert '"GET /cut HTTP/1.1" 200 10 ' in proxy.stream.getvalue()  # the bytes that did go


def test_an_empty_body_is_not_compressed(make_proxy: Callable[..., ProxyThread]) -> None:
    def empty_404(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )

    server = RawServer(empty_404)
    proxy = make_proxy([server.url])
    try:
        raw = raw_request(
            proxy.port,
            b"GET /none HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        )
    finally:
        server.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    assert b"Content-Length: 0" in head and b"Content-Encoding" not in head
    assert body == b""


def test_a_client_that_resets_stops_its_exchange_and_is_logged_499(
    backends: list[Backend], proxy: ProxyThread
) -> None:
    """A reset is an abort (a plain FIN may be a half-close still waiting for its answer)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /slow?s=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: any(r.path.startswith("/slow") for b in backends for r in b.seen))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    left = time.monotonic()
    # the exchange ends when the client leaves, not when the backend would have answered
    assert wait_for(lambda: '"GET /slow?s=3 HTTP/1.1" 499' in proxy.stream.getvalue(), 2.0)
    assert time.monotonic() - left < 2.0
    # and the same proxy keeps serving
    assert httpx.get(proxy.url + "/after", timeout=5).status_code == 200


def test_a_204_with_a_body_is_delivered_and_its_connection_dropped(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    def keep_answering(conn: socket.socket) -> None:
        while conn.recv(65536):
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\nnot allowed here")

    server = RawServer(keep_answering)
    proxy = make_proxy([server.url])
    try:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            statuses = [client.get(f"/n/{i}").status_code for i in range(3)]
    finally:
        server.close()
    assert statuses == [204, 204, 204]
    assert server.accepted == 3  # never reused after the junk


def test_head_carries_the_same_vary_as_get(make_proxy: Callable[..., ProxyThread]) -> None:
    def page(conn: socket.socket) -> None:
        request = conn.recv(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5000\r\n"
        head += b"Connection: close\r\n\r\n"
        conn.sendall(head if request.startswith(b"HEAD") else head + b"x" * 5000)

    server = RawServer(page)
    proxy = make_proxy([server.url])
    try:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            got = client.get("/page")  # httpx asks for gzip, deflate, br, zstd
            head = client.head("/page", headers={"Accept-Encoding": "identity"})
    finally:
        server.close()
    assert got.headers["content-encoding"] in ("br", "zstd", "gzip")
    assert "accept-encoding" in head.headers.get("vary", "").lower()


def test_access_log_counts_the_body_of_pibls_own_answers(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    """503 (no backend), 400 (refused while parsing), 413: the bytes column is the body sent."""
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = make_proxy(
        [dead], retries={"tries": 1}, limits={"max_body_bytes": 10, "request_buffer": 0}
    )
    sizes = {}
    r = httpx.get(f"{proxy.url}/down", timeout=5)
    assert r.status_code == 503
    sizes[503] = len(r.content)
    raw = raw_request(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    sizes[400] = len(raw.split(b"\r\n\r\n", 1)[1])
    r = httpx.post(f"{proxy.url}/big", content=b"x" * 100, timeout=5)
    assert r.status_code == 413
    sizes[413] = len(r.content)
    logged = {}
    for line in proxy.log_lines():
        match = re.search(r'" (\d{3}) (\d+) ', line)
        if match:
            logged[int(match.group(1))] = int(match.group(2))
    assert all(size > 0 for size in sizes.values())
    assert logged == sizes
