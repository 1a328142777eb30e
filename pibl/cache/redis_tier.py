"""A shared second cache tier on Redis (or Valkey): what one PIBL cached, every PIBL serves.

Each node keeps its local disk store as the first tier (hits stay local and are served
with ``sendfile``); Redis is consulted on a local miss and fed after a local store:

* **layout** — ``<prefix>m:<digest>`` holds an entry's metadata (the same fields as the
  disk store, plus the number of body chunks) or a Vary pointer; the body is split into
  ``<prefix>b:<digest>:<nonce>:<i>`` chunks of 256 KiB, so neither side ever holds a whole
  large body in memory. Chunks are written before the metadata that names them, and every
  key expires by the entry's own freshness plus the allowed staleness;
* **coalescing across the fleet** — the node that misses first takes
  ``SET <prefix>lock:<digest> NX PX``; the others wait for the metadata to appear (bounded)
  and hydrate from Redis instead of asking the backend;
* **purges reach every node** — a purge or an invalidation deletes the keys and publishes
  the primary key on ``<prefix>purge``; every node drops its local copy;
* **Redis trouble never stops PIBL** — every call has a short timeout; a failure is logged,
  counted, and Redis is skipped for a few seconds (local tier and backends keep working).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pibl.cache import policy
from pibl.cache.key import digest, secondary_key, variant_digest
from pibl.cache.store import DiskStore, Entry
from pibl.http.message import HeaderList
from pibl.limits import Verdict

CHUNK = 256 * 1024
BACKOFF = 5.0  # seconds Redis is left alone after a failure


# nginx's limit_req bucket (see pibl.limits), kept in Redis with the server's clock: returns
# {1, excess} when the request passes, {0, seconds until one fits} when it does not.
_LEAKY_BUCKET = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'e', 't')
local new = 0
if v[1] then
  local e, last = tonumber(v[1]), tonumber(v[2])
  local elapsed = math.max(0, now - last)
  new = math.max(0, e - rate * elapsed + 1)
  if new > burst then
    return {0, tostring((e - rate * elapsed + 1 - burst) / rate)}
  end
end
redis.call('HSET', KEYS[1], 'e', tostring(new), 't', tostring(now))
redis.call('EXPIRE', KEYS[1], ttl)
return {1, tostring(new)}
"""


