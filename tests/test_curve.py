"""CurveZMQ: key files, ``zchat-keygen``, the ZAP handler and a broker in secure mode.

The broker runs on loopback (OS-chosen ports) with a server key and an authorized-keys
directory in ``tmp_path``. Nothing waits a fixed time: failures are awaited through the
client's socket monitor, and changes to the key directory with ``wait_until``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zmq
import zmq.auth
import zmq.utils.z85
from tests.support import Keys, handshake_outcome, wait_until

from zchat.broker import BrokerConfig
from zchat.broker.zap import ZAP_DOMAIN, ZapHandler
from zchat.client import Client, EventKind
from zchat.common.codec import decode_reply, encode
from zchat.common.codes import ErrorCode
from zchat.common.errors import AuthenticationFailed, AuthFailure, ConfigError, KeyFileError, RequestError
from zchat.common.keygen import main as keygen
from zchat.common.keys import (
    KeyPair,
    generate,
    load_authorized_keys,
    load_public_key,
    load_secret_key,
    write_key_pair,
    write_public_key,
)
from zchat.common.protocol import Hello, Welcome

if TYPE_CHECKING:
    from tests.conftest import RunningBroker

LOOPBACK = "tcp://127.0.0.1:*"
READY = re.compile(rb"zchat-broker ready router=(\S+) pub=(\S+)")
#: How long an authentication failure may take to surface (it takes milliseconds).
FAIL_FAST = 1.0
#: The client timeout in these tests: a failure that waited for it would exceed FAIL_FAST.
CLIENT_TIMEOUT = 5.0



def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- key files and zchat-keygen ----------------------------------------------------------------


@pytest.mark.timeout(10)
def test_keygen_writes_a_key_pair_with_safe_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keygen(["--dir", str(tmp_path / "keys"), "alice"]) == 0
    public, secret = tmp_path / "keys" / "alice.key", tmp_path / "keys" / "alice.key_secret"
    assert mode(secret) == 0o600
    assert mode(public) == 0o644
    assert mode(tmp_path / "keys") == 0o700
    pair = load_secret_key(secret)
    assert load_public_key(public) == pair.public
    assert pair.public in capsys.readouterr().out
    assert pair.secret not in public.read_text()
    # The czmq/pyzmq certificate format: pyzmq reads what we write.
    assert zmq.auth.load_certificate(secret) == (pair.public.encode(), pair.secret.encode())
    assert zmq.auth.load_certificate(public) == (pair.public.encode(), None)


@pytest.mark.timeout(10)
def test_keygen_refuses_to_overwrite_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keygen(["--dir", str(tmp_path), "bob"]) == 0
    first = load_secret_key(tmp_path / "bob.key_secret")
    assert keygen(["--dir", str(tmp_path), "bob"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert load_secret_key(tmp_path / "bob.key_secret") == first  # untouched
    assert keygen(["--dir", str(tmp_path), "--exist-ok", "bob"]) == 0
    assert load_secret_key(tmp_path / "bob.key_secret") == first
    assert keygen(["--dir", str(tmp_path), "--force", "bob"]) == 0
    second = load_secret_key(tmp_path / "bob.key_secret")
    assert second != first
    assert mode(tmp_path / "bob.key_secret") == 0o600
    assert load_public_key(tmp_path / "bob.key") == second.public
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.timeout(10)
def test_keygen_secret_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert keygen(["--dir", str(tmp_path), "carol"]) == 0
    finally:
        os.umask(old)
    assert mode(tmp_path / "carol.key_secret") == 0o600


@pytest.mark.timeout(10)
def test_keygen_authorize_copies_the_public_key(tmp_path: Path) -> None:
    auth = tmp_path / "authorized"
    assert keygen(["--dir", str(tmp_path), "--authorize", str(auth), "alice", "bob"]) == 0
    keys, skipped = load_authorized_keys(auth)
    assert set(keys) == {load_public_key(tmp_path / "alice.key"), load_public_key(tmp_path / "bob.key")}
    assert not skipped
    assert not list(auth.glob("*.key_secret"))
    # Idempotent for scripts and containers that run it at every start.
    assert keygen(["--dir", str(tmp_path), "--authorize", str(auth), "--exist-ok", "alice", "bob"]) == 0
    assert set(load_authorized_keys(auth)[0]) == set(keys)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", ""])
def test_keygen_refuses_names_that_are_paths(tmp_path: Path, name: str) -> None:
    with pytest.raises(SystemExit) as exc:
        keygen(["--dir", str(tmp_path), name])
    assert exc.value.code == 2
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(10)
def test_keygen_is_an_installed_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "zchat-keygen"
    done = subprocess.run([str(script), "--dir", str(tmp_path), "dave"], capture_output=True, text=True,
                          timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dave.key_secret").exists()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bits", [0o640, 0o604, 0o644])
def test_a_secret_key_readable_by_others_is_refused(tmp_path: Path, bits: int) -> None:
    write_key_pair(tmp_path, "eve")
    path = tmp_path / "eve.key_secret"
    path.chmod(bits)
    with pytest.raises(KeyFileError) as exc:
        load_secret_key(path)
    assert "too open" in str(exc.value)
    assert f"chmod 600 {path}" in str(exc.value)


@pytest.mark.timeout(10)
def test_key_loaders_name_the_file_and_the_problem(tmp_path: Path) -> None:
    write_key_pair(tmp_path, "frank")
    with pytest.raises(KeyFileError, match="no such file"):
        load_secret_key(tmp_path / "nobody.key_secret")
    with pytest.raises(KeyFileError, match="public key file"):
        (tmp_path / "frank.key").chmod(0o600)
        load_secret_key(tmp_path / "frank.key")
    (tmp_path / "junk.key").write_text("hello\n")
    with pytest.raises(KeyFileError, match="not a CURVE certificate"):
        load_public_key(tmp_path / "junk.key")
    # A public key can be given as text, or read from either file of a pair.
    pair = load_secret_key(tmp_path / "frank.key_secret")
    assert load_public_key(pair.public) == pair.public
    assert load_public_key(tmp_path / "frank.key_secret") == pair.public


@pytest.mark.timeout(10)
def test_certificates_made_by_pyzmq_load(tmp_path: Path) -> None:
    public_file, secret_file = zmq.auth.create_certificates(tmp_path, "legacy")
    Path(secret_file).chmod(0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    assert load_secret_key(secret_file) == KeyPair(public.decode(), secret.decode())
    assert load_public_key(public_file) == public.decode()


@pytest.mark.timeout(10)
def test_authorized_keys_skip_bad_files_and_ignore_others(tmp_path: Path) -> None:
    write_key_pair(tmp_path, "good")
    (tmp_path / "bad.key").write_text('curve\n    public-key = "not a key"\n')
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.key").write_text("ignored")
    keys, skipped = load_authorized_keys(tmp_path)
    assert set(keys) == {load_public_key(tmp_path / "good.key")}
    assert [problem.path.name for problem in skipped] == ["bad.key"]


# -- the ZAP handler, without sockets ----------------------------------------------------------


def zap_request(key: bytes, *, domain: str = ZAP_DOMAIN, mechanism: bytes = b"CURVE",
                version: bytes = b"1.0") -> list[bytes]:
    return [version, b"7", domain.encode(), b"127.0.0.1", b"", mechanism, key]


def raw(public: str) -> bytes:
    return zmq.utils.z85.decode(public.encode())


@pytest.mark.timeout(10)
def test_zap_handler_allows_authorized_keys_and_names_them(tmp_path: Path) -> None:
    server, alice, mallory = generate(), generate(), generate()
    write_key_pair(tmp_path, "alice", alice)
    (tmp_path / "alice.key_secret").unlink()  # the directory holds public keys only
    zap = ZapHandler(tmp_path, server.public)
    assert zap.handle(zap_request(raw(alice.public)), 0.0) == [b"1.0", b"7", b"200", b"OK", alice.public.encode(), b""]
    assert zap.handle(zap_request(raw(mallory.public)), 0.0)[2:5] == [b"400", b"unknown key", b""]
    assert zap.handle(zap_request(raw(alice.public), domain="other"), 0.0)[2] == b"400"
    assert zap.handle(zap_request(b"", mechanism=b"NULL")[:-1], 0.0)[2] == b"400"
    assert zap.handle(zap_request(raw(alice.public), version=b"2.0"), 0.0)[2] == b"500"
    # The broker's own key: zchat-broker check/status run with the server's key pair.
    assert zap.handle(zap_request(raw(server.public)), 0.0)[2] == b"200"
    assert (zap.accepted, zap.refused) == (2, 4)


@pytest.mark.timeout(10)
def test_zap_handler_sees_keys_added_at_once_and_removed_on_refresh(tmp_path: Path) -> None:
    server, alice, bob = generate(), generate(), generate()
    write_key_pair(tmp_path, "alice", alice)
    zap = ZapHandler(tmp_path, server.public)
    assert zap.handle(zap_request(raw(bob.public)), 0.0)[2] == b"400"
    write_key_pair(tmp_path, "bob", bob)
    assert zap.handle(zap_request(raw(bob.public)), 0.0)[2] == b"200"  # no wait for the next check
    assert not zap.take_revoked()
    (tmp_path / "alice.key").unlink()
    assert zap.handle(zap_request(raw(alice.public)), 0.0)[2] == b"400"  # its next handshake
    assert zap.take_revoked()  # the server then ends alice's sessions
    assert not zap.take_revoked()
    # Without handshakes, the periodic refresh notices changes (here bob's key replaced).
    write_key_pair(tmp_path, "bob", generate(), force=True)
    zap.refresh(0.5)  # within check_every of the last check: not looked at yet
    assert bob.public in zap.allowed
    zap.refresh(10.0)
    assert bob.public not in zap.allowed
    assert zap.take_revoked()


@pytest.mark.timeout(10)
def test_zap_handler_needs_the_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such directory"):
        ZapHandler(tmp_path / "missing", generate().public)


@pytest.mark.timeout(10)
def test_zap_handler_answers_malformed_requests_and_fails_closed_without_its_directory(tmp_path: Path) -> None:
    server, alice = generate(), generate()
    keys = tmp_path / "authorized"
    keys.mkdir()
    write_public_key(keys / "alice.key", alice.public)
    zap = ZapHandler(keys, server.public)
    for short in ([], [b"1.0"], [b"1.0", b"7", b"zchat"]):
        reply = zap.handle(short, 0.0)
        assert len(reply) == 6 and reply[2] == b"500"  # still a well-formed ZAP reply
    shutil.rmtree(keys)  # removed while running: nobody but the broker itself
    assert zap.handle(zap_request(raw(alice.public)), 1.0)[2] == b"400"
    assert zap.take_revoked() and zap.allowed == {server.public}
    assert zap.handle(zap_request(raw(server.public)), 1.0)[2] == b"200"
    keys.mkdir()  # and back: its first handshake sees it
    write_public_key(keys / "alice.key", alice.public)
    assert zap.handle(zap_request(raw(alice.public)), 1.0)[2] == b"200"
    assert not zap.take_revoked()


@pytest.mark.timeout(10)
def test_zap_handler_does_not_revoke_a_key_whose_file_is_being_rewritten(tmp_path: Path) -> None:
    """A key file caught half-way through a rewrite in place (``cp`` over it) keeps its key
    until a later check; one that stays broken is dropped then."""
    server, alice = generate(), generate()
    path = tmp_path / "alice.key"
    write_public_key(path, alice.public)
    zap = ZapHandler(tmp_path, server.public)
    path.write_text("#   ZeroMQ CURVE Public Certificate\n")  # the first half of the new content
    zap.refresh(10.0)
    assert alice.public in zap.allowed and not zap.take_revoked()  # not "your key was revoked"
    assert zap.handle(zap_request(raw(alice.public)), 10.0)[2] == b"200"
    old = time.time() - 10
    os.utime(path, (old, old))  # still broken long after its last write: a broken file
    zap.refresh(20.0)
    assert alice.public not in zap.allowed and zap.take_revoked()


# -- a broker in secure mode -------------------------------------------------------------------


def session_keys(rb: RunningBroker) -> list[str | None]:
    """The CURVE keys of the broker's live sessions (read on the broker's thread)."""
    core = rb.broker.core
    found: list[str | None] = rb.broker.submit(lambda: [s.pubkey for s in core.sessions.values()]).result(timeout=5)
    return found


def fails_fast(client: Client, nick: str) -> tuple[AuthenticationFailed, float]:
    start = time.monotonic()
    with pytest.raises(AuthenticationFailed) as exc:
        client.connect(nick)
    return exc.value, time.monotonic() - start


@pytest.mark.timeout(20)
def test_authorized_clients_chat_and_are_known_by_their_key(keys: Keys, secure: RunningBroker,
                                                           curve_clients: Callable[..., Client]) -> None:
    alice, bob = keys.make("alice"), keys.make("bob")
    a, b = curve_clients("alice"), curve_clients("bob")
    welcome = a.connect("alice")
    # The identity comes from the transport: ZAP's user id, the message's User-Id property.
    assert welcome.key == alice.public
    assert b.connect("bob").key == bob.public
    a.join("general")
    b.join("general")
    a.say("general", "over CURVE")
    event = next(e for e in b.events(timeout=5) if e.kind is EventKind.MESSAGE)
    assert (event.sender, event.text) == ("alice", "over CURVE")
    assert sorted(k or "" for k in session_keys(secure)) == sorted([alice.public, bob.public])


@pytest.mark.timeout(30)
def test_a_dm_to_an_offline_nick_waits_in_its_keys_inbox_until_it_connects(
    keys: Keys, broker_factory: Callable[..., RunningBroker]
) -> None:
    # Ticks only every minute: the inbox must come with connect(), not with a later tick.
    config = BrokerConfig(curve_secret_key=keys.secret("server"), authorized_keys=keys.authorized, store="memory",
                          tick_interval=60.0)
    rb = broker_factory(config)

    def client(name: str) -> Client:
        made = Client(rb.router, rb.pub, timeout=CLIENT_TIMEOUT, server_key=str(keys.public("server")),
                      key=keys.secret(name))
        opened.append(made)
        return made

    opened: list[Client] = []
    keys.make("alice")
    keys.make("bob")
    try:
        first = client("bob")
        first.connect("Bob")  # registers the nick to bob's key
        first.close()  # bye: bob is offline
        a = client("alice")
        a.connect("alice")
        assert a.dm("bob", "while you were out").offline
        b = client("bob")  # a new process of bob's: a new client identity, the same key
        b.connect("bob")
        # connect() has delivered the inbox's recent history, before anything live.
        first_dm = b.recv_event(timeout=0.001)
        assert (first_dm.kind, first_dm.sender, first_dm.to, first_dm.text, first_dm.seq) == (
            EventKind.DM, "alice", "Bob", "while you were out", 1
        )
        assert not a.dm("bob", "welcome back").offline
        live = next(e for e in b.events(timeout=5) if e.kind is EventKind.DM)
        assert (live.text, live.seq) == ("welcome back", 2)
        b.close()
        # The line client shows the inbox on connect, and says when a DM will wait.
        env = clean_env(ZCHAT_SERVER_KEY=str(keys.public("server")), ZCHAT_KEY=str(keys.secret("alice")))
        done = run(["-m", "zchat.client", "--router", rb.router, "--pub", rb.pub, "--nick", "alice",
                    "--json"], env=env, stdin="/msg bob are you there?\n")
        assert done.returncode == 0, done.stderr + done.stdout
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        dms = [line["text"] for line in lines if line.get("kind") == "dm"]
        assert dms[:2] == ["while you were out", "welcome back"]  # alice's own copies, from her inbox
        assert any(line["kind"] == "offline" and line["nick"] == "bob" for line in lines)
    finally:
        for made in opened:
            made.close()


@pytest.mark.timeout(30)
def test_no_dm_waits_for_a_revoked_key(keys: Keys, secure: RunningBroker,
                                       curve_clients: Callable[..., Client]) -> None:
    keys.make("alice")
    keys.make("bob")
    bob = curve_clients("bob")
    bob.connect("bob")
    bob.close()
    alice = curve_clients("alice")
    alice.connect("alice")
    assert alice.dm("bob", "one").offline
    keys.revoke("bob")

    def refused() -> bool:
        try:
            alice.dm("bob", "anyone?")
        except RequestError as exc:
            return exc.code is ErrorCode.NO_SUCH_NICK
        return False

    wait_until(refused, timeout=10, interval=0.2)  # once the broker has seen the directory change


@pytest.mark.timeout(20)
def test_an_unknown_key_fails_fast_and_gets_no_access(keys: Keys, secure: RunningBroker,
                                                     curve_clients: Callable[..., Client]) -> None:
    keys.make("alice")
    keys.make("mallory", authorize=False)
    watcher = curve_clients("alice")
    watcher.connect("alice")
    watcher.join("general")
    error, took = fails_fast(curve_clients("mallory"), "mallory")
    assert error.failure is AuthFailure.KEY_REFUSED
    assert keys.pairs["mallory"].public in str(error) and "authorized keys" in str(error)
    assert took < FAIL_FAST
    assert session_keys(secure) == [keys.pairs["alice"].public]
    assert watcher.who("general") == ["alice"]
    assert secure.broker.zap is not None and secure.broker.zap.refused >= 1


@pytest.mark.timeout(20)
def test_a_wrong_server_key_fails_fast(keys: Keys, secure: RunningBroker, curve_clients: Callable[..., Client]) -> None:
    keys.make("alice")
    keys.make("impostor", authorize=False)  # a server key that is not this broker's
    error, took = fails_fast(curve_clients("alice", server="impostor"), "alice")
    assert error.failure is AuthFailure.HANDSHAKE_FAILED
    assert "server key" in str(error)
    assert took < FAIL_FAST
    assert session_keys(secure) == []


@pytest.mark.timeout(20)
def test_a_plain_client_gets_no_access(keys: Keys, secure: RunningBroker, curve_clients: Callable[..., Client],
                                       zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    error, took = fails_fast(curve_clients(None), "plain")
    assert error.failure is AuthFailure.MECHANISM_MISMATCH
    assert "--server-key" in str(error)
    assert took < FAIL_FAST
    # By hand: a SUB on everything and a DEALER saying hello, both without CURVE.
    sub, dealer = zctx.socket(zmq.SUB), zctx.socket(zmq.DEALER)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    monitor = dealer.get_monitor_socket()
    for sock in (sub, dealer, monitor):
        sock.setsockopt(zmq.LINGER, 0)
    sub.connect(secure.pub)
    dealer.connect(secure.router)
    dealer.send(b"\x81\xa4kind\xa5hello")
    # Refused: the mechanism mismatch, when the client reads the part of the broker's greeting
    # that names CURVE; or, about half the time, a failure with no detail (or a disconnection),
    # when the broker has read the client's greeting and closed the connection first.
    outcome = handshake_outcome(monitor)
    refused = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED}
    assert outcome in refused, outcome
    keys.make("alice")
    alice = curve_clients("alice")
    alice.connect("alice")
    alice.join("general")
    alice.say("general", "for members only")
    assert next(e for e in alice.events(timeout=5) if e.kind is EventKind.MESSAGE).text == "for members only"
    assert not sub.poll(0) and not dealer.poll(0)
    assert session_keys(secure) == [keys.pairs["alice"].public]


@pytest.mark.timeout(20)
def test_a_key_added_while_running_is_accepted_without_restart(keys: Keys, secure: RunningBroker,
                                                               curve_clients: Callable[..., Client]) -> None:
    keys.make("late", authorize=False)
    assert fails_fast(curve_clients("late"), "late")[0].failure is AuthFailure.KEY_REFUSED
    keys.authorize("late")
    start = time.monotonic()
    assert curve_clients("late").connect("late").key == keys.pairs["late"].public
    assert time.monotonic() - start < FAIL_FAST  # its first try: no waiting for a periodic check


@pytest.mark.timeout(20)
def test_a_removed_key_is_refused_and_its_sessions_end(keys: Keys, secure: RunningBroker,
                                                       curve_clients: Callable[..., Client]) -> None:
    gone, stays = keys.make("gone"), keys.make("stays")
    curve_clients("gone").connect("gone")
    curve_clients("stays").connect("stays")
    keys.revoke("gone")
    # Noticed by the broker's periodic check (every second) without any new connection.
    wait_until(lambda: gone.public not in session_keys(secure), timeout=5)
    assert session_keys(secure) == [stays.public]
    error, took = fails_fast(curve_clients("gone"), "gone")
    assert error.failure is AuthFailure.KEY_REFUSED
    assert took < FAIL_FAST


@pytest.mark.timeout(20)
def test_a_revoked_keys_open_connection_is_heard_no_more(keys: Keys, secure: RunningBroker,
                                                         zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # By hand, so nothing reconnects: the same CURVE connection before and after the removal.
    pair = keys.make("gone")
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.CURVE_SERVERKEY, keys.pairs["server"].public.encode())
    dealer.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
    dealer.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
    dealer.connect(secure.router)
    dealer.send(encode(Hello(1, "gone")))
    assert dealer.poll(5000)
    welcome = decode_reply(dealer.recv())
    assert isinstance(welcome, Welcome) and welcome.key == pair.public
    keys.revoke("gone")
    broker = secure.broker
    broker.submit(lambda: broker.reload(broker.config)).result(timeout=5)  # what SIGHUP does
    assert session_keys(secure) == []
    dealer.send(encode(Hello(2, "gone")))  # a new session on the old connection
    assert not dealer.poll(500)
    assert session_keys(secure) == []


@pytest.mark.timeout(20)
def test_a_reload_applies_a_removal_at_once(keys: Keys, secure: RunningBroker,
                                            curve_clients: Callable[..., Client]) -> None:
    keys.make("gone")
    keys.revoke("gone")
    broker = secure.broker
    broker.submit(lambda: broker.reload(broker.config)).result(timeout=5)  # what SIGHUP does
    assert fails_fast(curve_clients("gone"), "gone")[0].failure is AuthFailure.KEY_REFUSED


@pytest.mark.timeout(20)
def test_a_curve_client_of_a_plain_broker_is_told(keys: Keys, broker: RunningBroker) -> None:
    keys.make("alice")
    client = Client(broker.router, broker.pub, timeout=CLIENT_TIMEOUT, server_key=str(keys.public("server")),
                    key=keys.secret("alice"))
    try:
        error, took = fails_fast(client, "alice")
    finally:
        client.close()
    # libzmq reports the mismatch, or only the dropped connection when the broker's reset
    # comes first: the message names both causes then.
    assert error.failure in (AuthFailure.MECHANISM_MISMATCH, AuthFailure.HANDSHAKE_FAILED)
    assert "does not use CURVE" in str(error)
    assert took < FAIL_FAST


@pytest.mark.timeout(10)
def test_a_client_needs_both_keys(keys: Keys) -> None:
    keys.make("alice")
    with pytest.raises(ConfigError, match="only key was given"):
        Client(key=keys.secret("alice"))
    with pytest.raises(ConfigError, match="only server_key was given"):
        Client(server_key=str(keys.public("server")))
    keys.secret("alice").chmod(0o644)
    with pytest.raises(KeyFileError, match="too open"):
        Client(server_key=str(keys.public("server")), key=keys.secret("alice"))


@pytest.mark.timeout(10)
def test_the_broker_config_needs_the_authorized_keys_with_a_key(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="--authorized-keys"):
        BrokerConfig(curve_secret_key=keys.secret("server"))
    with pytest.raises(ConfigError, match="--curve-secret-key"):
        BrokerConfig(authorized_keys=keys.authorized)
    assert BrokerConfig(curve_secret_key=keys.secret("server"), authorized_keys=keys.authorized).secure


# -- the programs ------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}
    return {**env, "ZCHAT_NO_RATE_LIMITS": "1", **extra}


def run(args: list[str], env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=15, check=False,
                          env=env or clean_env(), input=stdin)


@pytest.mark.timeout(30)
def test_secure_broker_may_bind_beyond_loopback_without_insecure(keys: Keys) -> None:
    env = clean_env(ZCHAT_CURVE_SECRET_KEY=str(keys.secret("server")), ZCHAT_AUTHORIZED_KEYS=str(keys.authorized))
    cmd = [sys.executable, "-m", "zchat.broker", "--store", "memory", "--router", LOOPBACK, "--pub", "tcp://0.0.0.0:*"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        ready = READY.search(proc.stdout.readline())
        assert ready is not None
        # zchat-broker check runs with the broker's own key pair (the ZAP handler allows it).
        router = ready.group(1).decode()
        check = run(["-m", "zchat.broker", "check", "--router", router, "--timeout", "5"], env=env)
        assert check.returncode == 0, check.stderr
        plain = run(["-m", "zchat.broker", "check", "--router", router, "--timeout", "0.5"])
        assert plain.returncode == 1
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert b"WITHOUT encryption" not in err


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--curve-secret-key", "{secret}"], "--authorized-keys"),
        (["--curve-secret-key", "{dir}/nope.key_secret", "--authorized-keys", "{auth}"], "no such file"),
        (["--curve-secret-key", "{public}", "--authorized-keys", "{auth}"], "public key file"),
        (["--curve-secret-key", "{secret}", "--authorized-keys", "{dir}/nowhere"], "no such directory"),
    ],
)
def test_broker_refuses_unusable_keys_naming_them(keys: Keys, args: list[str], says: str) -> None:
    keys.public("server").chmod(0o600)
    names = {"secret": keys.secret("server"), "public": keys.public("server"), "dir": keys.dir,
             "auth": keys.authorized}
    done = run(["-m", "zchat.broker", "--store", "memory", "--router", LOOPBACK, "--pub", LOOPBACK,
                *(arg.format(**names) for arg in args)])
    assert done.returncode == 2
    assert says in done.stderr
    assert "ready" not in done.stdout


@pytest.mark.timeout(30)
def test_broker_refuses_a_secret_key_others_can_read(keys: Keys) -> None:
    keys.secret("server").chmod(0o644)
    done = run(["-m", "zchat.broker", "--store", "memory", "--router", LOOPBACK, "--pub", LOOPBACK,
                "--curve-secret-key", str(keys.secret("server")), "--authorized-keys", str(keys.authorized)])
    assert done.returncode == 2
    assert "too open" in done.stderr and "chmod 600" in done.stderr


@pytest.mark.timeout(30)
def test_client_cli_chats_with_keys_from_the_environment(keys: Keys, secure: RunningBroker) -> None:
    keys.make("alice")
    env = clean_env(ZCHAT_SERVER_KEY=str(keys.public("server")), ZCHAT_KEY=str(keys.secret("alice")))
    done = run(["-m", "zchat.client", "--router", secure.router, "--pub", secure.pub, "--nick", "alice",
                "--json"], env=env, stdin="hello\n")
    assert done.returncode == 0, done.stderr + done.stdout
    assert '"kind":"welcome"' in done.stdout and '"text":"hello"' in done.stdout


@pytest.mark.timeout(30)
def test_client_cli_exits_1_quickly_with_a_refused_key(keys: Keys, secure: RunningBroker) -> None:
    keys.make("mallory", authorize=False)
    start = time.monotonic()
    done = run(["-m", "zchat.client", "--router", secure.router, "--pub", secure.pub, "--nick", "m", "--timeout",
                "10", "--server-key", str(keys.public("server")), "--key", str(keys.secret("mallory"))])
    assert done.returncode == 1
    assert "refused this client's key" in done.stderr
    assert time.monotonic() - start < 8  # well under --timeout: the monitor told


@pytest.mark.timeout(30)
@pytest.mark.parametrize("given", ["--key", "--server-key"])
def test_client_cli_with_one_key_is_a_usage_error(keys: Keys, given: str) -> None:
    keys.make("alice")
    path = keys.secret("alice") if given == "--key" else keys.public("server")
    done = run(["-m", "zchat.client", "--nick", "a", given, str(path)])
    assert done.returncode == 2
    assert "CURVE needs both" in done.stderr


@pytest.mark.timeout(30)
def test_bot_cli_exits_1_with_a_refused_key(keys: Keys, secure: RunningBroker) -> None:
    keys.make("robot", authorize=False)
    done = run(["-m", "zchat.client.botcli", "echo", "--router", secure.router, "--pub", secure.pub,
                "--server-key", str(keys.public("server")), "--key", str(keys.secret("robot"))])
    assert done.returncode == 1
    assert "refused this client's key" in done.stderr


@pytest.mark.timeout(30)
def test_joining_a_hundred_rooms_stays_within_the_default_flood_limits(
    keys: Keys, broker_factory: Callable[..., RunningBroker]
) -> None:
    """With CURVE every SUB subscription is charged to the key too (joins, topics, syncs):
    the default budget must let a client join as many rooms as a session may hold."""
    from tests.conftest import DEFAULT_RATE_LIMITS

    config = BrokerConfig(curve_secret_key=keys.secret("server"), authorized_keys=keys.authorized,
                          store="memory", rate_limits=DEFAULT_RATE_LIMITS)
    rb = broker_factory(config)
    keys.make("alice")
    client = Client(rb.router, rb.pub, timeout=CLIENT_TIMEOUT, server_key=str(keys.public("server")),
                    key=keys.secret("alice"))
    try:
        client.connect("alice")
        rooms = [f"room{i}" for i in range(rb.broker.config.limits.max_rooms_per_session)]
        for room in rooms:
            client.join(room)
        assert client.say(rooms[-1], "made it").seq == 1
        counters = rb.broker.submit(rb.broker.core.snapshot).result(timeout=5)
        assert counters["rate_limited_total"] == 0
        assert counters["sessions"] == 1
    finally:
        client.close()


@pytest.mark.timeout(30)
def test_a_revoked_client_stops_reconnecting_and_says_why(
    keys: Keys, secure: RunningBroker, curve_clients: Callable[..., Client]
) -> None:
    """Its key refused, retrying cannot help: the client stops, calls raise the refusal,
    events() ends, nothing leaks and close() is prompt."""
    keys.make("gone")
    client = curve_clients("gone")
    client.connect("gone")
    client.join("general")
    inner = client._client
    attempts: list[int] = []
    real_open = inner._open_sockets

    def open_sockets() -> None:
        real_open()
        attempts.append(len([s for s in inner._ctx._sockets if not s.closed]))

    inner._open_sockets = open_sockets  # type: ignore[method-assign]
    keys.revoke("gone")
    wait_until(lambda: inner.refused is not None, timeout=20)
    assert inner.refused is not None and inner.refused.failure is AuthFailure.KEY_REFUSED
    with pytest.raises(AuthenticationFailed):
        client.say("general", "anyone?")
    assert len(attempts) == 1, attempts  # one try after the goaway, then no more
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 2
