"""Listening sockets and the life of one worker: start, serve, stop gracefully.

Stop order (SIGTERM/SIGINT): stop accepting; close connections that have no request in
flight; let in-flight exchanges finish until the ``shutdown`` deadline; abort the rest;
close the upstream pools; flush the log.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from pibl import compress
from pibl.balance.checker import run_checks
from pibl.balance.shared import SharedBalance
from pibl.cache.key import Normalizer
from pibl.cache.store import DiskStore
from pibl.compress import CompressionSettings
from pibl.config import Config, TLSConfig, resolve_path
from pibl.errors import ConfigError
from pibl.observe.accesslog import AccessLog
from pibl.observe.admin import start_admin
from pibl.observe.status import ProxyAdmin
from pibl.ports import make_socket
from pibl.proxy.cached import CacheLayer
from pibl.proxy.client import ClientConnection
from pibl.proxy.exchange import Proxy
from pibl.proxy.upstream import probe
from pibl.tls import CertPair, ReloadableServerContext, describe


class Lines(Protocol):
    def info(self, text: str) -> None: ...
    def warning(self, text: str) -> None: ...


async def announce_backends(config: Config, log: Lines) -> None:
    """One line per backend at startup, reachable or not."""
    backends = config.all_backends
    results = await asyncio.gather(*(probe(b, 1.0) for b in backends))
    for backend, problem in zip(backends, results, strict=True):
        if problem is None:
            log.info(f"backend {backend.label} ({backend.url}) weight={backend.weight}: reachable")
        else:
            log.warning(
                f"backend {backend.label} ({backend.url}) weight={backend.weight}: "
                f"NOT reachable ({problem})"
            )


def accept_encoding_normalizer(settings: CompressionSettings | None) -> Normalizer | None:
    """Vary: Accept-Encoding keyed by what PIBL negotiates plus what the client accepts.

    Browsers send many spellings of the same preferences; keying on the negotiated coding
    shares one variant between them, and adding the accepted set keeps a backend's own
    choice of coding from reaching a client that does not accept it.
    """
    if settings is None:
        return None
    offered = tuple(e for e in settings.encodings if e in compress.available_encodings())

    def normalize(name: str, values: list[bytes]) -> bytes | None:
        if name != "accept-encoding":
            return None
        chosen = compress.negotiate(values, offered) or "identity"
        accepted = ",".join(compress.accepted_codings(values)) if values else "-"
        return f"{chosen}|{accepted}".encode()

    return normalize


def validate_runtime(config: Config, source: str = "config") -> None:
    """Checks that need the files a config names (certificates); raise ConfigError."""
    from pibl.preflight import config_problems

    problems = config_problems(config, source)
    if problems:
        raise ConfigError("\n".join(problems))


def make_tls(tls: TLSConfig) -> ReloadableServerContext:
    pairs = [CertPair(resolve_path(tls.cert), resolve_path(tls.key))]
    pairs += [
        CertPair(resolve_path(c.cert), resolve_path(c.key), tuple(c.names))
        for c in tls.certificates
    ]
    return ReloadableServerContext(pairs, tls.alpn)


def make_cache(proxy: Proxy, config: Config, log: AccessLog) -> CacheLayer:
    cfg = config.cache
    directory = resolve_path(cfg.dir)
    store = DiskStore(
        directory,
        max_size=cfg.max_size,
        fsync=cfg.fsync,
        memory_max=cfg.memory_max,
        memory_entry_max=cfg.memory_entry_max,
        normalize=accept_encoding_normalizer(proxy.compression),
    )
    store.start_indexing()
    log.info(f"cache: {directory} (ttl {cfg.ttl:g} s, max {cfg.max_size} bytes)")
    layer = CacheLayer(proxy, cfg, store)
    if cfg.store == "redis":
        from pibl.cache.redis_tier import RedisTier  # needs the optional redis package

        layer.remote = RedisTier(
            cfg.redis_url,
            store,
            log=log.warning,
            on_error=proxy.metrics.redis_errors.inc,
            prefix=cfg.redis_prefix,
            timeout=cfg.redis_timeout,
            extra_ttl=cfg.max_stale_on_error,
            max_entry=cfg.max_entry_size,
        )
        log.info(f"cache: shared tier on {cfg.redis_url} (prefix {cfg.redis_prefix})")
    return layer


class Worker:
    """One event loop serving the configured listeners."""

    def __init__(self, config: Config, log: AccessLog, shared: SharedBalance | None = None) -> None:
        self.config = config
        self.log = log
        self.proxy = Proxy(config, log, shared)
        if config.cache.enabled:
            self.proxy.cache = make_cache(self.proxy, config, log)
        self.servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._checks: list[asyncio.Task[None]] = []
        self.tls: ReloadableServerContext | None = None

    async def start(self, socks: list[socket.socket] | None = None) -> None:
        """Serve on ``socks`` (plain HTTP, then HTTPS when [tls] is set), or open them."""
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        cfg = self.config.server
        backlog = cfg.listen_backlog
        tls = self.config.tls if self.config.tls is not None and self.config.tls.enabled else None
        if socks is None:
            socks = [make_socket(cfg.host, cfg.port, backlog=backlog)]
            if tls is not None:
                socks.append(make_socket(cfg.host, tls.port, backlog=backlog))
        server = await loop.create_server(
            lambda: ClientConnection(proxy, b"http"), sock=socks[0], backlog=backlog
        )
        self.servers.append(server)
        addr = socks[0].getsockname()
        self.log.info(f"listening on http://{addr[0]}:{addr[1]}")
        if tls is not None and len(socks) > 1:
            self.tls = make_tls(tls)
            server = await loop.create_server(
                lambda: ClientConnection(proxy, b"https"),
                sock=socks[1],
                backlog=backlog,
                ssl=self.tls.context,
                ssl_handshake_timeout=self.config.timeouts.client_header,
            )
            self.servers.append(server)
            addr = socks[1].getsockname()
            self.log.info(
                f"listening on https://{addr[0]}:{addr[1]} ({describe(self.tls.context)})"
            )
        admin = self.config.admin
        if admin is not None and admin.enabled:
            server = await start_admin(
                ProxyAdmin(proxy),
                host=admin.host,
                port=admin.port,
                token=admin.token,
                sock=make_socket(admin.host, admin.port, backlog=backlog),
                backlog=backlog,
            )
            self.servers.append(server)
            self.log.info(f"admin on http://{admin.host}:{admin.port}/")
        if proxy.cache is not None and proxy.cache.remote is not None:
            proxy.cache.remote.start()
        self._sweeper = loop.create_task(self._sweep())
        self._start_health_checks()
        if proxy.shadow is not None:
            proxy.shadow.start()  # return verification, the version probe

    def _start_health_checks(self) -> None:
        """One prober per backend, with its pool's [health] settings."""
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        for index, (backend, pool) in enumerate(zip(proxy.backends, proxy.pools, strict=True)):
            health = proxy.group_of[index].health
            if not health.enabled or backend.health_check is False:
                continue
            self._checks.append(
                loop.create_task(
                    run_checks(
                        backend,
                        functools.partial(proxy.record_check, index),
                        path=backend.health_path or health.path,
                        interval=health.interval,
                        timeout=health.timeout,
                        status_range=(health.status_min, health.status_max),
                        log=self.log.warning,
                        ssl_context=pool.ssl_context,
                        fast=functools.partial(proxy.probing_fast, index),
                        fast_interval=health.down_interval,
                    )
                )
            )

    @property
    def port(self) -> int:
        sockets = self.servers[0].sockets
        return int(sockets[0].getsockname()[1])

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        proxy = self.proxy
        proxy.stopping = True
        for server in self.servers:
            server.close()
        started = time.monotonic()
        deadline = started + self.config.timeouts.shutdown
        # For a short grace period idle keep-alive connections stay open: a client about to
        # reuse one gets its answer with "Connection: close" instead of a reset. After it,
        # idle connections are closed and only in-flight requests are waited for.
        grace = started + min(1.0, self.config.timeouts.shutdown / 2)
        while time.monotonic() < deadline:
            if time.monotonic() >= grace:
                for conn in list(proxy.connections):
                    conn.close_if_idle()
            if not proxy.connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(proxy.connections):
            conn.abort()
        for _ in range(3):  # let the aborted exchanges log and count themselves
            await asyncio.sleep(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._checks:
            task.cancel()
        if proxy.shadow is not None:
            proxy.shadow.stop()
        if proxy.cache is not None:
            proxy.cache.close()
            if proxy.cache.remote is not None:
                await proxy.cache.remote.close()
        proxy.close()

    async def _sweep(self) -> None:
        """Once a second: live status, gauges; now and then: idle pooled connections."""
        interval = max(1.0, self.config.timeouts.upstream_idle / 2)
        last_sweep = time.monotonic()
        proxy = self.proxy
        metrics = proxy.metrics
        stored = evictions = 0
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if now - last_sweep >= interval:
                proxy.sweep_pools()
                last_sweep = now
            for state in proxy.states:
                metrics.backend_up.labels(state.name).set(1 if state.available(now) else 0)
            if proxy.cache is not None:
                proxy.cache.store.resync_if_due(now)  # follow other processes' purges
                stats = proxy.cache.store.stats
                metrics.cache_stored.inc(stats.stored - stored)
                metrics.cache_evictions.inc(stats.evictions - evictions)
                stored, evictions = stats.stored, stats.evictions
                metrics.cache_size.set(stats.bytes)
                metrics.cache_entries.set(stats.entries)
            metrics.batch.flush()
            proxy.status.tick()


def log_loop_error(log: AccessLog, context: dict[str, Any]) -> None:
    """What the event loop could not hand to anyone goes to PIBL's own log, not to stderr."""
    message = str(context.get("message") or "unexpected error in the event loop")
    exc = context.get("exception")
    if isinstance(exc, BaseException):
        trace = "".join(traceback.format_exception(exc)).rstrip()
        message = f"{message}\n{trace}"
    log.error(message)


async def run_worker(
    config: Config,
    log: AccessLog,
    *,
    sock: list[socket.socket] | None = None,
    on_ready: Callable[[Worker], None] | None = None,
    announce: bool = True,
    shared: SharedBalance | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: log_loop_error(log, context))
    if announce:
        await announce_backends(config, log)
    worker = Worker(config, log, shared)
    await worker.start(sock)
    loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
    loop.add_signal_handler(signal.SIGINT, worker.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, log.reopen)
    if on_ready is not None:
        on_ready(worker)
    await worker.wait_stopped()
    log.info("stopped")
