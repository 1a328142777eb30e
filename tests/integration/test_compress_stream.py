"""pibl.compress over a real socket, decoded by a real HTTP client (httpx).

A tiny asyncio server streams server-sent events the way the exchange will: ``plan()``
picks the coding, ``rewrite_headers()`` or ``add_vary_accept_encoding()`` fix the head,
each event is compressed and flushed into its own chunk, and costly levels run in a
thread. The server sends the next event only once the client has *decoded* the previous
one, so a flush that left bytes behind in the compressor would hang (and time out)
instead of passing by luck.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from pibl.compress import (
    CompressionSettings,
    add_vary_accept_encoding,
    compressible,
    expensive,
    make_compressor,
    plan,
    rewrite_headers,
)

pytest.importorskip("brotli")
pytest.importorskip("zstandard")

EVENTS = [b"data: %d %s\n\n" % (i, b"tick " * (i * 40)) for i in range(6)]
RESPONSE = [
    (b"Content-Type", b"text/event-stream; charset=utf-8"),
    (b"Cache-Control", b"no-cache"),
    (b"ETag", b'"stream-1"'),
]


class EventServer:
    """Serves one compressed event stream per connection, paced by the client."""

    def __init__(self, config: CompressionSettings) -> None:
        self.config = config
        self.received: list[asyncio.Event] = [asyncio.Event() for _ in EVENTS]
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head[:-4].split(b"\r\n")
        method = request_line.split(b" ", 1)[0]
        request_headers = [
            (name.strip(), value.strip())
            for name, _, value in (line.partition(b":") for line in lines)
        ]
        config = self.config
        encoding = plan(method, 200, request_headers, RESPONSE, config, content_length=None)
        if encoding is not None:
            headers = rewrite_headers(RESPONSE, encoding)
        elif compressible(200, RESPONSE, config, content_length=None):
            headers = add_vary_accept_encoding(RESPONSE)
        else:
            headers = list(RESPONSE)
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"%s: %s\r\n" % pair for pair in headers)
            + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        compressor = make_compressor(encoding, config) if encoding else None
        offload = encoding is not None and expensive(encoding, config)

        async def encode(event: bytes) -> bytes:
            if compressor is None:
                return event

            def work() -> bytes:
                return compressor.compress(event) + compressor.flush()

            return await asyncio.to_thread(work) if offload else work()

        for index, event in enumerate(EVENTS):
            piece = await encode(event)
            if piece:  # an empty chunk would end the body
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await writer.drain()
            await self.received[index].wait()  # the client has decoded this event
        tail = compressor.finish() if compressor is not None else b""
        if tail:
            writer.write(b"%x\r\n%b\r\n" % (len(tail), tail))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()


@asynccontextmanager
async def serve(config: CompressionSettings) -> AsyncIterator[EventServer]:
    server = EventServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


CHEAP = CompressionSettings()
COSTLY = CompressionSettings(gzip_level=9, brotli_quality=9, zstd_level=12)


@pytest.mark.parametrize("config", [CHEAP, COSTLY], ids=["default-levels", "thread-pool"])
@pytest.mark.parametrize(
    ("accept", "encoding"),
    [("br", "br"), ("zstd", "zstd"), ("gzip", "gzip"), ("identity", None)],
)
async def test_events_arrive_decoded_one_by_one(
    config: CompressionSettings, accept: str, encoding: str | None
) -> None:
    async with serve(config) as server:
        url = f"http://127.0.0.1:{server.port}/events"
        async with (
            asyncio.timeout(10),
            httpx.AsyncClient() as client,
            client.stream("GET", url, headers={"Accept-Encoding": accept}) as response,
        ):
            assert response.status_code == 200
            assert response.headers.get("content-encoding") == encoding
            assert "content-length" not in response.headers
            assert "accept-encoding" in response.headers["vary"].lower()
            expected_etag = '"stream-1"' if encoding is None else 'W/"stream-1"'
            assert response.headers["etag"] == expected_etag
            if encoding is not None:  # the costly levels did go through the thread pool
                assert expensive(encoding, config) is (config is COSTLY)
            decoded = b""
            done = 0
            async for data in response.aiter_bytes():
                decoded += data
                while done < len(EVENTS) and len(decoded) >= sum(map(len, EVENTS[: done + 1])):
                    server.received[done].set()
                    done += 1
            assert decoded == b"".join(EVENTS)
            assert done == len(EVENTS)
