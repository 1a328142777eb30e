"""Write-side flow control shared by client and backend connections.

asyncio calls ``pause_writing`` when a transport's send buffer passes its high-water mark
and ``resume_writing`` when it drains. Both connection classes react the same way: an
exchange waiting in ``wait_writable`` is released, and in a tunnel (WebSocket) the peer's
reading is paused and resumed, so a slow side slows the other down instead of letting
bytes pile up in memory.
"""

from __future__ import annotations

import asyncio


class WriteFlow(asyncio.Protocol):
    __slots__ = ("_drain_waiter", "_write_paused", "tunnel")

    def __init__(self) -> None:
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.tunnel: asyncio.Transport | None = None  # the peer's transport in a tunnel

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.tunnel is not None:  # this side reads slowly: stop reading the other one
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.tunnel is not None and not self.tunnel.is_closing():
            self.tunnel.resume_reading()
        self.release_drain()

    def release_drain(self) -> None:
        """Wake an exchange waiting for the buffer to drain (also when the peer is gone)."""
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_writable(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._write_paused:
            self._drain_waiter = loop.create_future()
            await self._drain_waiter
