"""The wrapper scripts a newcomer runs first: quiet installs, pytest's result line kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls.log"
case "$*" in
    *"install -q -e"*)
        echo "  !! ********* Editable installation. Please be careful with folders ... *********"
        exit "${FAKE_PIP_STATUS:-0}" ;;
esac
exit 0
"""


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", root / "scripts" / "install.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / ".venv" / "bin").mkdir(parents=True)
    fake = root / ".venv" / "bin" / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return root


def _install(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/install.sh"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def _pip_installs(root: Path) -> int:
    calls = (root / ".venv" / "bin" / "calls.log").read_text().splitlines()
    return sum("install -q -e" in call for call in calls)


def test_install_is_quiet_and_runs_pip_only_when_needed(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    first = _install(root)
    assert first.returncode == 0, first.stderr
    assert "Editable installation" not in first.stdout + first.stderr
    assert first.stdout.count("\n") == 1 and "installing PIBL" in first.stdout
    assert _pip_installs(root) == 1
    again = _install(root)  # nothing changed: no pip at all, no output
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert _pip_installs(root) == 1
    with (root / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency\n")
    assert _install(root).returncode == 0
    assert _pip_installs(root) == 2


def test_install_shows_pips_output_when_it_fails(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    failed = _install(root, FAKE_PIP_STATUS="1")
    assert failed.returncode == 1
    assert "Editable installation" in failed.stderr and "pip install failed" in failed.stderr
    assert not (root / ".venv" / ".pibl-installed").exists()


@pytest.mark.parametrize("args", [[], ["-q"], ["-v"]])
def test_test_sh_keeps_the_result_line(tmp_path: Path, args: list[str]) -> None:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "test.sh", root / "test.sh")
    (root / "scripts" / "install.sh").write_text("#!/bin/sh\nexit 0\n")
    (root / "scripts" / "install.sh").chmod(0o755)
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (root / "test_one.py").write_text("def test_one() -> None:\n    assert True\n")
    out = subprocess.run(
        ["bash", "test.sh", *args, "test_one.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
