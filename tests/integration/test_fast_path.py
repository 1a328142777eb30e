"""The fast path (``pibl.proxy.fast``): what it serves, and each way out of it.

Every test warms the pool first (one request per backend), so that the request under test
finds an idle connection and starts on the fast path; ``Proxy.fast_served`` and
``Proxy.fast_exits`` tell which way it went. Where it matters, the same requests are sent
through a proxy with the fast path off, and the answers must be the same.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import pibl
from tests.support import (
    Backend,
    ProxyThread,
    RawServer,
    pattern_sha256,
    raw_request,
    read_responses,
    wait_for,
)

FAST = {"fast_path": True}
SLOW = {"fast_path": False}


def served(proxy: ProxyThread) -> int:
    assert proxy.worker is not None
    return proxy.worker.proxy.fast_served


def exits(proxy: ProxyThread) -> dict[str, int]:
    assert proxy.worker is not None
    return dict(proxy.worker.proxy.fast_exits)


def warm(proxy: ProxyThread, count: int = 3) -> None:
    """One request per backend: each pool keeps an idle connection."""
    with httpx.Client(base_url=proxy.url) as client:
        for i in range(count):
            assert client.get(f"/warm/{i}").status_code == 200


def _comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body, without what moves with the clock (Date, Age, ttl=)."""
    headers = [
        (k, re.sub(r"ttl=\d+", "ttl=", v))
        for k, v in response.headers.multi_items()
        if k not in ("date", "server", "age")
    ]
    return response.status_code, headers, response.content


def _log_shape(line: str) -> str:
    """An access-log line without what differs between two runs (times, ports, ids)."""
    return re.sub(r"\[[^]]*\]|host=\"[^\"]*\"|up=\S+|total=\S+|rid=\S+", "", line)


def test_common_requests_are_served_in_callbacks_with_the_same_answers(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    fast = make_proxy(backends, upstream=FAST)
    slow = make_proxy(backends, upstream=SLOW)

    def answers(proxy: ProxyThread) -> list[Any]:
        with httpx.Client(base_url=proxy.url, headers={"Accept-Encoding": "identity"}) as c:
            out = [c.get(f"/a/{i}", headers={"X-Request-ID": f"id-{i}"}) for i in range(6)]
            out.append(c.head("/head", headers={"X-Request-ID": "id-head"}))
            out.append(c.get("/status?code=204", headers={"X-Request-ID": "id-204"}))
            out.append(c.get("/download?size=5000&chunked=1", headers={"X-Request-ID": "c"}))
            out.append(c.post("/echo", content=b"small body", headers={"X-Request-ID": "p"}))
        return [_comparable(r) for r in out]

    assert answers(fast) == answers(slow)
    # the first request to each backend needs a connection; the other seven are fast, but
    # the POST when its body came in a later read than its head (then it streams)
    assert wait_for(lambda: served(fast) + exits(fast).get("body to stream", 0) == 7)
    assert exits(fast).keys() <= {"needs a connection", "body to stream"}
    assert exits(fast)["needs a connection"] == 3
    assert served(slow) == 0 and exits(slow) == {}
    assert [_log_shape(x) for x in fast.log_lines()] == [_log_shape(x) for x in slow.log_lines()]


@pytest.mark.parametrize("upstream", [FAST, SLOW], ids=["fast", "coroutine"])
def test_a_kept_alive_backend_connection_parses_every_response_with_one_parser(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], upstream: dict[str, bool]
) -> None:
    proxy = make_proxy(backends[:1], upstream=upstream)
    assert proxy.worker is not None
    pool = proxy.worker.proxy.pools[0]
    parsers = []
    with httpx.Client(base_url=proxy.url) as client:
        for i in range(4):
            assert client.get(f"/p/{i}").status_code == 200
            assert wait_for(lambda: len(pool._idle) == 1)
            parsers.append(pool._idle[0]._spare)
    assert parsers[0] is not None
    assert all(p is parsers[0] for p in parsers)  # one connection, one parser


def test_a_body_that_must_stream_leaves_before_the_exchange_starts(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST, limits={"request_buffer": 1024})
    warm(proxy)
    big = b"x" * 200_000
    with httpx.Client(base_url=proxy.url) as client:
        r = client.post("/upload", content=big)
        assert r.text == f"{len(big)} {hashlib.sha256(big).hexdigest()}"
        r = client.post("/echo", content=b"fits", headers={"Expect": "100-continue"})
        assert r.text.endswith("body=fits")
    assert exits(proxy)["body to stream"] == 2
    assert served(proxy) == 0


