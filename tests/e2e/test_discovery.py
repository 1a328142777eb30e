"""Backends found by DNS: the set follows the records without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_discovery_dns import TinyDNS
from tests.support import free_port, start_backend, start_pibl_process, stop_process, wait_port

pytestmark = pytest.mark.e2e


def test_dns_backends_added_and_removed_without_restart(tmp_path: Path) -> None:
    dns = TinyDNS(ttl=1)
    port = free_port()
    apps = {
        addr: start_backend(f"app-{addr}", port, host=addr) for addr in ("127.0.0.2", "127.0.0.3")
    }
    dns.records["app.svc.pibl.test."] = ["127.0.0.2"]
    proxy_port = free_port()
    cfg = tmp_path / "pibl.toml"
    cfg.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {proxy_port}
workers = 2
[discovery]
interval = 0.5
timeout = 1
nameservers = ["{dns.address}"]
[cache]
enabled = false
[health]
enabled = false
[log]
stdout = false
[[backends]]
name = "app"
url = "http://app.svc.pibl.test:{port}"
discover = true
"""
    )
    proc = start_pibl_process(cfg, tmp_path)
    master_pid = proc.pid

    def seen(n: int = 12) -> set[str]:
        with httpx.Client(timeout=5) as client:
            return {
                client.get(f"http://127.0.0.1:{proxy_port}/x").headers["x-backend"]
                for _ in range(n)
            }

    def wait_for(expected: set[str]) -> float:
        started = time.monotonic()
        while time.monotonic() - started < 10:
            if seen() == expected:
                return time.monotonic() - started
            time.sleep(0.2)
        pytest.fail(f"backend set never became {expected}")

    try:
        wait_port(proxy_port)
        time.sleep(0.5)
        assert seen() == {"app-127.0.0.2"}
        dns.records["app.svc.pibl.test."] = ["127.0.0.2", "127.0.0.3"]
        added = wait_for({"app-127.0.0.2", "app-127.0.0.3"})
        dns.records["app.svc.pibl.test."] = ["127.0.0.3"]
        removed = wait_for({"app-127.0.0.3"})
        assert proc.poll() is None and proc.pid == master_pid  # never restarted
        log = (tmp_path / "pibl.log").read_text()
        assert "discovery: the backend set changed" in log
        print(
            f"address added: in rotation after {added:.2f} s; removed: drained after {removed:.2f} s"
        )
    finally:
        stop_process(proc)
        for app in apps.values():
            app.stop()
        dns.stop()
