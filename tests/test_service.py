"""The broker run as a service: configuration, metrics, status/check, logs, signals, versions.

Configuration is tested twice: through :func:`zchat.common.config.resolve` and
:meth:`BrokerConfig.from_values` (fast, every rule), and through the real command line
(``python -m zchat.broker`` and the ``zchat-broker`` console script) for what only a process
shows: exit status 2 and the message on stderr, the values a client sees in its welcome.

Broker processes bind ``tcp://127.0.0.1:*`` (the OS picks the ports; the ready line tells
them), get a temporary data directory and an environment without ``ZCHAT_*`` variables, and
write their log to a file the tests read. Nothing waits with a fixed sleep: every wait polls
until a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zchat.broker import BrokerConfig, server
from zchat.broker.cli import build_parser
from zchat.broker.config import OPTIONS
from zchat.broker.store import Durability, SqliteStore, export_room
from zchat.client import Client, ClientState, RequestError
from zchat.common.codes import ErrorCode
from zchat.common.config import resolve
from zchat.common.errors import ConfigError
from zchat.common.protocol import Sent

if TYPE_CHECKING:
    from tests.conftest import BrokerProcess, RunningBroker

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(sysconfig.get_paths()["scripts"])
LOOPBACK = "tcp://127.0.0.1:*"
READY = re.compile(r"zchat-broker ready router=(\S+) pub=(\S+)")
#: Longest any single wait in this file may take.
WAIT = 8.0


# -- helpers -----------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ZCHAT_* variables (a developer's shell may set some)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}, **extra}


def script(name: str) -> str:
    """The installed console script ``name`` (``zchat-broker``, ``zchat-client``)."""
    path = SCRIPTS / name
    assert path.exists(), f"{name} is not installed in {SCRIPTS}"
    return str(path)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, env=clean_env() if env is None else env
    )


def wait_for(predicate: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        time.sleep(0.01)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@dataclass
class BrokerRun:
    """A ``python -m zchat.broker`` child: its endpoints (from the ready line) and its log file."""

    proc: subprocess.Popen[bytes]
    router: str
    pub: str
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8", errors="replace").splitlines()

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines())


@dataclass
class Brokers:
    """Starts broker processes (stderr to a log file); kills any still running at teardown."""

    tmp: Path
    runs: list[BrokerRun] = field(default_factory=list)

    def start(
        self, *args: str, env: dict[str, str] | None = None, data_dir: Path | None = None, loopback: bool = True
    ) -> BrokerRun:
        data_dir = data_dir or self.tmp / f"data-{len(self.runs)}"
        log = self.tmp / f"broker-{len(self.runs)}.log"
        endpoints = ["--router", LOOPBACK, "--pub", LOOPBACK] if loopback else []
        cmd = [sys.executable, "-m", "zchat.broker", *endpoints, *args]
        with log.open("wb") as err:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, env=clean_env(ZCHAT_DATA_DIR=str(data_dir), **(env or {}))
            )
        assert proc.stdout is not None
        stdout = proc.stdout
        first: list[bytes] = []
        reader = threading.Thread(target=lambda: first.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(WAIT)
        match = READY.search(first[0].decode()) if first else None
        if match is None:
            proc.kill()
            proc.wait(timeout=5)
            raise AssertionError(f"broker not ready: {first!r}; log:\n{log.read_text(errors='replace')}")
        bp = BrokerRun(proc, match.group(1), match.group(2), log)
        self.runs.append(bp)
        return bp

    def close(self) -> None:
        for bp in self.runs:
            if bp.proc.poll() is None:
                bp.proc.kill()
            bp.proc.wait(timeout=5)
            if bp.proc.stdout is not None:
                bp.proc.stdout.close()


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Brokers]:
    started = Brokers(tmp_path)
    yield started
    started.close()


def broker_config(argv: list[str], environ: dict[str, str]) -> BrokerConfig:
    """What the broker's command line makes of ``argv`` and ``environ``."""
    args = build_parser().parse_args(argv)
    return BrokerConfig.from_values(resolve(OPTIONS, args, environ, section="broker"))


def toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- configuration: precedence -----------------------------------------------------------------


def test_a_value_only_in_the_config_file_is_used(tmp_path: Path) -> None:
    conf = toml(tmp_path / "z.toml", 'motd = "from the file"\nsession-timeout = 30\nmax_page = 150\n')
    config = broker_config(["--config", str(conf)], {})
    assert (config.motd, config.session_timeout, config.max_page) == ("from the file", 30.0, 150)
    assert config.tick_interval == BrokerConfig().tick_interval  # untouched options keep their default


def test_zchat_config_names_the_file_and_the_flag_wins_over_it(tmp_path: Path) -> None:
    by_env = toml(tmp_path / "env.toml", 'motd = "env file"\n')
    by_flag = toml(tmp_path / "flag.toml", 'motd = "flag file"\n')
    assert broker_config([], {"ZCHAT_CONFIG": str(by_env)}).motd == "env file"
    assert broker_config(["--config", str(by_flag)], {"ZCHAT_CONFIG": str(by_env)}).motd == "flag file"


def test_env_beats_file_and_flag_beats_env(tmp_path: Path) -> None:
    conf = toml(tmp_path / "z.toml", 'motd = "file"\nsession-timeout = 30\n')
    env = {"ZCHAT_MOTD": "env", "ZCHAT_SESSION_TIMEOUT": "20"}
    config = broker_config(["--config", str(conf)], env)
    assert (config.motd, config.session_timeout) == ("env", 20.0)
    config = broker_config(["--config", str(conf), "--motd", "flag", "--session-timeout", "10"], env)
    assert (config.motd, config.session_timeout) == ("flag", 10.0)


def test_the_broker_table_beats_top_level_keys_and_other_tables_are_ignored(tmp_path: Path) -> None:
    conf = toml(
        tmp_path / "z.toml",
        'motd = "top level"\nmax-page = 120\n'
        '[broker]\nmotd = "broker table"\n'
        # Keys the broker does not have: fine in the tables of the other programs.
        '[client]\nnick = "alice"\nroom = "ops"\nmotd = "client table"\n'
        '[bot]\nnick = "greeter"\n',
    )
    config = broker_config(["--config", str(conf)], {})
    assert config.motd == "broker table"
    assert config.max_page == 120  # a top-level key the [broker] table does not override


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("colour = 1\n", "colour"),
        ('[broker]\nnick = "alice"\n', "nick"),  # a client option in the broker's own table
        ('nick = "alice"\n', "nick"),  # top-level keys apply to the broker too
        ("[server]\nmotd = 1\n", "[server]"),
    ],
    ids=["unknown-key", "client-key-in-broker-table", "client-key-at-top-level", "unknown-table"],
)
def test_an_unknown_key_in_the_file_fails_naming_it(tmp_path: Path, text: str, named: str) -> None:
    conf = toml(tmp_path / "z.toml", text)
    with pytest.raises(ConfigError) as caught:
        broker_config(["--config", str(conf)], {})
    assert str(conf) in caught.value.option
    assert named in caught.value.option


@pytest.mark.parametrize(
    ("argv", "env", "file_text", "named"),
    [
        (["--session-timeout", "soon"], {}, "", "--session-timeout"),
        ([], {"ZCHAT_SESSION_TIMEOUT": "soon"}, "", "ZCHAT_SESSION_TIMEOUT"),
        ([], {}, "session_timeout = 0\n", "session_timeout"),
        ([], {}, 'store = "paper"\n', "store"),
        (["--router", "127.0.0.1:5555"], {}, "", "--router"),
        ([], {"ZCHAT_METRICS_PORT": "70000"}, "", "ZCHAT_METRICS_PORT"),
        ([], {}, 'log_level = "chatty"\n', "log_level"),
    ],
    ids=["flag", "env", "file-key", "file-choice", "flag-endpoint", "env-port", "file-log-level"],
)
def test_an_invalid_value_fails_naming_where_it_came_from(
    tmp_path: Path, argv: list[str], env: dict[str, str], file_text: str, named: str
) -> None:
    conf = toml(tmp_path / "z.toml", file_text)
    with pytest.raises(ConfigError) as caught:
        broker_config(["--config", str(conf), *argv], env)
    assert caught.value.option.endswith(named)
    if file_text:
        assert caught.value.option == f"{conf}: {named}"