def _pooled_then(second: Callable[[socket.socket], None]) -> RawServer:
    """A backend whose first connection answers one request, then does ``second``."""

    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        if server.accepted == 1:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            conn.recv(65536)  # the second request arrives on the pooled connection
            second(conn)
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
            conn.recv(65536)

    server = RawServer(handle)
    return server


def test_a_pooled_connection_closed_by_the_backend_is_retried_on_a_fresh_one(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    backend = _pooled_then(lambda conn: None)  # closes without answering
    proxy = make_proxy([backend.url], upstream=FAST)
    with httpx.Client(base_url=proxy.url) as client:
        assert client.get("/1").text == "first"
        r = client.get("/2")
    backend.close()
    assert r.status_code == 200 and r.text == "fresh"
    assert exits(proxy) == {"needs a connection": 1, "retry": 1}
    assert backend.accepted == 2


def test_a_backend_that_cannot_be_reached_is_left_to_the_retry_rules(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there: connecting is refused
    proxy = make_proxy([backends[0], dead_url], upstream=FAST)
    with httpx.Client(base_url=proxy.url) as client:
        statuses = [client.get(f"/r/{i}").status_code for i in range(4)]
    assert statuses == [200, 200, 200, 200]
    # b1 is fast once pooled; the dead one always needs a connection, which fails and is
    # retried on b1 by the coroutine path
    assert exits(proxy)["needs a connection"] >= 2
    assert served(proxy) >= 1


def test_a_backend_failing_mid_response_cuts_the_client_as_before(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    def cut(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    for upstream in (FAST, SLOW):
        backend = _pooled_then(cut)
        proxy = make_proxy([backend.url], upstream=upstream)
        with httpx.Client(base_url=proxy.url) as client:
            assert client.get("/1").text == "first"
        raw = raw_request(proxy.port, b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        backend.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 100" in head
        assert body == b"0123456789"  # short: the client can tell the body was cut
        line = proxy.log_lines()[-1]
        assert '"GET /2 HTTP/1.1" 200 10' in line and 'detail="backend closed' in line
    assert exits(proxy) == {}  # the fast path off


def test_failures_at_the_response_head_answer_as_the_coroutine_path_does(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    answers = {
        "unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        "malformed": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        "silent": b"",
    }
    for name, answer in answers.items():
        results = []
        for upstream in (FAST, SLOW):

            def second(conn: socket.socket, answer: bytes = answer) -> None:
                if answer:
                    conn.sendall(answer)
                else:
                    time.sleep(1.5)  # longer than the response timeout

            backend = _pooled_then(second)
            proxy = make_proxy(
                [backend.url], upstream=upstream, timeouts={"upstream_response": 0.5}
            )
            with httpx.Client(base_url=proxy.url) as client:
                assert client.get("/1").text == "first"
                r = client.get("/2", timeout=5)
            backend.close()
            results.append((r.status_code, r.headers["content-type"], r.content))
            if upstream is FAST:
                assert exits(proxy) == {"needs a connection": 1, "failure": 1}, name
        assert results[0] == results[1], name
        assert results[0][0] == (504 if name == "silent" else 502), name


def test_a_compressible_response_leaves_at_its_head_to_be_compressed(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST)
    warm(proxy)
    with httpx.Client(base_url=proxy.url) as client:
        r = client.get("/text?size=50000", headers={"Accept-Encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        assert len(r.content) == 50000  # httpx decoded it
        plain = client.get("/text?size=50000", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert plain.headers["vary"] == "Accept-Encoding"
        assert plain.content == r.content
        # a response that is not compressible stays on the fast path despite the header
        binary = client.get("/download?size=3000", headers={"Accept-Encoding": "gzip"})
        assert "content-encoding" not in binary.headers and len(binary.content) == 3000
    assert exits(proxy) == {"needs a connection": 3, "compression": 1}
    assert wait_for(lambda: served(proxy) == 2)
    raw = raw_request(
        proxy.port,
        b"GET /text?size=3000 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n"
        b"Connection: close\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and b"Transfer-Encoding: chunked" in head
    data = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        data += body[: int(size, 16)]
        body = body[int(size, 16) + 2 :]
    assert (
        gzip.decompress(data)
        == b"".join(
            b"PIBL streams this line again and again to test compression.\n" for _ in range(100)
        )[:3000]
    )


def test_an_upgrade_request_takes_the_coroutine_path(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST)
    warm(proxy)
    raw = raw_request(
        proxy.port,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200")  # the backend did not switch
    assert exits(proxy) == {"needs a connection": 3, "upgrade": 1}


def test_a_slow_client_pauses_the_backend_and_gets_every_byte(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST)
    warm(proxy)
    size = 8 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.sendall(b"GET /download?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        time.sleep(0.5)  # let the buffers fill: the proxy must stop reading the backend
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % size in head
        digest = hashlib.sha256(body)
        received = len(body)
        while received < size:
            chunk = s.recv(256 * 1024)
            assert chunk
            digest.update(chunk)
            received += len(chunk)
        assert received == size and digest.hexdigest() == pattern_sha256(size)
        s.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is still good
        [after] = read_responses(s, 1)
        assert after.startswith(b"HTTP/1.1 200")
    assert wait_for(lambda: served(proxy) == 2) and exits(proxy) == {"needs a connection": 3}


def test_pipelined_requests_on_the_fast_path_answer_in_order(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST)
    warm(proxy)
    paths = [b"/p/0", b"/slow?s=0.3", b"/p/2", b"/status?code=204", b"/p/4", b"/p/5"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths))
        responses = read_responses(s, len(paths))
    assert [r.split(b"\r\n", 1)[0] for r in responses] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
    ]
    bodies = [r.partition(b"\r\n\r\n")[2] for r in responses]
    for path, body in zip(paths, bodies, strict=True):
        assert body == b"" or body.endswith(b"GET " + path)
    assert wait_for(lambda: served(proxy) == len(paths)), exits(proxy)


def test_a_half_closed_client_gets_its_fast_answers_then_the_connection_closes(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST)
    warm(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as s:
        s.sendall(b"GET /h1 HTTP/1.1\r\nHost: x\r\n\r\nGET /h2 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):  # TimeoutError if PIBL waits for more
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 2 and data.endswith(b"GET /h2")
    assert wait_for(lambda: served(proxy) == 2)


def test_a_client_that_resets_during_a_fast_exchange_is_logged_499(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST)
    warm(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /slow?s=2 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: any(r.path.startswith("/slow") for b in backends for r in b.seen))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    assert wait_for(lambda: '"GET /slow?s=2 HTTP/1.1" 499' in proxy.stream.getvalue(), 1.5)
    assert exits(proxy) == {"needs a connection": 3} and served(proxy) == 0
    assert proxy.worker is not None
    assert wait_for(lambda: proxy.worker is not None and proxy.worker.proxy.in_flight == 0)
    # the backend connection of the abandoned exchange was not pooled; the rest still serve
    with httpx.Client(base_url=proxy.url) as client:
        assert [client.get(f"/after/{i}").status_code for i in range(3)] == [200] * 3


# -- cache hits ------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _stored(proxy: ProxyThread) -> None:
    """Wait until the responses being stored are committed (the next request is a hit)."""
    assert proxy.worker is not None and proxy.worker.proxy.cache is not None
    cache = proxy.worker.proxy.cache
    assert wait_for(lambda: not cache._inflight)


def _cached(
    make_proxy: Callable[..., ProxyThread], backend: Backend, tmp: Path, upstream: dict[str, Any]
) -> tuple[ProxyThread, _Clock]:
    proxy = make_proxy([backend], upstream=upstream, cache={"dir": str(tmp), "ttl": 60})
    clock = _Clock()
    assert proxy.worker is not None and proxy.worker.proxy.cache is not None
    proxy.worker.proxy.cache.clock = clock
    return proxy, clock


def test_fresh_cache_hits_are_answered_in_the_callback_with_the_same_answers(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    fast, _ = _cached(make_proxy, backends[0], tmp_path / "fast", FAST)
    slow, _ = _cached(make_proxy, backends[0], tmp_path / "slow", SLOW)

    def answers(proxy: ProxyThread) -> list[Any]:
        out = []
        with httpx.Client(base_url=proxy.url, headers={"Accept-Encoding": "identity"}) as c:
            for path in ("/cache/a?cc=max-age=100", "/cache/b?cc=max-age=100&size=3000"):
                c.get(path)  # a miss, stored
                _stored(proxy)
                out.append(c.get(path, headers={"X-Request-ID": "r1"}))
                out.append(c.head(path, headers={"X-Request-ID": "r2"}))
                etag = c.get(path + "&etag=%22v1%22").headers.get("etag")
                _stored(proxy)
                conditional = {"If-None-Match": etag or "", "X-Request-ID": "r3"}
                out.append(c.get(path + "&etag=%22v1%22", headers=conditional))
        return [_comparable(r) for r in out]

    backends[0].hits = 0
    fast_answers = answers(fast)
    hits_fast = backends[0].hits
    backends[0].hits = 0
    slow_answers = answers(slow)
    # (the bodies name how often the backend served the URI: the same count both times)
    assert fast_answers == slow_answers
    assert hits_fast == backends[0].hits == 4
    # six hits and three of the four misses (stored by the fast path); the very first
    # request found no pooled connection
    assert wait_for(lambda: served(fast) == 9)
    assert exits(fast) == {"needs a connection": 1}
    line_shapes = [_log_shape(x) for x in fast.log_lines()]
    assert line_shapes == [_log_shape(x) for x in slow.log_lines()]


def test_a_stale_entry_leaves_the_fast_path_and_is_revalidated(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    proxy, clock = _cached(make_proxy, backends[0], tmp_path, FAST)
    path = "/cache/s?cc=max-age=10&etag=%22e%22"
    with httpx.Client(base_url=proxy.url) as client:
        client.get(path)
        _stored(proxy)
        assert client.get(path).headers["cache-status"].startswith("pibl; hit")
        clock.offset = 20  # past max-age
        r = client.get(path)
    assert r.status_code == 200
    assert r.headers["cache-status"].startswith("pibl; fwd=stale")
    assert exits(proxy) == {"needs a connection": 1, "cache miss": 1}
    assert wait_for(lambda: served(proxy) == 1)


def test_a_slow_client_of_a_cache_hit_is_drained_before_the_next_answer(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    proxy, _ = _cached(make_proxy, backends[0], tmp_path, FAST)
    size = 900_000  # below the sendfile threshold: answered from the callback
    path = b"/cache/big?cc=max-age=100&size=%d" % size
    request = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(request)
        [first] = read_responses(s, 1)
    assert b"stored" in first
    _stored(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.sendall(request * 3)
        time.sleep(0.3)
        responses = read_responses(s, 3)
    assert len(responses) == 3
    for r in responses:
        assert b"Cache-Status: pibl; hit" in r and len(r.partition(b"\r\n\r\n")[2]) == size
    assert wait_for(lambda: served(proxy) == 3)


@pytest.mark.skipif(
    pibl.BUILD == "compiled",
    reason="the fault is injected by replacing a method, which compiled classes do not allow",
)
def test_an_unexpected_error_in_a_fast_exchange_closes_that_client_only(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST)
    warm(proxy)
    assert proxy.worker is not None
    worker_proxy = proxy.worker.proxy

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    worker_proxy.response_head = broken  # type: ignore[method-assign]
    raw = raw_request(proxy.port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw == b""  # closed without an answer, as the coroutine path does
    del worker_proxy.response_head
    assert wait_for(lambda: "RuntimeError: a bug" in proxy.stream.getvalue())
    assert "error in a fast-path exchange" in proxy.stream.getvalue()
    with httpx.Client(base_url=proxy.url) as client:
        assert [client.get(f"/after/{i}").status_code for i in range(3)] == [200] * 3
    assert wait_for(lambda: worker_proxy.in_flight == 0)


def test_a_small_body_arriving_after_its_head_is_waited_for_then_served_fast(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, upstream=FAST)
    warm(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        time.sleep(0.2)
        s.sendall(b"world")
        [answer] = read_responses(s, 1)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"POST /echo body=helloworld")
    assert wait_for(lambda: served(proxy) == 1)
    assert exits(proxy) == {"needs a connection": 3}


def test_a_small_body_that_stalls_or_is_cut_gets_the_coroutine_paths_answer(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    for upstream in (FAST, SLOW):
        proxy = make_proxy(backends, upstream=upstream, timeouts={"client_body": 0.5})
        warm(proxy)
        started = time.monotonic()
        raw = raw_request(
            proxy.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhel"
        )
        assert raw.startswith(b"HTTP/1.1 408"), upstream
        assert 0.4 < time.monotonic() - started < 2.0
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhel")
            time.sleep(0.1)
            s.shutdown(socket.SHUT_WR)  # the body will never be complete
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400"), upstream
        assert sum(len(b.seen) for b in backends) == 3 * (1 if upstream is FAST else 2)


def test_http10_clients_and_close_delimited_backends_get_the_same_bytes_on_both_paths(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    requests = [
        b"GET /download?size=1000&chunked=1 HTTP/1.0\r\nX-Request-ID: a\r\n\r\n",
        b"GET /v10 HTTP/1.0\r\nX-Request-ID: b\r\n\r\n",
        b"GET /close HTTP/1.1\r\nHost: x\r\nX-Request-ID: c\r\nConnection: close\r\n\r\n",
        b"HEAD /download?size=10&chunked=1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: d\r\n"
        b"Connection: close\r\n\r\n",
        b"GET /status?code=304 HTTP/1.1\r\nHost: x\r\nX-Request-ID: e\r\nConnection: close\r\n\r\n",
    ]

    def answers(proxy: ProxyThread) -> list[bytes]:
        warm(proxy)
        out = []
        for request in requests:
            raw = raw_request(proxy.port, request, timeout=3)
            out.append(re.sub(rb"\r\nDate: [^\r]*", b"", raw))
        return out

    fast = make_proxy(backends, upstream=FAST)
    slow = make_proxy(backends, upstream=SLOW)
    fast_answers = answers(fast)
    assert fast_answers == answers(slow)
    assert b"Transfer-Encoding" not in fast_answers[0]  # close-delimited for HTTP/1.0
    assert (
        b"Connection: close" in fast_answers[0]
        and len(fast_answers[0].split(b"\r\n\r\n")[1]) == 1000
    )
    assert fast_answers[2].endswith(b"0\r\n\r\n")  # re-chunked for the HTTP/1.1 client
    assert wait_for(lambda: served(fast) == len(requests))


def test_misses_that_cannot_be_stored_are_forwarded_on_the_fast_path(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    """Misses, and a URI's next requests in hit-for-miss, are forwarded in callbacks with
    the answers (Cache-Status included) and log lines of the coroutine path."""
    fast, _ = _cached(make_proxy, backends[0], tmp_path / "fast", FAST)
    slow, _ = _cached(make_proxy, backends[0], tmp_path / "slow", SLOW)
    paths = ("/cache/p?cc=private", "/cache/q?cc=no-store&size=3000", "/cache/c?cookie=1")

    def answers(proxy: ProxyThread) -> list[Any]:
        out = []
        with httpx.Client(base_url=proxy.url, headers={"Accept-Encoding": "identity"}) as c:
            for path in paths:
                for i in range(3):
                    out.append(c.get(path, headers={"X-Request-ID": f"r{i}"}))
        return [_comparable(r) for r in out]

    backends[0].hits = 0
    fast_answers = answers(fast)
    backends[0].hits = 0
    slow_answers = answers(slow)
    assert fast_answers == slow_answers
    assert backends[0].hits == 9  # nothing was stored
    statuses = {h[1] for _, headers, _ in fast_answers for h in headers if h[0] == "cache-status"}
    assert statuses == {
        "pibl; fwd=miss; fwd-status=200; detail=private",
        "pibl; fwd=miss; fwd-status=200; detail=no-store",
        "pibl; fwd=miss; fwd-status=200; detail=set-cookie",
    }
    # all fast but the very first request, which found no pooled connection
    assert exits(fast) == {"needs a connection": 1} and wait_for(lambda: served(fast) == 8)
    assert [_log_shape(x) for x in fast.log_lines()] == [_log_shape(x) for x in slow.log_lines()]
    assert all(" cache=MISS " in line for line in fast.log_lines())


def test_a_hit_for_miss_uri_whose_response_can_now_be_stored_is_stored_by_the_fast_path(
    make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    answers = iter([b"private", b"max-age=60", b"max-age=60"])
    sent: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            _, data = data.split(b"\r\n\r\n", 1)
            cc = next(answers)
            body = b"version %d" % (len(sent) + 1)
            sent.append(cc)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: %s\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (cc, len(body), body)
            )

    backend = RawServer(handle)
    try:
        proxy = make_proxy([backend.url], upstream=FAST, cache={"dir": str(tmp_path), "ttl": 60})
        with httpx.Client(base_url=proxy.url) as client:
            first = client.get("/doc")
            second = client.get("/doc")
            assert proxy.worker is not None and proxy.worker.proxy.cache is not None
            store = proxy.worker.proxy.cache.store
            assert wait_for(lambda: store.entries_on_disk()[0] == 1)  # committed
            third = client.get("/doc")
        backend.close()
    finally:
        backend.close()
    assert first.headers["cache-status"] == "pibl; fwd=miss; fwd-status=200; detail=private"
    assert second.content == b"version 2"
    assert second.headers["cache-status"].startswith("pibl; fwd=miss; fwd-status=200; stored")
    assert third.content == b"version 2" and third.headers["cache-status"].startswith("pibl; hit")
    assert sent == [b"private", b"max-age=60"]
    assert exits(proxy) == {"needs a connection": 1}
    assert wait_for(lambda: served(proxy) == 2)  # the fetch that stored it, and the hit


def test_a_compressible_miss_leaves_at_its_head_to_be_compressed(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    proxy, _ = _cached(make_proxy, backends[0], tmp_path, FAST)
    path = "/cache/z?cc=private&size=5000"
    with httpx.Client(base_url=proxy.url, headers={"Accept-Encoding": "gzip"}) as client:
        responses = [client.get(path) for _ in range(2)]
    for r in responses:
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(5000)
        assert r.headers["cache-status"] == "pibl; fwd=miss; fwd-status=200; detail=private"
    assert exits(proxy) == {"needs a connection": 1, "compression": 1}


def test_a_fast_miss_leads_and_concurrent_requests_wait_for_its_entry(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    """The fast path's miss registers as the fetch of its URI: requests arriving meanwhile
    wait for its entry in ``handle`` (collapsed), and the backend is asked once."""
    proxy, _ = _cached(make_proxy, backends[0], tmp_path, FAST)
    with httpx.Client(base_url=proxy.url) as client:  # a pooled connection to start from
        assert client.get("/cache/warm?cc=no-store").status_code == 200
    backends[0].hits = 0
    url = f"{proxy.url}/cache/slow?cc=max-age=60&delay=2"
    results: list[httpx.Response] = []
    leader = threading.Thread(target=lambda: results.append(httpx.get(url, timeout=20)))
    leader.start()
    time.sleep(0.3)  # its fetch is under way (the backend answers after 2 s)

    def get(_: int) -> httpx.Response:
        return httpx.get(url, timeout=20)

    with ThreadPoolExecutor(8) as pool:
        results += pool.map(get, range(8))
    leader.join(20)
    assert backends[0].hits == 1
    assert len({r.content for r in results}) == 1
    labels = sorted(r.headers["cache-status"] for r in results)
    assert labels[0].startswith("pibl; fwd=miss; fwd-status=200; stored")  # the one fetch
    assert all(label.endswith("; collapsed") for label in labels[1:]), labels
    assert exits(proxy).get("cache miss") == 8  # the followers wait in handle()


def test_a_fast_miss_looks_in_the_store_once(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    """The hit check and the miss's fetch share one lookup (each may read a file)."""
    proxy, _ = _cached(make_proxy, backends[0], tmp_path, FAST)
    assert proxy.worker is not None and proxy.worker.proxy.cache is not None
    store = proxy.worker.proxy.cache.store
    lookups: list[bytes] = []
    lookup = store.lookup

    def counted(primary: bytes, headers: Any) -> Any:
        lookups.append(primary)
        return lookup(primary, headers)

    with httpx.Client(base_url=proxy.url) as client:
        assert client.get("/cache/warm?cc=no-store").status_code == 200  # a pooled connection
        store.lookup = counted  # type: ignore[method-assign]
        served_before = served(proxy)
        assert client.get("/cache/once?cc=max-age=60").status_code == 200
    assert wait_for(lambda: served(proxy) == served_before + 1)  # on the fast path
    assert len(lookups) == 1
