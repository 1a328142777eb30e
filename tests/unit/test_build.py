"""The choice between the compiled modules and the Python source (pibl/_build.py)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pibl
from pibl import _build

PACKAGE = Path(pibl.__file__).resolve().parent
BUILT = (PACKAGE / _build.MANIFEST).exists()  # compiled once, maybe from older sources
# a compiled build that matches its sources (a stale one is not used)
COMPILED = BUILT and _build.check_manifest(PACKAGE) is None


def write_manifest(package: Path, sources: dict[str, str], interpreter: str | None = None) -> None:
    manifest = {"interpreter": interpreter or _build.interpreter_tag(), "sources": sources}
    (package / _build.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package directory with one compiled-looking module (its source and a manifest)."""
    pkg = tmp_path / "pibl"
    pkg.mkdir()
    (pkg / "mod.py").write_text("VALUE = 1\n")
    write_manifest(pkg, {"pibl/mod.py": _build.source_digest(pkg / "mod.py")})
    return pkg


@pytest.fixture
def no_finder() -> Iterator[None]:
    """Leave ``sys.meta_path`` as it was (``select`` may add the source-only finder)."""
    before = list(sys.meta_path)
    yield
    sys.meta_path[:] = before


def test_not_compiled_runs_the_source(tmp_path: Path) -> None:
    assert _build.select(tmp_path) == ("pure", "not compiled")


def test_a_matching_build_is_used(
    package: Path, monkeypatch: pytest.MonkeyPatch, no_finder: None
) -> None:
    monkeypatch.delenv(_build.PURE_ENV, raising=False)
    assert _build.select(package) == ("compiled", "")
    monkeypatch.setenv(_build.PURE_ENV, "0")  # "0" means not set
    assert _build.select(package) == ("compiled", "")


def test_the_variable_forces_the_source(
    package: Path, monkeypatch: pytest.MonkeyPatch, no_finder: None
) -> None:
    monkeypatch.setenv(_build.PURE_ENV, "1")
    assert _build.select(package) == ("pure", "PIBL_PURE_PYTHON is set")
    assert sum(isinstance(f, _build.SourceOnlyFinder) for f in sys.meta_path) == 1
    _build.select(package)  # (selecting again adds no second finder)
    assert sum(isinstance(f, _build.SourceOnlyFinder) for f in sys.meta_path) == 1


def test_a_changed_source_is_not_hidden_by_an_old_build(
    package: Path, monkeypatch: pytest.MonkeyPatch, no_finder: None
) -> None:
    monkeypatch.delenv(_build.PURE_ENV, raising=False)
    (package / "mod.py").write_text("VALUE = 2\n")
    build, reason = _build.select(package)
    assert build == "pure"
    assert "pibl/mod.py changed since it was compiled" in reason


def test_a_build_for_another_interpreter_is_not_used(
    package: Path, monkeypatch: pytest.MonkeyPatch, no_finder: None
) -> None:
    monkeypatch.delenv(_build.PURE_ENV, raising=False)
    write_manifest(package, {}, interpreter=".cpython-310-x86_64-linux-gnu.so")
    build, reason = _build.select(package)
    assert (build, reason) == (
        "pure",
        "compiled build not used: built for .cpython-310-x86_64-linux-gnu.so, "
        f"not for {_build.interpreter_tag()}",
    )
    (package / _build.MANIFEST).write_text("{")
    assert _build.select(package)[1].startswith("compiled build not used: unreadable")


def test_the_finder_skips_extension_modules(tmp_path: Path) -> None:
    """An extension module shadows its source for the usual finders, not for this one."""
    pkg = tmp_path / "shadowed"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("VALUE = 'source'\n")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (pkg / f"mod{suffix}").write_bytes(b"not an extension module")
    script = (
        "import sys\n"
        "from pibl._build import SourceOnlyFinder\n"
        "if sys.argv[1] == 'source':\n"
        "    sys.meta_path.insert(0, SourceOnlyFinder('shadowed'))\n"
        "try:\n"
        "    import shadowed.mod\n"
        "except ImportError as exc:\n"
        "    print('ImportError', type(exc).__name__)\n"
        "else:\n"
        "    print(shadowed.mod.VALUE, shadowed.mod.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(PACKAGE.parent)]))

    def run(mode: str) -> str:
        argv = [sys.executable, "-c", script, mode]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60).stdout

    assert run("usual").startswith("ImportError")  # the broken extension was chosen
    assert run("source") == f"source {pkg / 'mod.py'}\n"


def _imported_files(env: dict[str, str]) -> list[str]:
    script = (
        "import pibl, pibl.http.parse, pibl.proxy.fast\n"
        "print(pibl.BUILD, pibl.http.parse.__file__, pibl.proxy.fast.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not COMPILED, reason="no current compiled build (scripts/build_compiled.py)")
def test_the_variable_forces_the_source_of_the_real_build() -> None:
    env = {k: v for k, v in os.environ.items() if k != _build.PURE_ENV}
    build, *files = _imported_files(env)
    assert build == "compiled"
    assert all(f.endswith(importlib.machinery.EXTENSION_SUFFIXES[0]) for f in files)
    build, *files = _imported_files(dict(env, PIBL_PURE_PYTHON="1"))
    assert build == "pure"
    assert files == [str(PACKAGE / "http" / "parse.py"), str(PACKAGE / "proxy" / "fast.py")]


def test_version_names_the_build() -> None:
    env = dict(os.environ, PIBL_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-m", "pibl", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    reason = "PIBL_PURE_PYTHON is set" if BUILT else "not compiled"
    assert out == f"pibl {pibl.__version__} (pure Python: {reason})\n"
