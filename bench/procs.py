"""Child processes of the benchmark: servers and load generators, bounded and cleaned up.

Every child is started through :func:`spawn`, which records it so that :func:`cleanup`
(run at exit, on Ctrl-C and on SIGTERM) kills whatever is still running, and which asks
Linux to kill the child if the benchmark itself dies (``PR_SET_PDEATHSIG``). Every read
from a child has a deadline (:meth:`Worker.expect`), so no case can hang.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
READY = re.compile(r"ready router=(\S+) pub=(\S+)")
PR_SET_PDEATHSIG = 1
_children: list[subprocess.Popen[Any]] = []


class BenchError(Exception):
    """A case could not run to the end (a child failed or missed a deadline)."""


def nofile_limit() -> tuple[int, int]:
    """This process's (soft, hard) limit on open files."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``want``; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup(nofile: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        raise_nofile(nofile)

    return setup


def spawn(cmd: list[str], *, nofile: int = 4096, stdin: int | None = subprocess.PIPE,
          stderr: int | IO[Any] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``cmd`` with text pipes, a raised open-file limit, and death with its parent."""
    # preexec_fn is unsafe only in a process with threads; the driver that spawns has none.
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            preexec_fn=_child_setup(nofile), env=env, cwd=ROOT)  # noqa: PLW1509
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    with contextlib.suppress(ValueError):
        _children.remove(proc)


def cleanup() -> None:
    """Kill every child still running (at exit, Ctrl-C, SIGTERM)."""
    for proc in _children:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    _children.clear()


def install_cleanup() -> None:
    """Clean up at exit and turn SIGTERM/SIGHUP into an orderly exit."""
    atexit.register(cleanup)

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def read_line(stream: IO[str], deadline: float, what: str) -> str:
    """One line from a child's pipe, or BenchError at ``deadline`` (time.monotonic)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{what}: no answer in time")
        readable, _, _ = select.select([stream], [], [], left)
        if readable:
            line = stream.readline()
            if not line:
                raise BenchError(f"{what}: the process ended early")
            return line


class Worker:
    """A load generator child (``bench.py worker ROLE CONFIG``) speaking JSON lines."""

    def __init__(self, role: str, config: dict[str, Any], *, nofile: int = 4096) -> None:
        self.role = role
        cmd = [sys.executable, str(HERE / "bench.py"), "worker", role, json.dumps(config)]
        self.proc = spawn(cmd, nofile=nofile)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"{self.role}: the process ended early") from None

    def expect(self, key: str, deadline: float) -> Any:
        """The value of ``key`` in the next line that has it (a line with "error" raises)."""
        assert self.proc.stdout is not None
        while True:
            line = read_line(self.proc.stdout, deadline, self.role)
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours (a library printing)
            if "error" in message:
                raise BenchError(f"{self.role}: {message['error']}")
            if key in message:
                return message[key]

    def close(self) -> None:
        stop(self.proc, 2.0)


class Server:
    """A broker (zchat or the baseline) in a child process, its endpoints read from its ready line."""

    def __init__(self, cmd: list[str], *, nofile: int = 4096, timeout: float = 30.0,
                 stderr_path: Path | None = None) -> None:
        self._stderr = open(stderr_path, "w") if stderr_path else None  # noqa: SIM115 - closed in close()
        start = time.monotonic()
        self.proc = spawn(cmd, nofile=nofile, stdin=subprocess.DEVNULL,
                          stderr=self._stderr if self._stderr else subprocess.DEVNULL)
        assert self.proc.stdout is not None
        try:
            match = READY.search(read_line(self.proc.stdout, start + timeout, "server"))
        except BenchError:
            self.close()
            raise
        #: When the process was started (time.monotonic), and seconds from then to its ready line.
        self.started_at = start
        self.startup_seconds = time.monotonic() - start
        if match is None:
            self.close()
            raise BenchError(f"server did not start: {' '.join(cmd)}")
        self.router, self.pub = match.group(1), match.group(2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def close(self) -> None:
        stop(self.proc, 10.0)
        if self._stderr:
            self._stderr.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` in MB (``VmRSS``, or ``VmHWM`` for the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need one named)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
