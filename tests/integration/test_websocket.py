"""WebSocket (HTTP Upgrade) tunnelled through PIBL both ways."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from websockets.sync.client import connect
from websockets.sync.server import Server, ServerConnection, serve

from tests.support import ProxyThread


@pytest.fixture
def ws_backend() -> Iterator[Server]:
    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    server = serve(echo, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_websocket_echo_through_proxy(
    ws_backend: Server, make_proxy: Callable[..., ProxyThread]
) -> None:
    port = ws_backend.socket.getsockname()[1]
    proxy = make_proxy([f"http://127.0.0.1:{port}"])
    with connect(f"ws://127.0.0.1:{proxy.port}/chat") as ws:
        assert ws.response.headers["Via"] == "1.1 pibl"
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        blob = bytes(range(256)) * 4000  # 1 MB binary frame, both directions
        ws.send(blob)
        assert ws.recv(timeout=5) == blob
        for i in range(50):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=5) for _ in range(50)] == [f"m{i}" for i in range(50)]
    lines = proxy.log_lines()
    assert any('"GET /chat HTTP/1.1" 101' in line for line in lines)
