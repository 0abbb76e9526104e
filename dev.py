#!/usr/bin/env python3
"""zchat's one entry point for developers and first-time users; needs only Python 3.11+.

    python3 dev.py broker [ARGS]   run the broker (creates .venv on first use)
    python3 dev.py client [ARGS]   run the terminal client
    python3 dev.py test [ARGS]     ruff, mypy --strict, then pytest (ARGS go to pytest)
    python3 dev.py bench [ARGS]    the benchmark (bench/bench.py --help; --peers also installs
                                   the Redis and NATS clients, the `peers` dependency group)
    python3 dev.py setup           only create/refresh .venv

The virtual environment lives in .venv and is refreshed whenever a pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

if sys.version_info < (3, 11):  # noqa: UP036 - the one place an old interpreter may arrive
    sys.exit(f"zchat needs Python 3.11 or newer; this is {sys.version.split()[0]}")

import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".zchat-installed"
PROJECTS = ("common", "broker", "client")


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in [ROOT / "pyproject.toml", *(ROOT / p / "pyproject.toml" for p in PROJECTS)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _group(name: str) -> list[str]:
    """The requirements of dependency group ``name`` in the root pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["dependency-groups"][name])


def _pip() -> list[str]:
    return [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]


def ensure_venv() -> None:
    """Create .venv and install the three distributions (editable) and the dev tools."""
    fingerprint = _fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print("dev.py: installing zchat and its dev tools into .venv", file=sys.stderr)
    editables = [arg for p in PROJECTS for arg in ("-e", str(ROOT / p))]
    subprocess.run([*_pip(), *editables, *_group("dev")], check=True)
    STAMP.write_text(fingerprint)


def run(*cmd: str) -> int:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=False, cwd=ROOT).returncode


def test(args: list[str]) -> int:
    tool = str(BIN / "{}")
    steps = [
        [tool.format("ruff"), "check", "."],
        [tool.format("mypy")],
        [tool.format("pytest"), *args],
    ]
    for step in steps:
        if (rc := run(*step)) != 0:
            return rc
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    ensure_venv()
    if command == "setup":
        return 0
    if command == "test":
        return test(args)
    if command == "bench":
        # --peers: the Redis and NATS clients; their servers come from the system (BENCHMARKS.md).
        if "--peers" in args and subprocess.run([*_pip(), *_group("peers")], check=False).returncode != 0:
            print("dev.py: could not install the peers group; the benchmark will say what is missing", file=sys.stderr)
        return run(str(PYTHON), str(ROOT / "bench" / "bench.py"), *args)
    if command in ("broker", "client"):
        exe = str(BIN / f"zchat-{command}")
        os.execv(exe, [exe, *args])
    print(f"dev.py: unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
