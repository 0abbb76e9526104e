"""Secure by default: without encryption the broker serves loopback only unless --insecure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zchat.broker.config import BrokerConfig, is_local_endpoint


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.1.2.3:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/zchat.sock", True),
        ("inproc://zchat", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://10.1.2.3:5555", False),
        ("tcp://192.168.0.10:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_which_endpoints_are_local(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


def test_exposed_endpoints_lists_only_the_non_local_ones() -> None:
    config = BrokerConfig(router="tcp://0.0.0.0:5555", pub="tcp://127.0.0.1:5556")
    assert config.exposed_endpoints() == ["tcp://0.0.0.0:5555"]
    assert BrokerConfig().exposed_endpoints() == []


def _broker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "zchat.broker", "--store", "memory", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=10, env={**os.environ, **(env or {})}, check=False
    )


def test_binding_beyond_loopback_without_insecure_is_refused() -> None:
    done = _broker("--router", "tcp://0.0.0.0:0", "--pub", "tcp://127.0.0.1:0")
    assert done.returncode == 2
    assert "refusing to bind tcp://0.0.0.0:0" in done.stderr
    assert "--insecure" in done.stderr
    assert "ready" not in done.stdout


@pytest.mark.parametrize("how", ["flag", "env"])
def test_insecure_allows_it_with_a_warning(how: str) -> None:
    # The XPUB on the wildcard address makes the broker "exposed"; OS-chosen ports.
    args = ("--insecure",) if how == "flag" else ()
    env = {"ZCHAT_INSECURE": "1"} if how == "env" else {}
    cmd = [sys.executable, "-m", "zchat.broker", "--store", "memory", "--router", "tcp://127.0.0.1:*",
           "--pub", "tcp://0.0.0.0:*", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert "zchat-broker ready" in proc.stdout.readline()
        proc.terminate()
        _, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "WITHOUT encryption or authentication" in err