def test_an_invalid_file_value_names_the_key_as_written(tmp_path: Path) -> None:
    conf = toml(tmp_path / "z.toml", "session-timeout = 0\n")
    with pytest.raises(ConfigError) as caught:
        broker_config(["--config", str(conf)], {})
    assert caught.value.option == f"{conf}: session-timeout"


def test_a_missing_or_broken_config_file_fails_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        broker_config(["--config", str(missing)], {})
    assert caught.value.option == "--config"
    assert caught.value.value == str(missing)
    broken = toml(tmp_path / "broken.toml", "motd = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        broker_config([], {"ZCHAT_CONFIG": str(broken)})


# -- configuration: the real command line ------------------------------------------------------


def test_the_broker_process_applies_flag_env_and_file_by_precedence(brokers: Brokers, tmp_path: Path) -> None:
    conf = toml(
        tmp_path / "z.toml",
        'motd = "top level"\nsession-timeout = 30\nmax-page = 150\n'
        '[broker]\nmotd = "broker table"\n'
        '[client]\nnick = "alice"\n',
    )
    env = {
        "ZCHAT_SESSION_TIMEOUT": "21",  # env beats the file's 30
        "ZCHAT_ROUTER": "ipc:///nonexistent/zchat-router",  # the --router flag must beat it
    }
    bp = brokers.start("--config", str(conf), env=env)
    assert bp.router.startswith("tcp://127.0.0.1:")
    with Client(bp.router, bp.pub, timeout=3) as chat:
        welcome = chat.connect("ann")
    assert welcome.motd == "broker table"  # [broker] beats top level; [client] ignored
    assert welcome.timeout == 21.0
    assert welcome.max_page == 150  # only in the file


@pytest.mark.parametrize(
    ("args", "env", "file_text", "named"),
    [
        (["--session-timeout", "soon"], {}, None, "--session-timeout"),
        ([], {"ZCHAT_MAX_TEXT": "many"}, None, "ZCHAT_MAX_TEXT"),
        ([], {}, 'durability = "eventually"\n', "durability"),
        ([], {}, 'colour = "blue"\n', "colour"),
    ],
    ids=["flag", "env", "file-key", "file-unknown-key"],
)
def test_the_broker_process_exits_2_naming_a_bad_setting(
    tmp_path: Path, args: list[str], env: dict[str, str], file_text: str | None, named: str
) -> None:
    if file_text is not None:
        env = {**env, "ZCHAT_CONFIG": str(toml(tmp_path / "z.toml", file_text))}
    cmd = [script("zchat-broker"), "--router", LOOPBACK, "--pub", LOOPBACK, *args]
    done = run(cmd, env=clean_env(ZCHAT_DATA_DIR=str(tmp_path / "data"), **env))
    assert done.returncode == 2, done.stderr
    assert "zchat-broker: error: invalid value for" in done.stderr
    assert named in done.stderr
    assert "Traceback" not in done.stderr
    assert "ready" not in done.stdout


# -- configuration: the README's table ---------------------------------------------------------


def readme_broker_table() -> dict[str, tuple[str, str]]:
    """The README's table of broker options: flag -> (env, default cell)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Configuration", 1)[1].split("\n### ", 1)[0]
    row = re.compile(r"^\| `(--[a-z-]+)` \| `(ZCHAT_[A-Z_]+)` \| ([^|]*) \|", re.MULTILINE)
    return {m.group(1): (m.group(2), m.group(3).strip()) for m in row.finditer(section)}


@pytest.mark.parametrize("option", OPTIONS, ids=[opt.name for opt in OPTIONS])
def test_every_broker_option_has_a_flag_a_variable_and_a_readme_row(option: Any) -> None:
    assert re.fullmatch(r"--[a-z][a-z-]*", option.flag)
    assert option.flag == "--" + option.name.replace("_", "-")  # so the file key is the flag without --
    assert re.fullmatch(r"ZCHAT_[A-Z_]+", option.env)
    table = readme_broker_table()
    assert option.flag in table, f"{option.flag} is missing from README.md's configuration table"
    env, default = table[option.flag]
    assert env == option.env
    if re.fullmatch(r"`[^`]+`", default):  # a plain value: it must be what the code defaults to
        assert option.parse(default.strip("`")) == option.default
    elif default in ("off", "none"):
        assert option.default is None


def test_the_readme_table_lists_no_option_the_broker_lacks() -> None:
    flags = {opt.flag for opt in OPTIONS} | {"--config"}
    assert set(readme_broker_table()) <= flags
    envs = {opt.env for opt in OPTIONS} | {"ZCHAT_CONFIG"}
    assert {env for env, _ in readme_broker_table().values()} <= envs


# -- metrics -----------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """Every sample of ``/metrics`` by name and labels, e.g. ``zchat_errors_total{code="invalid"}``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_move_with_the_traffic(
    broker_factory: Callable[..., RunningBroker], client_factory: Callable[..., Client]
) -> None:
    rb = broker_factory(BrokerConfig(metrics_port=0))
    assert rb.broker.metrics is not None
    port = rb.broker.metrics.port
    assert port > 0  # port 0 asked the OS for one; this is the real one

    ann = Client(rb.router, rb.pub, timeout=3)
    try:
        ann.connect("ann")
        ann.join("lobby")
        first = scrape(port)
        assert first["zchat_sessions"] == 1
        assert first["zchat_rooms"] == 1

        bob = Client(rb.router, rb.pub, timeout=3)
        try:
            bob.connect("bob")
            bob.join("lobby")
            bob.join("den")
            sent = [ann.say("lobby", f"hello {i}") for i in range(10)]
            assert len(bob.history("lobby", limit=5)) == 5
            with pytest.raises(RequestError) as refused:
                ann.say("den", "not a member")  # provoke an error reply
            assert refused.value.code is ErrorCode.NOT_MEMBER
            second = scrape(port)
        finally:
            bob.close()
        third = scrape(port)
    finally:
        ann.close()

    assert sent[-1].seq == 10
    assert (second["zchat_sessions"], second["zchat_rooms"], second["zchat_members"]) == (2, 2, 3)
    assert (third["zchat_sessions"], third["zchat_rooms"]) == (1, 1)  # bob said bye: den is gone
    assert delta(first, second, "zchat_stored_total") == 10
    assert delta(first, second, "zchat_requests_total") >= 10 + 4  # says, hello, joins, history, the error
    assert delta(first, second, "zchat_published_total") >= 10  # the messages (and bob's join events)
    assert delta(first, second, "zchat_history_requests_total") >= 1
    assert delta(first, second, "zchat_sessions_opened_total") == 1
    assert first.get('zchat_errors_total{code="not_member"}', 0) == 0
    assert second['zchat_errors_total{code="not_member"}'] == 1
    assert 1 <= delta(first, second, "zchat_store_commit_seconds_count") <= 10
    assert delta(first, second, "zchat_store_commit_seconds_sum") > 0
    assert delta(first, second, "zchat_loop_turn_seconds_count") >= 10
    assert second['zchat_loop_turn_seconds_bucket{le="+Inf"}'] == second["zchat_loop_turn_seconds_count"]


def test_metrics_scrapes_while_messages_flow_never_go_backwards(
    broker_factory: Callable[..., RunningBroker],
) -> None:
    rb = broker_factory(BrokerConfig(metrics_port=0))
    assert rb.broker.metrics is not None
    port = rb.broker.metrics.port
    stop = threading.Event()
    acked: list[Sent] = []
    failures: list[BaseException] = []

    def talk() -> None:
        try:
            with Client(rb.router, rb.pub, timeout=3) as chat:
                chat.connect("chatty")
                chat.join("busy")
                while not stop.is_set():
                    acked.append(chat.say("busy", f"line {len(acked)}"))
        except BaseException as exc:
            failures.append(exc)

    talker = threading.Thread(target=talk, daemon=True)
    talker.start()
    try:
        wait_for(lambda: len(acked) >= 20, what="the talker's first messages")
        scrapes = [scrape(port) for _ in range(5)]
    finally:
        stop.set()
        talker.join(WAIT)
    assert not talker.is_alive()
    assert not failures
    counters = ["zchat_requests_total", "zchat_stored_total", "zchat_published_total", "zchat_loop_turn_seconds_count"]
    for name in counters:
        values = [s[name] for s in scrapes]
        assert values == sorted(values), name
    assert scrapes[-1]["zchat_stored_total"] > scrapes[0]["zchat_stored_total"]


# -- zchat-broker status / check ---------------------------------------------------------------


def test_status_and_check_against_a_running_broker(broker_process: Callable[..., BrokerProcess]) -> None:
    bp = broker_process()
    with Client(bp.router, bp.pub, timeout=3) as chat:
        chat.connect("ann")
        chat.join("general")
        chat.say("general", "hi")

        done = run([script("zchat-broker"), "check", "--router", bp.router])
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"ok: zchat-broker {dist_version('zchat-broker')} at {bp.router}")
        assert "1 sessions" in done.stdout

        done = run([script("zchat-broker"), "status"], env=clean_env(ZCHAT_ROUTER=bp.router))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"zchat-broker {dist_version('zchat-broker')}, up ")
        assert "sessions 1, rooms 1, members 1" in done.stdout
        assert "stored 1," in done.stdout
        assert "errors none" in done.stdout

        done = run([script("zchat-broker"), "status", "--json", "--router", bp.router])
        assert done.returncode == 0, done.stderr
        figures = json.loads(done.stdout)
        assert figures["version"] == dist_version("zchat-broker")
        assert figures["uptime"] >= 0
        assert (figures["sessions"], figures["rooms"], figures["members"]) == (1, 1, 1)
        assert figures["stored_total"] == 1
        assert figures["requests_total"] >= 4  # hello, join, history, say (and the tools' own)


