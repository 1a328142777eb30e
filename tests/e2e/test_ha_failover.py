"""``deploy/ha-topology.sh all``: two PIBL hosts sharing a virtual IP with keepalived.

The script builds a bridge and seven namespaces (lb1, lb2, three replicas, a client), runs
PIBL and keepalived (VRRP) on both lb hosts, sends requests from the client to the virtual
IP, kills PIBL and keepalived on the master with SIGKILL (a host failure) and measures how
long until requests succeed again through the other host. It needs root, iproute2, curl
and keepalived (installed with apt-get when missing); the test is skipped where namespaces
cannot be created or keepalived cannot be installed.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import namespaces, processes_mentioning, require_namespaces

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "ha-topology.sh"
DEPS_TIMEOUT = 45.0  # installing keepalived with apt-get, when it is missing
RUN_TIMEOUT = 75.0  # up, check and down take about 20 s
MAX_RESUME = 5.0
SUMMARY = re.compile(
    r"^failover: service resumed after (?P<resume>\d+\.\d+) s, "
    r"(?P<failed>\d+) failed requests of (?P<total>\d+)$",
    re.MULTILINE,
)


def require_keepalived(env: dict[str, str]) -> None:
    """Skip unless keepalived is installed or can be installed (``ha-topology.sh deps``)."""
    try:
        deps = subprocess.run(
            ["bash", str(SCRIPT), "deps"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=DEPS_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        # apt-get is left to finish (killing dpkg halfway would be worse): the next run has it
        pytest.skip(f"keepalived could not be installed within {DEPS_TIMEOUT:.0f} s")
    if deps.returncode == 3:
        pytest.skip(f"keepalived is not available: {deps.stderr.strip()}")
    assert deps.returncode == 0, deps.stdout + deps.stderr


@pytest.mark.timeout(150)
def test_ha_failover_resumes_within_five_seconds(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="needs the app extra (pip install 'pibl[app]')")
    if shutil.which("curl") is None:
        pytest.skip("needs curl (deploy/ha/check_pibl.sh uses it)")
    prefix = f"ha{os.getpid() % 100000}{secrets.token_hex(2)}-"
    require_namespaces(prefix)
    state = tmp_path / "state"
    env = dict(
        os.environ,
        PIBL_NS_PREFIX=prefix,
        PIBL_NS_STATE=str(state),
        PIBL_VENV=sys.prefix,
        PIBL_HA_MAX_RESUME=str(MAX_RESUME),
    )
    require_keepalived(env)
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
                output, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            pytest.fail(f"ha-topology.sh all took longer than {RUN_TIMEOUT:.0f} s:\n{output}")
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
            timeout=15,
            check=False,
        )
    assert proc.returncode == 0, output
    match = SUMMARY.search(output)
    assert match is not None, output
    resume, failed, total = (
        float(match["resume"]),
        int(match["failed"]),
        int(match["total"]),
    )
    assert resume < MAX_RESUME, output
    assert 0 <= failed < total, output
    assert "served by {'pibl-lb1':" in output, output  # before: the master, lb1
    assert "served by {'pibl-lb2':" in output, output  # after: the backup took over
    assert "result: PASS" in output, output
    assert down.returncode == 0, down.stdout + down.stderr
    assert [ns for ns in namespaces() if ns.startswith(prefix)] == []
    assert processes_mentioning(str(state)) == []
    assert not state.exists()
