"""The command line as users run it: check-config, run, exit codes and messages."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import Backend, free_port, start_pibl_process, wait_port, write_config

pytestmark = pytest.mark.e2e


def pibl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pibl", *args], capture_output=True, text=True, cwd=cwd, timeout=30
    )


def test_version_and_help() -> None:
    assert pibl("--version").stdout.startswith("pibl ")
    out = pibl("--help").stdout
    for command in ("run", "check-config", "demo"):
        assert command in out


def test_check_config_ok(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "p.toml", 8080, ["http://127.0.0.1:8001"])
    result = pibl("check-config", str(cfg))
    assert result.returncode == 0
    assert '"port": 8080' in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[server]\nport = 8080\nprot = 1\n[[backends]]\nurl='http://a:1'\n",
            "server.prot: unknown key",
        ),
        ("[[backends]]\nurl='ftp://a:1'\n", "backends[0].url: must start with http:// or https://"),
        ("[server]\nport = 70000\n[[backends]]\nurl='http://a:1'\n", "server.port:"),
        ("[server]\nport = 8080\n", "backends: required: at least one backend"),
        ("[server\nport=1", "invalid TOML"),
        ("[[backends]]\nurl='http://a:1'\nweight=0\n", "backends[0].weight:"),
    ],
)
def test_check_config_errors_name_file_key_and_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    result = pibl("check-config", str(cfg))
    assert result.returncode == 2
    assert str(cfg) in result.stderr
    assert expected in result.stderr


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[[backends]]\nurl = 'http://a:1'\nwieght = 2\n")
    result = pibl("run", "--config", str(cfg))
    assert result.returncode == 2
    assert "backends[0].wieght: unknown key" in result.stderr


def test_run_missing_config_exits_2(tmp_path: Path) -> None:
    result = pibl("run", cwd=tmp_path)
    assert result.returncode == 2
    assert "pibl.toml: file not found" in result.stderr


def test_run_announces_backends_serves_and_stops_on_sigterm(
    tmp_path: Path, backends: list[Backend]
) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path / "pibl.toml", 1, [backends[0].url, dead])
    proc = start_pibl_process(cfg, tmp_path, "--port", str(port))
    try:
        wait_port(port)
        r = httpx.get(f"http://127.0.0.1:{port}/hello")
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0
    assert f"backend 127.0.0.1:{backends[0].port} ({backends[0].url}) weight=1: reachable" in text
    assert "NOT reachable" in text
    assert '"GET /hello HTTP/1.1" 200' in text
    # the same record went to the log file in the directory PIBL ran in
    time.sleep(0.1)
    assert '"GET /hello HTTP/1.1" 200' in (tmp_path / "pibl.log").read_text()


def test_demo_without_the_app_extra_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['uvicorn'] = None; from pibl.cli import main; "
        "sys.exit(main(['demo', '--port', '1']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        'pibl demo: the demo web application needs uvicorn: pip install "pibl[app]" '
        "(./demo.sh installs everything)"
    ]


def test_the_web_application_without_its_packages_says_what_to_install(tmp_path: Path) -> None:
    code = "import sys; sys.modules['uvicorn'] = None; import runpy; runpy.run_module('webapp')"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert 'pip install "pibl[app]"' in proc.stderr


def test_check_config_reports_schema_and_certificate_problems_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        "[server]\nprot = 8080\n"  # a typo
        '[tls]\ncert = "nope.pem"\nkey = "nope-key.pem"\n'
        '[[backends]]\nurl = "http://127.0.0.1:8001"\nweight = 0\n'  # out of range
    )
    result = pibl("check-config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{cfg}: ")]
    assert [line.split(": ")[1] for line in lines] == [
        "server.prot",
        "backends[0].weight",
        "tls.cert",
        "tls.key",
    ]
    assert f"{cfg}: tls.cert: nope.pem: cannot read certificate: file not found" in lines
    # the same file with the schema errors fixed: the certificate is still reported the same way
    cfg.write_text(cfg.read_text().replace("prot", "port").replace("weight = 0", "weight = 1"))
    result = pibl("check-config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{cfg}: tls.cert: nope.pem: cannot read certificate: file not found" in result.stderr
    # pibl run says the same
    run = pibl("run", "--config", str(cfg), cwd=tmp_path)
    assert run.returncode == 2
    assert f"{cfg}: tls.cert: nope.pem:" in run.stderr


def test_check_config_names_a_backend_ca_file(tmp_path: Path) -> None:
    cfg = tmp_path / "pibl.toml"
    cfg.write_text('[[backends]]\nurl = "https://127.0.0.1:8443"\nca_file = "gone.pem"\n')
    result = pibl("check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert "pibl.toml: backends[0].ca_file: gone.pem: cannot read CA certificate" in result.stderr
