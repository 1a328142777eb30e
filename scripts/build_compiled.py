"""Compile PIBL's request path with mypyc, in place, beside the Python source.

    .venv/bin/python scripts/build_compiled.py          # build (about a minute)
    .venv/bin/python scripts/build_compiled.py --clean  # back to the source only

The modules in ``MODULES`` are compiled from a copy of the package in a temporary
directory (so nothing but the results lands in the work tree), and the extension modules
are copied next to their sources: ``pibl/http/parse.cpython-311-x86_64-linux-gnu.so``
beside ``pibl/http/parse.py``, plus ``pibl/_compiled__mypyc.*.so``, the library they share.
``pibl/_compiled.json`` records the interpreter and a SHA-256 of each compiled source;
``pibl/_build.py`` runs the compiled modules only while these match, and the source
whenever ``PIBL_PURE_PYTHON=1`` is set. Needs mypy (which ships mypyc: the ``dev`` extra)
and a C compiler. Standard library otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pibl"
sys.path.insert(0, str(REPO))

from pibl._build import MANIFEST, interpreter_tag, source_digest  # noqa: E402

GROUP = "pibl._compiled"  # the shared library: pibl/_compiled__mypyc.*.so

# What a proxied request runs through: the sans-I/O core, the fast path, and the shell
# modules every request passes (connections, the exchange, the cache layer, balancing,
# metrics). What the master imports stays Python (errors, the log, the shared balancing
# memory): loading the compiled library would cost the small master 5 MiB.
# The rest runs once per connection or per reload, or wraps other libraries (TLS, HTTP/2,
# the cache store), and stays Python.
MODULES = (
    "pibl/http/message.py",
    "pibl/http/parse.py",
    "pibl/http/framing.py",
    "pibl/http/forward.py",
    "pibl/cache/policy.py",
    "pibl/cache/key.py",
    "pibl/balance/policy.py",
    "pibl/routes.py",
    "pibl/compress.py",
    "pibl/proxy/fast.py",
    "pibl/proxy/flow.py",
    "pibl/proxy/client.py",
    "pibl/proxy/upstream.py",
    "pibl/proxy/exchange.py",
    "pibl/proxy/cached.py",
    "pibl/proxy/groups.py",
    "pibl/balance/health.py",
    "pibl/limits.py",
    "pibl/observe/metrics.py",
    "pibl/observe/record.py",
)

SETUP = """\
from setuptools import setup
from mypyc.build import mypycify

setup(
    name="pibl-compiled",
    ext_modules=mypycify({modules!r}, opt_level="3", group_name={group!r}),
)
"""


def built_files(package: Path) -> list[Path]:
    """Extension modules and the manifest of a compiled build in ``package``."""
    return sorted([*package.rglob("*.so"), *package.glob(MANIFEST)])


def clean() -> int:
    removed = built_files(PACKAGE)
    for path in removed:
        path.unlink()
    print(f"build_compiled: removed {len(removed)} files; PIBL runs from its source")
    return 0


def mypy_ini() -> str:
    """The project's mypy settings (pyproject.toml) as a mypy.ini: mypyc type-checks first."""
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    lines = ["[mypy]"]
    overrides = settings.pop("overrides", [])
    lines += [f"{key} = {value}" for key, value in settings.items()]
    for override in overrides:
        modules = override.pop("module")
        lines.append(f"[mypy-{','.join(modules)}]")
        lines += [f"{key} = {value}" for key, value in override.items()]
    return "\n".join(lines) + "\n"


def build() -> int:
    if importlib.util.find_spec("mypyc") is None:
        print("build_compiled: mypyc is not installed (pip install mypy)", file=sys.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pibl-mypyc-") as tmp:
        work = Path(tmp)
        shutil.copytree(PACKAGE, work / "pibl", ignore=shutil.ignore_patterns("*.so", MANIFEST))
        (work / "mypy.ini").write_text(mypy_ini())
        (work / "setup.py").write_text(SETUP.format(modules=list(MODULES), group=GROUP))
        log = work / "build.log"
        with log.open("w") as out:
            status = subprocess.call(
                [sys.executable, "setup.py", "build_ext", "--inplace"],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if status != 0:
            print("\n".join(log.read_text().splitlines()[-40:]), file=sys.stderr)
            print(f"build_compiled: mypyc failed (status {status})", file=sys.stderr)
            return 1
        for path in built_files(PACKAGE):
            path.unlink()
        results = sorted((work / "pibl").rglob("*.so"))
        for so in results:
            shutil.copy2(so, PACKAGE / so.relative_to(work / "pibl"))
    manifest = {
        "interpreter": interpreter_tag(),
        "sources": {name: source_digest(REPO / name) for name in MODULES},
    }
    (PACKAGE / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    seconds = time.monotonic() - started
    print(f"build_compiled: {len(MODULES)} modules compiled in {seconds:.0f} s ({GROUP})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules")
    args = parser.parse_args()
    return clean() if args.clean else build()


if __name__ == "__main__":
    raise SystemExit(main())
