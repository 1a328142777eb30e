"""Which build of PIBL runs: the compiled modules (mypyc) or the pure-Python source.

``scripts/build_compiled.py`` can compile the request path with mypyc, from the same source
files, into extension modules placed beside them (``pibl/http/parse.cpython-311-*.so`` next
to ``pibl/http/parse.py``, and so on). Python's import system prefers an extension module to a
source file of the same name, so once built they are what ``import pibl.http.parse`` loads.
The build writes ``pibl/_compiled.json``: the interpreter it was built for and a SHA-256 of
every compiled source file.

This module, imported by ``pibl/__init__.py`` before any other part of the package, decides
between the two, all or nothing (compiled modules call each other's classes directly, so a
mix of compiled and source modules would hold two different ``Head`` classes):

* no manifest: nothing was compiled, the source runs (the default install);
* ``PIBL_PURE_PYTHON`` set to anything but ``""`` or ``"0"``: the source runs, as with
  aiohttp's ``AIOHTTP_NO_EXTENSIONS`` or yarl's ``YARL_NO_EXTENSIONS``;
* a manifest for another interpreter, or a compiled source file changed since the build
  (an edit, a checkout): the source runs, so an out-of-date build never hides a change;
* otherwise the compiled modules run.

Forcing the source is a meta path finder placed first on ``sys.meta_path`` that finds
``pibl.*`` modules among source and bytecode files only, never among extension modules.
Both builds behave the same; only the CPU per request differs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

PURE_ENV = "PIBL_PURE_PYTHON"
MANIFEST = "_compiled.json"
PACKAGE_DIR = Path(__file__).resolve().parent


class SourceOnlyFinder(importlib.abc.MetaPathFinder):
    """Finds ``pibl`` submodules among ``.py`` (and ``.pyc``) files, never extensions."""

    def __init__(self, package: str = "pibl") -> None:
        self._prefix = package + "."
        self._finders: dict[str, importlib.machinery.FileFinder] = {}

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(self._prefix) or path is None:
            return None
        for entry in path:
            finder = self._finders.get(entry)
            if finder is None:
                finder = self._finders[entry] = importlib.machinery.FileFinder(
                    entry,
                    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
                    (
                        importlib.machinery.SourcelessFileLoader,
                        importlib.machinery.BYTECODE_SUFFIXES,
                    ),
                )
            spec = finder.find_spec(fullname, target)
            if spec is not None and spec.loader is not None:
                return spec
        return None  # not a source module (the compiled shared library): the usual finders


def interpreter_tag() -> str:
    """What an extension module must match: the implementation, version, ABI and platform
    (the suffix of its file name, ``.cpython-311-x86_64-linux-gnu.so`` say)."""
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def source_digest(path: Path) -> str:
    """SHA-256 of a file, by CPython's own implementation where it has one: ``hashlib``
    loads OpenSSL, 4 MiB that the small master would carry only for this check."""
    data = path.read_bytes()
    for name in ("_sha2", "_sha256"):  # (3.12 and later, 3.11)
        try:
            module: Any = importlib.import_module(name)
        except ImportError:
            continue
        return str(module.sha256(data).hexdigest())
    import hashlib

    return hashlib.sha256(data).hexdigest()


def check_manifest(package_dir: Path) -> str | None:
    """None if the compiled build in ``package_dir`` matches its sources, else why not."""
    try:
        manifest = json.loads((package_dir / MANIFEST).read_text())
        if manifest["interpreter"] != interpreter_tag():
            return f"built for {manifest['interpreter']}, not for {interpreter_tag()}"
        for name, digest in manifest["sources"].items():
            if source_digest(package_dir.parent / name) != digest:
                return f"{name} changed since it was compiled (run scripts/build_compiled.py)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({exc})"
    return None


def select(package_dir: Path = PACKAGE_DIR) -> tuple[str, str]:
    """("compiled" or "pure", the reason for a pure run); forces the source when pure."""
    if not (package_dir / MANIFEST).exists():
        return "pure", "not compiled"
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        reason = f"{PURE_ENV} is set"
    else:
        problem = check_manifest(package_dir)
        if problem is None:
            return "compiled", ""
        reason = f"compiled build not used: {problem}"
    if not any(isinstance(f, SourceOnlyFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceOnlyFinder())
    return "pure", reason
