"""Sending a stored body from an open file to a client, under any event loop.

Why this is not ``loop.sendfile``: uvloop's loop does not implement it (it raises
``NotImplementedError``), and asyncio's own falls back to reads and writes for TLS. PIBL
does what nginx does instead, on every loop:

* plain TCP: the kernel copies the file with ``os.sendfile`` on the client's socket, driven
  by writability. The transport's own buffer is drained first (the response head went
  through it), then PIBL writes to a duplicate of the socket's descriptor, registered
  with the loop for writability (the original is registered by the transport itself, and
  loops refuse a second registration of a transport's descriptor). Nothing else writes to
  the connection meanwhile: the exchange owns it until its response is complete;
* TLS, a transport without a socket, or a client stream without a transport of its own
  (an HTTP/2 stream, whose bytes its connection frames): the file is read in ``CHUNK``
  pieces with ``os.pread`` and written through the transport, pausing while its buffer is above the
  high-water mark, so a slow client holds at most one chunk plus the buffer in memory.

Both send from a descriptor opened before the response head was written: an entry that
another process replaces or removes meanwhile is still sent whole from the open file.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Protocol

CHUNK = 256 * 1024  # bytes per read in the copying path (and per sendfile call)


class _Client(Protocol):
    """What a sender needs of the client connection (``ClientConnection`` provides it)."""

    transport: asyncio.Transport | None  # None: only ``write`` reaches the client
    loop: asyncio.AbstractEventLoop

    @property
    def closed(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    @property
    def write_paused(self) -> bool: ...


def plain_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """The transport's TCP socket when the kernel may write to it directly (no TLS)."""
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(sock, "fileno"):
        return None
    return sock  # type: ignore[no-any-return]


class FileSender:
    """Sends ``length`` bytes of ``fd`` from ``offset`` to ``conn``; ``sent`` counts them."""

    __slots__ = ("conn", "fd", "length", "offset", "sent")

    def __init__(self, conn: _Client, fd: int, length: int, offset: int = 0) -> None:
        self.conn = conn
        self.fd = fd
        self.length = length
        self.offset = offset  # a range of the file (a 206 answer)
        self.sent = 0

    async def run(self) -> None:
        """Send everything, or raise ``ConnectionResetError`` when the client goes away."""
        transport = self.conn.transport
        if self.conn.closed:
            raise ConnectionResetError("client closed the connection")
        sock = plain_socket(transport) if transport is not None else None
        try:
            if sock is not None and transport is not None:
                await self._sendfile(transport, sock.fileno())
            else:
                await self._copy()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionResetError("client closed the connection") from exc
        if self.sent < self.length:
            raise ConnectionResetError("client closed the connection")

    async def _copy(self) -> None:
        conn = self.conn
        while self.sent < self.length and not conn.closed:
            data = os.pread(self.fd, min(CHUNK, self.length - self.sent), self.offset + self.sent)
            if not data:  # the file is shorter than its entry said: cut, never padded
                raise OSError("stored body ended early")
            conn.write(data)
            self.sent += len(data)
            if conn.write_paused:
                await conn.drain()

    async def _sendfile(self, transport: asyncio.Transport, sock_fd: int) -> None:
        conn = self.conn
        await _flushed(conn, transport)
        out = os.dup(sock_fd)
        loop = conn.loop
        try:
            while self.sent < self.length and not conn.closed:
                try:
                    n = os.sendfile(
                        out, self.fd, self.offset + self.sent, min(CHUNK, self.length - self.sent)
                    )
                except BlockingIOError:
                    await _writable(loop, out)
                    continue
                if n == 0:
                    raise OSError("stored body ended early")
                self.sent += n
        finally:
            os.close(out)


async def _flushed(conn: _Client, transport: asyncio.Transport) -> None:
    """Wait until the transport has handed everything it buffered to the kernel."""
    if transport.get_write_buffer_size() == 0:
        return
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0, low=0)  # pause_writing now, resume when empty
    try:
        for _ in range(1000):  # each round waits for a resume; bounded all the same
            if transport.get_write_buffer_size() == 0 or conn.closed:
                return
            if not conn.write_paused:
                await asyncio.sleep(0.005)
            else:
                await conn.drain()
        raise ConnectionResetError("client stopped reading")
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)
