"""CPU of PIBL's own code per proxied exchange, without sockets: a stable A/B signal.

``compare.py`` measures what matters (the whole proxy process against nginx, with real
sockets), but on a shared two-core machine its figures move by 20 % between runs. This
script drives one worker's ``ClientConnection`` and a pooled ``UpstreamConnection`` with
in-memory transports on a real event loop, so what it measures is the Python work of an
exchange: parse the request, pick a backend, rewrite and send the head, parse the response,
rewrite its head, write it, log and count. The kernel's share (two writes, two reads and
the loop's epoll per request, about a fifth of the total in a profile) is not included.

    .venv/bin/python bench/exchange_cpu.py                  # both paths, 1 KB responses
    .venv/bin/python bench/exchange_cpu.py --size 102400 --requests 20000

Each path runs ``--rounds`` times, alternating; the table gives the median microseconds of
process CPU (``time.process_time``) per exchange. Standard library and PIBL only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pibl.config import validate
from pibl.observe.accesslog import AccessLog
from pibl.proxy.client import ClientConnection
from pibl.proxy.exchange import Proxy
from pibl.proxy.upstream import UpstreamConnection

REQUEST = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


class Transport:
    """The part of an asyncio transport the protocols use; keeps the bytes written."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def response(size: int) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
        b'Last-Modified: Mon, 07 Dec 2026 09:00:00 GMT\r\nETag: "6b168dc2-400"\r\n'
        b"X-Backend: 18001\r\nAccept-Ranges: bytes\r\n\r\n" % size
    ) + b"x" * size


async def run(fast: bool, requests: int, size: int, log_path: str) -> float:
    """Process-CPU microseconds per exchange for one path."""
    config = validate(
        {
            "server": {"host": "127.0.0.1", "port": 8080, "workers": 1},
            "log": {"file": log_path, "stdout": False},
            "cache": {"enabled": False},
            "health": {"enabled": False},
            "upstream": {"fast_path": fast},
            "backends": [{"url": f"http://127.0.0.1:{18001 + i}"} for i in range(3)],
        },
        "bench",
    )
    log = AccessLog(path=log_path, stdout=False)
    proxy = Proxy(config, log)
    loop = asyncio.get_running_loop()
    upstreams: list[tuple[UpstreamConnection, Transport]] = []
    for pool in proxy.pools:  # one idle keep-alive connection per backend
        conn = UpstreamConnection(pool.backend, loop)
        transport = Transport(("127.0.0.1", pool.backend.port))
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.reusable = True
        pool.active += 1
        pool.release(conn)
        upstreams.append((conn, transport))
    client = ClientConnection(proxy, b"http")
    client_transport = Transport(("127.0.0.1", 40000))
    client.connection_made(client_transport)  # type: ignore[arg-type]
    answer = response(size)

    async def one() -> None:
        client.data_received(REQUEST)
        sent = None
        while sent is None:  # the coroutine path sends from its task
            for conn, transport in upstreams:
                if transport.written:
                    transport.written.clear()
                    sent = conn
                    break
            else:
                await asyncio.sleep(0)
        sent.data_received(answer)
        while not client_transport.written:
            await asyncio.sleep(0)
        client_transport.written.clear()
        while proxy.in_flight:
            await asyncio.sleep(0)

    for _ in range(200):  # warm up
        await one()
    started = time.process_time()
    for _ in range(requests):
        await one()
    spent = time.process_time() - started
    served = proxy.fast_served
    client.connection_lost(None)
    proxy.close()
    log.close()
    if fast and served < requests:
        raise SystemExit(f"only {served} of {requests} exchanges took the fast path")
    return spent / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", default="fast,coroutine")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as the workers do)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    paths = args.paths.split(",")
    results: dict[str, list[float]] = {p: [] for p in paths}
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "access.log")
        for _ in range(args.rounds):
            for path in paths:
                us = asyncio.run(run(path == "fast", args.requests, args.size, log_path))
                results[path].append(us)
    print(f"{args.requests} exchanges x {args.rounds} rounds, {args.size}-byte responses")
    for path, values in results.items():
        runs = " ".join(f"{v:.1f}" for v in values)
        print(f"  {path:<10} {statistics.median(values):6.1f} us/exchange  (runs: {runs})")


if __name__ == "__main__":
    main()
