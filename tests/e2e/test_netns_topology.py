"""``deploy/netns-topology.sh all``: the four-host deployment built from network namespaces.

The script creates a bridge and five namespaces (PIBL, three replicas, a client), runs the
replicas and PIBL in them, checks round robin and the shared guestbook through PIBL and tears
everything down. It needs root and iproute2; the test is skipped where namespaces cannot be
created (an unprivileged container, for example).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import namespaces, processes_mentioning, require_namespaces

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "netns-topology.sh"
RUN_TIMEOUT = 120.0
ROUND_ROBIN = "round robin: replica-1 replica-2 replica-3 replica-1 replica-2 replica-3"


@pytest.mark.timeout(RUN_TIMEOUT + 90)
def test_netns_topology_all_round_robin_and_shared_guestbook(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="needs the app extra (pip install 'pibl[app]')")
    prefix = f"pt{os.getpid() % 100000}{secrets.token_hex(2)}-"
    require_namespaces(prefix)
    state = tmp_path / "state"
    env = dict(
        os.environ,
        PIBL_NS_PREFIX=prefix,
        PIBL_NS_STATE=str(state),
        PIBL_VENV=sys.prefix,
    )
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "all"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the script's trap tears the topology down
            try:
                output, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            pytest.fail(f"netns-topology.sh all took longer than {RUN_TIMEOUT:.0f} s:\n{output}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        down = subprocess.run(
            ["bash", str(SCRIPT), "down"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, output
    assert ROUND_ROBIN in output, output
    assert "visible on 3 of 3 replicas" in output, output
    assert "result   : PASS" in output, output
    assert down.returncode == 0, down.stdout + down.stderr
    assert [ns for ns in namespaces() if ns.startswith(prefix)] == []
    assert processes_mentioning(str(state)) == []
    assert not state.exists()
