"""Test helpers: real backend servers on loopback and PIBL running in a thread or process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import io
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pibl.config import validate
from pibl.observe.accesslog import AccessLog
from pibl.proxy.server import Worker
from pibl.workers import event_loop_factory

# PIBL_TEST_EVENT_LOOP=asyncio runs the in-process proxies on asyncio's loop instead of the
# configured default ("auto": uvloop where installed, as users run it).
TEST_EVENT_LOOP = os.environ.get("PIBL_TEST_EVENT_LOOP", "")

BLOCK = random.Random(0).randbytes(64 * 1024)  # 64 KiB of incompressible bytes


def pattern(size: int) -> Iterator[bytes]:
    """``size`` random (incompressible, never repeating) bytes, the same for the same size.

    Tests about size must not pass because a compressor shrank a repetitive body.
    """
    rng = random.Random(size)
    left = size
    while left > 0:
        n = min(left, len(BLOCK))
        yield rng.randbytes(n)
        left -= n


def sized_body(size: int) -> bytes:
    return b"".join(pattern(size))


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for block in pattern(size):
        h.update(block)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    method: str
    path: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass
class Backend:
    name: str
    server: http.server.ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)
    stall: threading.Event = field(default_factory=threading.Event)
    connections: int = 0
    hits: int = 0
    clock_offset: float = 0.0  # added to the Date header, for tests with an injected clock
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop listening and cut every open connection, like a killed process would."""
        self.stall.set()
        self.server.shutdown()
        self.server.server_close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    backend: Backend

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.backend.connections += 1
        self.backend.sockets.append(self.connection)

    def date_time_string(self, timestamp: float | None = None) -> str:
        return super().date_time_string(time.time() + self.backend.clock_offset)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = io.BytesIO()
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out.getvalue()
                out.write(self.rfile.read(size))
                self.rfile.read(2)
        length = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(length) if length else b""

    def _hash_body(self) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = self._read_body()
            return len(data), hashlib.sha256(data).hexdigest()
        left = int(self.headers.get("Content-Length", "0") or 0)
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            left -= len(chunk)
        return n, h.hexdigest()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("X-Backend", self.backend.name)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        record = Seen(self.command, self.path, self.request_version, list(self.headers.items()))
        self.backend.seen.append(record)
        if parts.path == "/upload":
            n, digest = self._hash_body()
            self._send(200, f"{n} {digest}".encode())
            return
        record.body = self._read_body()
        if parts.path == "/download":
            size = int(query.get("size", "0"))
            self.send_response(200)
            self.send_header("X-Backend", self.backend.name)
            if query.get("chunked"):
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for block in pattern(size):
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(block), block))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(size))
                self.end_headers()
                for block in pattern(size):
                    self.wfile.write(block)
            return
        if parts.path == "/text":  # compressible, streamed in blocks, chunked
            size = int(query.get("size", "0"))
            line = b"PIBL streams this line again and again to test compression.\n" * 1024
            self.send_response(200)
            self.send_header("X-Backend", self.backend.name)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            left = size
            while left > 0:
                block = line[: min(left, len(line))]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(block), block))
                left -= len(block)
            self.wfile.write(b"0\r\n\r\n")
            return
        if parts.path == "/drop":  # a "query of death": the connection closes, no answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if parts.path == "/stall":
            self.backend.stall.wait(30)
            return
        if parts.path == "/slow":
            time.sleep(float(query.get("s", "1")))
        if parts.path == "/close":  # no Content-Length, body delimited by close
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until-close")
            self.close_connection = True
            return
        if parts.path == "/status":
            code = int(query.get("code", "200"))
            self._send(code, b"" if code in (204, 304) else b"status body")
            return
        if parts.path.startswith("/cache"):
            self._cache_endpoint(query)
            return
        if parts.path == "/headers":  # repeated fields and hop-by-hop ones, in this order
            self.send_response(200)
            for name, value in (
                ("Set-Cookie", "a=1"),
                ("X-Private", "secret"),
                ("Set-Cookie", "b=2"),
                ("Keep-Alive", "timeout=5"),
                ("Connection", "X-Private"),
                ("Content-Length", "1"),
            ):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(b"x")
            return
        body = f"{self.backend.name} {self.command} {self.path}".encode()
        if record.body:
            body += b" body=" + record.body
        self._send(200, body, headers={"Content-Type": "text/plain"})

    def _cache_endpoint(self, query: dict[str, str]) -> None:
        """A resource whose caching headers come from the query string.

        cc=Cache-Control, etag=, lm=Last-Modified, vary=, expires=, age=, cdncc=CDN-Cache-Control,
        pcc=PIBL-Cache-Control, delay=seconds, status=, cookie=1 (adds Set-Cookie), size=N
        (body of N bytes).
        The body names the backend and counts how often this backend served it.
        """
        if "delay" in query:
            time.sleep(float(query["delay"]))
        self.backend.hits += 1
        headers = {"Content-Type": "text/plain"}
        for param, name in (
            ("cc", "Cache-Control"),
            ("etag", "ETag"),
            ("lm", "Last-Modified"),
            ("vary", "Vary"),
            ("expires", "Expires"),
            ("loc", "Content-Location"),
            ("age", "Age"),
            ("cdncc", "CDN-Cache-Control"),
            ("pcc", "PIBL-Cache-Control"),
        ):
            if param in query:
                headers[name] = query[param]
        if query.get("cookie"):
            headers["Set-Cookie"] = "session=1"
        etag = query.get("etag")
        inm = self.headers.get("If-None-Match")
        if etag and inm and etag in [t.strip() for t in inm.split(",")]:
            self._send(304, b"", headers=headers)
            return
        status = int(query.get("status", "200"))
        if "size" in query:
            body = sized_body(int(query["size"]))
        else:
            body = f"{self.backend.name} hit {self.backend.hits} {self.headers.get('Accept-Language', '')}".encode()
        self._send(status, body, headers=headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 drops connections under load


class InFlight:
    """Counts the requests a test backend is handling at once; ``peak`` is the most seen."""

    def __init__(self, backend: Backend) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()
        handler = backend.server.RequestHandlerClass
        original = handler.do_GET  # type: ignore[attr-defined]

        def counting(request: Any) -> None:
            with self._lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                original(request)
            finally:
                with self._lock:
                    self.now -= 1

        handler.do_GET = counting  # type: ignore[attr-defined]


def start_backend(name: str, port: int = 0, host: str = "127.0.0.1") -> Backend:
    handler = type(f"Handler_{name}", (_Handler,), {})
    server = _Server((host, port), handler)
    server.daemon_threads = True
    backend = Backend(name, server)
    handler.backend = backend  # type: ignore[attr-defined]
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return backend


class ProxyThread:
    """PIBL's worker on its own event loop in a thread, listening on a free port."""

    def __init__(self, settings: dict[str, Any], log_path: str | None = None) -> None:
        settings = dict(settings)
        server = dict(settings.get("server", {}))
        server.setdefault("host", "127.0.0.1")
        server.setdefault("port", free_port())
        settings["server"] = server
        settings.setdefault("cache", {"enabled": False})
        settings.setdefault("health", {"enabled": False})  # probes would show up in `seen`
        if TEST_EVENT_LOOP:  # the suite can be run again under another loop
            server.setdefault("event_loop", TEST_EVENT_LOOP)
        if os.environ.get("PIBL_FAST_PATH") == "0":  # the suite again on the coroutine path
            upstream = dict(settings.get("upstream", {}))
            upstream.setdefault("fast_path", False)
            settings["upstream"] = upstream
        self.config = validate(settings, "test")
        self.stream = io.StringIO()
        self.log = AccessLog(path=log_path, stream=self.stream)
        # the loop PIBL itself would run (uvloop with the defaults), not asyncio's by default
        self.loop = event_loop_factory(self.config.server.event_loop)[0]()
        self.worker: Worker | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def main() -> None:
                self.worker = Worker(self.config, self.log)
                await self.worker.start()
                ready.set()
                await self.worker.wait_stopped()

            self.loop.run_until_complete(main())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("proxy did not start")

    @property
    def port(self) -> int:
        return self.config.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        time.sleep(0.1)
        return [line for line in self.stream.getvalue().splitlines() if '"' in line]

    def record_loop_errors(self) -> list[dict[str, Any]]:
        """What the event loop would report as unhandled (e.g. never-retrieved exceptions)."""
        errors: list[dict[str, Any]] = []
        done = threading.Event()

        def install() -> None:
            self.loop.set_exception_handler(lambda _loop, context: errors.append(context))
            done.set()

        self.loop.call_soon_threadsafe(install)
        done.wait(5)
        return errors

    def stop(self) -> None:
        if self.worker is not None:
            self.loop.call_soon_threadsafe(self.worker.request_stop)
        self.thread.join(10)
        self.log.close()


class RawServer:
    """A loopback TCP server for backends that misbehave on purpose.

    Each accepted connection is handed to ``handle`` in its own thread (with a 5 s socket
    timeout) and closed afterwards; ``close()`` stops listening and closes what is open.
    """

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.handle = handle
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            self.handle(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()


def raw_request(port: int, data: bytes, *, timeout: float = 5.0, read_all: bool = True) -> bytes:
    """Send raw bytes, read until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_all:
                    break
        return b"".join(chunks)


def read_responses(
    sock: socket.socket, count: int, heads: frozenset[int] = frozenset()
) -> list[bytes]:
    """Read ``count`` responses (Content-Length framed; those in ``heads`` answer HEAD)."""
    data = b""
    out: list[bytes] = []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = 0 if len(out) in heads else int(value)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            rest += chunk
        out.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return out


def write_config(path: Path, port: int, backends: list[str], extra: str = "") -> Path:
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", ""]
    lines.append(extra)
    for url in backends:
        lines += ["[[backends]]", f'url = "{url}"', ""]
    path.write_text("\n".join(lines))
    return path


def start_pibl_process(config: Path, cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pibl", "run", "--config", str(config), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def wait_for(check: Callable[[], object], timeout: float = 2.0) -> bool:
    """Poll ``check`` (the backends record things from their own threads)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


def wait_serving(workdir: Path, timeout: float = 20.0) -> None:
    """Until every worker of a ``pibl run`` in ``workdir`` (default log file) is serving.

    The port accepts as soon as the first worker listens; the master logs its "serving"
    line once all of them are ready (timing tests want none still starting).
    """
    log = workdir / "pibl.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and any(
            line.split("] ", 1)[-1].startswith("master ") and " serving " in line
            for line in log.read_text(errors="replace").splitlines()
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"pibl in {workdir} not serving after {timeout} s")


def wait_closed(port: int, timeout: float = 10.0) -> None:
    """Until nothing accepts on ``port`` (a killed master's workers die a moment later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} still accepts connections")


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_rss_kib(pid: int) -> int:
    return sum(rss_kib(p) for p in process_tree(pid))


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it is still running after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