class RedisTier:
    def __init__(
        self,
        url: str,
        store: DiskStore,
        *,
        log: Callable[[str], None],
        on_error: Callable[[], None] = lambda: None,
        prefix: str = "pibl:",
        timeout: float = 0.5,
        extra_ttl: float = 3600.0,
        max_entry: int = 256 * 1024 * 1024,
    ) -> None:
        self.url = url
        self.store = store
        self.log = log
        self.on_error = on_error
        self.prefix = prefix
        self.timeout = timeout
        self.extra_ttl = extra_ttl
        self.max_entry = max_entry
        self.node = f"{os.uname().nodename}:{os.getpid()}"
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._down_until = 0.0
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.errors = 0

    # -- health -------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self.on_error()
        if self.available:
            self.log(
                f"redis {self.url}: {what} failed ({exc}); "
                f"using the local tier only for {BACKOFF:g} s"
            )
        self._down_until = time.monotonic() + BACKOFF

    async def _call(self, what: str, coro: Any) -> Any:
        if not self.available:
            coro.close()
            return None
        try:
            async with asyncio.timeout(self.timeout * 4):
                return await coro
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(what, exc)
            return None

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self) -> None:
        """Apply purges published by any node (this one included: harmless)."""
        channel = self.prefix + "purge"
        while True:
            try:
                pubsub = self.client.pubsub()
                await pubsub.subscribe(channel)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message.get("data", b"")
                    if data == b"*":
                        await asyncio.to_thread(self.store.purge_all)
                    elif isinstance(data, bytes):
                        self.store.invalidate(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed("purge subscription", exc)
                await asyncio.sleep(BACKOFF)

    # -- keys ---------------------------------------------------------------------------

    def _meta_key(self, hexdigest: str) -> str:
        return f"{self.prefix}m:{hexdigest}"

    def _chunk_key(self, hexdigest: str, nonce: str, i: int) -> str:
        return f"{self.prefix}b:{hexdigest}:{nonce}:{i}"

    # -- reading: hydrate the local tier ------------------------------------------------

    async def _get_json(self, key: str) -> dict[str, Any] | None:
        raw = await self._call("GET", self.client.get(key))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def fetch(self, primary: bytes, request_headers: HeaderList) -> bool:
        """Copy the entry for this request from Redis into the local tier; True if done."""
        if not self.available:
            return False
        hexdigest = digest(primary)
        meta = await self._get_json(self._meta_key(hexdigest))
        if meta is None or meta.get("key") != primary.decode("latin-1"):
            return False
        vary: list[str] = []
        if meta.get("type") == "vary":
            vary = [str(v) for v in meta.get("vary", [])]
            secondary = secondary_key(vary, request_headers, self.store.normalize)
            hexdigest = variant_digest(primary, secondary)
            meta = await self._get_json(self._meta_key(hexdigest))
            if meta is None or meta.get("secondary") != secondary.decode("latin-1"):
                return False
        try:
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["headers"]]
            chunks = int(meta["chunks"])
            nonce = str(meta["nonce"])
            length = int(meta["body_length"])
            writer = self.store.begin(
                primary,
                vary,
                request_headers,
                status=int(meta["status"]),
                reason=str(meta.get("reason", "")).encode("latin-1"),
                headers=headers,
                request_time=float(meta["request_time"]),
                response_time=float(meta["response_time"]),
                initial_age=float(meta["initial_age"]),
                lifetime=float(meta["lifetime"]),
                limit=self.max_entry,
            )
        except (KeyError, TypeError, ValueError):
            return False
        if writer is None:
            return False
        for i in range(chunks):
            data = await self._call(
                "GET chunk", self.client.get(self._chunk_key(hexdigest, nonce, i))
            )
            if data is None:  # expired or evicted under us: never serve a partial body
                writer.abort()
                return False
            writer.write(data)
        if writer.length != length:
            writer.abort()
            return False
        return await asyncio.to_thread(writer.commit) is not None

    # -- writing ------------------------------------------------------------------------

    def _ttl_ms(self, entry: Entry) -> int:
        remaining = entry.lifetime - policy.current_age(
            entry.initial_age, entry.response_time, time.time()
        )
        return max(1000, int((max(0.0, remaining) + self.extra_ttl) * 1000))

    async def push(self, primary: bytes, entry: Entry) -> None:
        """Publish a locally committed entry to Redis (body chunks first, then metadata)."""
        if not self.available:
            return
        vary = policy.vary_names(entry.headers)
        hexdigest = entry.meta_path.stem
        nonce = secrets.token_hex(4)
        ttl = self._ttl_ms(entry)
        chunks = 0
        try:
            fh = open(entry.body_path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            return
        with fh:
            while True:
                data = await asyncio.to_thread(fh.read, CHUNK)
                if not data:
                    break
                key = self._chunk_key(hexdigest, nonce, chunks)
                if await self._call("SET chunk", self.client.set(key, data, px=ttl)) is None:
                    return
                chunks += 1
        meta = entry.to_json()
        meta.update(chunks=chunks, nonce=nonce, node=self.node)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self._meta_key(hexdigest), json.dumps(meta), px=ttl)
        if vary:
            pointer = {"type": "vary", "key": primary.decode("latin-1"), "vary": vary}
            pipe.set(self._meta_key(digest(primary)), json.dumps(pointer), px=ttl)
        await self._call("SET meta", pipe.execute())

    # -- fleet-wide coalescing ----------------------------------------------------------

    async def lock(self, primary: bytes, ms: int) -> bool | None:
        """True: this node fetches; False: another node is fetching; None: Redis is away."""
        key = f"{self.prefix}lock:{digest(primary)}"
        result = await self._call("SET NX", self.client.set(key, self.node, nx=True, px=ms))
        if result is None and not self.available:
            return None
        return bool(result)

    async def rate_limit(self, bucket: int, rate: float, burst: int, delay: bool) -> Verdict | None:
        """One request against a bucket every node shares; None when Redis is away (the
        caller falls back to the node's own buckets)."""
        key = f"{self.prefix}rl:{bucket:x}"
        ttl = max(1, math.ceil((burst + 1) / rate) + 1)
        result = await self._call(
            "EVAL rate limit", self.client.eval(_LEAKY_BUCKET, 1, key, rate, burst, ttl)
        )
        if result is None:
            return None
        allowed, value = int(result[0]), float(result[1])
        if not allowed:
            return Verdict(False, retry_after=max(value, 1.0 / rate))
        return Verdict(True, delay=value / rate if delay else 0.0)

    async def unlock(self, primary: bytes) -> None:
        await self._call("DEL lock", self.client.delete(f"{self.prefix}lock:{digest(primary)}"))

    async def wait_for(self, primary: bytes, request_headers: HeaderList, timeout: float) -> bool:
        """Wait (bounded) until another node published the entry, then hydrate it."""
        deadline = time.monotonic() + timeout
        lock_key = f"{self.prefix}lock:{digest(primary)}"
        while time.monotonic() < deadline and self.available:
            if await self.fetch(primary, request_headers):
                return True
            if not await self._call("EXISTS lock", self.client.exists(lock_key)):
                return await self.fetch(primary, request_headers)
            await asyncio.sleep(0.05)
        return False

    # -- purging ------------------------------------------------------------------------

    async def purge(self, primary: bytes | None) -> None:
        """Remove from Redis and tell every node to drop its local copy."""
        channel = self.prefix + "purge"
        if primary is None:
            cursor = 0
            while True:
                result = await self._call(
                    "SCAN", self.client.scan(cursor, match=f"{self.prefix}[mb]:*", count=500)
                )
                if result is None:
                    break
                cursor, keys = result
                if keys:
                    await self._call("DEL", self.client.delete(*keys))
                if cursor == 0:
                    break
            await self._call("PUBLISH", self.client.publish(channel, b"*"))
            return
        hexdigest = digest(primary)
        meta = await self._get_json(self._meta_key(hexdigest))
        keys = [self._meta_key(hexdigest)]
        if meta is not None and meta.get("type") == "vary":
            # variants are found by their own digests: scan the prefix (bounded by count)
            pattern = f"{self.prefix}m:*"
            cursor = 0
            while True:
                result = await self._call(
                    "SCAN", self.client.scan(cursor, match=pattern, count=500)
                )
                if result is None:
                    break
                cursor, found = result
                for key in found:
                    data = await self._get_json(key.decode() if isinstance(key, bytes) else key)
                    if data is not None and data.get("key") == primary.decode("latin-1"):
                        keys.append(key.decode() if isinstance(key, bytes) else key)
                if cursor == 0:
                    break
        await self._call("DEL", self.client.delete(*keys))
        await self._call("PUBLISH", self.client.publish(channel, primary))