def test_check_reaches_a_broker_bound_to_every_interface_through_loopback(
    broker_process: Callable[..., BrokerProcess],
) -> None:
    """The Docker HEALTHCHECK runs with the container's ZCHAT_ROUTER=tcp://0.0.0.0:PORT."""
    bp = broker_process()
    port = bp.router.rsplit(":", 1)[1]
    done = run([script("zchat-broker"), "check"], env=clean_env(ZCHAT_ROUTER=f"tcp://0.0.0.0:{port}"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: ")


@pytest.mark.parametrize("tool", ["check", "status"])
def test_status_and_check_with_nothing_listening_exit_1_within_the_timeout(tool: str, closed_port: int) -> None:
    router = f"tcp://127.0.0.1:{closed_port}"
    started = time.monotonic()
    done = run([script("zchat-broker"), tool, "--router", router, "--timeout", "1"])
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"zchat-broker {tool}: no answer from the broker at {router} within 1 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert 1.0 <= elapsed < 4.0  # the timeout, plus the interpreter's start


def test_check_works_with_the_brokers_own_config_file(
    broker_process: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """A container that configures the broker with ZCHAT_CONFIG runs its HEALTHCHECK with it too."""
    bp = broker_process()
    conf = toml(tmp_path / "z.toml", f'router = "{bp.router}"\n[broker]\nmotd = "Be nice."\nsession-timeout = 30\n')
    done = run([script("zchat-broker"), "check"], env=clean_env(ZCHAT_CONFIG=str(conf)))
    assert done.returncode == 0, done.stderr


def test_a_busy_metrics_port_stops_the_broker_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [script("zchat-broker"), "--router", LOOPBACK, "--pub", LOOPBACK, "--metrics-port", str(port)]
        done = run(cmd, env=clean_env(ZCHAT_DATA_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert str(port) in done.stderr
    assert "Traceback" not in done.stderr


# -- logs --------------------------------------------------------------------------------------


def test_json_logs_one_object_per_line_per_session_event_not_per_message(brokers: Brokers) -> None:
    bp = brokers.start("--log-format", "json")
    with Client(bp.router, bp.pub, timeout=3) as chat:
        chat.connect("ann")
        chat.join("general")
        for i in range(50):
            chat.say("general", f"message number {i}")
    wait_for(lambda: bp.logged("said bye"), what="the bye line")
    bp.proc.send_signal(signal.SIGTERM)
    assert bp.proc.wait(timeout=WAIT) == 0

    records = [json.loads(line) for line in bp.lines()]  # every line is one JSON object
    for record in records:
        assert isinstance(record, dict)
        assert isinstance(record["ts"], float)
        assert abs(record["ts"] - time.time()) < 60
        assert record["level"] in ("debug", "info", "warning", "error", "critical")
        assert record["logger"].startswith("zchat")
        assert isinstance(record["message"], str)
    messages = [record["message"] for record in records]
    assert any("ann" in m and "opened" in m for m in messages), messages
    assert any("ann" in m and "said bye" in m for m in messages), messages
    assert not any("message number" in m for m in messages)
    assert len(records) < 10, messages  # serving, opened, bye, stopping, stopped: not 50 more


# -- lifecycle: SIGTERM, restart, SIGHUP -------------------------------------------------------


@dataclass
class Talker:
    """A blocking Client saying numbered lines in a thread, recording every acknowledgement."""

    nick: str
    client: Client
    states: list[tuple[ClientState, float]]
    acked: list[tuple[str, Sent]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, room: str) -> None:
        def talk() -> None:
            try:
                while not self.stop.is_set():
                    text = f"{self.nick} line {len(self.acked)}"
                    self.acked.append((text, self.client.say(room, text)))
                    self.stop.wait(0.002)  # pacing, so the store stays small; not a synchronisation
            except BaseException as exc:
                self.failures.append(exc)

        self.thread = threading.Thread(target=talk, name=f"talker-{self.nick}", daemon=True)
        self.thread.start()

    def first(self, state: ClientState, after: float) -> float | None:
        return next((t for s, t in list(self.states) if s is state and t >= after), None)


def recorder(states: list[tuple[ClientState, float]]) -> Callable[[ClientState], None]:
    """An ``on_state`` callback noting each state with the time it arrived."""
    return lambda state: states.append((state, time.monotonic()))


@pytest.mark.timeout(30)
def test_sigterm_sends_goaway_and_a_restart_loses_nothing_acknowledged(brokers: Brokers, tmp_path: Path) -> None:
    data = tmp_path / "store"
    old = brokers.start("--session-timeout", "15", data_dir=data)
    talkers: list[Talker] = []
    try:
        for nick in ("ann", "bob", "cyd"):
            states: list[tuple[ClientState, float]] = []
            client = Client(old.router, old.pub, timeout=3, send_timeout=20, on_state=recorder(states))
            talkers.append(Talker(nick, client, states))
            client.connect(nick)
            client.join("ops")
        for talker in talkers:
            talker.start("ops")
        wait_for(lambda: all(len(t.acked) >= 10 for t in talkers), what="every talker's first messages")

        stopped_at = time.monotonic()
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(timeout=2.0) == 0
        assert time.monotonic() - stopped_at < 2.0
        # The goaway event, not a heartbeat (5 s) or a reply timeout (3 s), moves them on.
        wait_for(lambda: all(t.first(ClientState.RECONNECTING, stopped_at) for t in talkers), 2.0, "goaway")
        for talker in talkers:
            noticed = talker.first(ClientState.RECONNECTING, stopped_at)
            assert noticed is not None and noticed - stopped_at < 2.0

        restarted_at = time.monotonic()
        new = brokers.start("--router", old.router, "--pub", old.pub, "--session-timeout", "15", data_dir=data)
        assert (new.router, new.pub) == (old.router, old.pub)
        wait_for(lambda: all(t.first(ClientState.CONNECTED, restarted_at) for t in talkers), WAIT, "reconnection")
        counts = [len(t.acked) for t in talkers]
        wait_for(
            lambda: all(len(t.acked) >= n + 10 for t, n in zip(talkers, counts, strict=True)),
            what="messages acknowledged by the new broker",
        )
    finally:
        for talker in talkers:
            talker.stop.set()
        for talker in talkers:
            if talker.thread is not None:
                talker.thread.join(WAIT)
            talker.client.close()
    for talker in talkers:
        assert talker.thread is not None and not talker.thread.is_alive()
        assert not talker.failures, talker.failures

    stored = list(export_room(data / SqliteStore.FILENAME, "ops"))
    by_text: dict[str, list[int]] = {}
    for message in stored:
        by_text.setdefault(message.text, []).append(message.seq)
    assert [m.seq for m in stored] == list(range(1, len(stored) + 1))  # no gap, no reuse
    assert all(len(seqs) == 1 for seqs in by_text.values())  # no resend stored twice
    acked = [(text, sent) for talker in talkers for text, sent in talker.acked]
    for text, sent in acked:
        assert by_text.get(text) == [sent.seq], f"acknowledged {text!r} (seq {sent.seq}) is not stored once"
    assert len(acked) == len(stored)  # a stop between two sends: nothing stored unacknowledged


@pytest.mark.timeout(30)
def test_sighup_reloads_motd_and_log_level_from_the_config_file(brokers: Brokers, tmp_path: Path) -> None:
    conf = toml(tmp_path / "z.toml", 'log_level = "warning"\nmotd = "one"\n')
    bp = brokers.start("--config", str(conf))
    with Client(bp.router, bp.pub, timeout=3) as chat:
        assert chat.connect("early").motd == "one"
    # At warning level the session's info lines were not written (they are written before the
    # reply leaves, so they would be in the file by now).
    assert not bp.logged("opened")

    # A broken file is refused and the running settings kept.
    toml(conf, 'log_level = "debug"\nmotd = "broken"\nsession-timeout = "never"\n')
    bp.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: bp.logged("reload refused"), what="the refusal")
    refusal = next(line for line in bp.lines() if "reload refused" in line)
    assert "'never'" in refusal and "session" in refusal  # names what was wrong
    with Client(bp.router, bp.pub, timeout=3) as chat:
        assert chat.connect("middle").motd == "one"

    toml(conf, 'log-level = "debug"\nmotd = "two"\n')
    bp.proc.send_signal(signal.SIGHUP)

    def motd_now() -> str:
        with Client(bp.router, bp.pub, timeout=3) as chat:
            return chat.connect("late").motd

    wait_for(lambda: motd_now() == "two", what="the new motd")
    assert bp.proc.poll() is None
    wait_for(lambda: bp.logged("settings reloaded"), what="the reload line")
    wait_for(lambda: bp.logged("late") and bp.logged("opened"), what="info lines after the reload")
    lines = bp.lines()
    reloaded = next(i for i, line in enumerate(lines) if "settings reloaded" in line)
    assert any("opened" in line for line in lines[reloaded:])
    bp.proc.send_signal(signal.SIGTERM)
    assert bp.proc.wait(timeout=WAIT) == 0


# -- versions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zchat-broker", "zchat-client"])
def test_version_of_the_console_scripts(name: str) -> None:
    done = run([script(name), "--version"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{name} {dist_version(name)}"


def test_requests_per_commit_follow_the_durability(broker_factory: Callable[..., RunningBroker]) -> None:
    """A turn reads BATCH requests before it commits, BATCH_FSYNC when every commit waits for
    an fsync (SQLite with --durability full)."""
    assert broker_factory().broker._batch == server.BATCH
    assert broker_factory(BrokerConfig(durability=Durability.FULL)).broker._batch == server.BATCH_FSYNC
    memory = BrokerConfig(store="memory", durability=Durability.FULL)
    assert broker_factory(memory).broker._batch == server.BATCH
