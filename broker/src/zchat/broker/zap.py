"""The broker's ZAP handler (ZeroMQ RFC 27): which CURVE keys may connect. Sans-I/O.

In secure mode both broker sockets are CURVE servers with ``ZMQ_ZAP_DOMAIN = "zchat"`` and
``ZMQ_ZAP_ENFORCE_DOMAIN``: libzmq asks the handler bound at :data:`ZAP_ENDPOINT` about every
handshake and, with no handler there, refuses them all. The server binds that socket on its
own loop before binding the ROUTER and the XPUB, and hands each request to
:meth:`ZapHandler.handle`, whose reply carries the client's public key (Z85) as the ZAP user
id; libzmq then stamps it on every message of the connection as the ``User-Id`` property,
which is the identity the broker core uses.

Allowed keys are the ``*.key`` public certificates in the authorized-keys directory (one key
per file, like SSH's ``authorized_keys``), plus the broker's own public key, so that
``zchat-broker check`` and ``status``, which run where the server's secret key is, can ask.
The directory is re-read when it changes: each handshake makes the handler look at the
directory's modification time (one stat), so a key copied in is accepted on its first try
and a key deleted is refused from its next handshake; the full listing is compared at most
every :data:`CHECK_EVERY` seconds and on SIGHUP, which also notices a file rewritten in
place. When keys go, the server ends their sessions (``BrokerCore.keys_revoked``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from zchat.common.errors import KeyFileError
from zchat.common.keys import directory_signature, encode_key, load_authorized_keys

log = logging.getLogger("zchat.broker.zap")

#: Where libzmq sends ZAP requests (RFC 27); one handler per ZeroMQ context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: The ZAP domain set on both broker sockets; a request for another domain is refused.
ZAP_DOMAIN = "zchat"
ZAP_VERSION = b"1.0"
#: Seconds between full comparisons of the authorized-keys directory.
CHECK_EVERY = 1.0
#: A directory modified less than this long ago (ns) may hide a change behind an equal mtime.
_RECENT_NS = 2_000_000_000
#: Seconds before a refusal of the same key is logged again.
_LOG_REFUSAL_EVERY = 60.0

_OK, _DENIED, _FAILURE = b"200", b"400", b"500"

Signature = tuple[tuple[str, int, int, int], ...]


class ZapHandler:
    """Answers ZAP requests: CURVE only, domain ``zchat``, keys from ``directory``.

    Args:
        directory: the authorized-keys directory (``*.key`` public certificates).
        server_key: the broker's own public key (Z85), always allowed.
        check_every: seconds between full re-reads of the directory.

    Raises:
        KeyFileError: ``directory`` is missing or not a directory.
    """

    def __init__(self, directory: Path, server_key: str, *, check_every: float = CHECK_EVERY) -> None:
        self.directory = directory
        self.server_key = server_key
        self.check_every = check_every
        #: Handshakes accepted and refused since start.
        self.accepted = self.refused = 0
        self._allowed: frozenset[str] = frozenset({server_key})
        self._files: dict[str, Path] = {}
        self._signature: Signature | None = None
        self._dir_mtime: int | None = None
        self._next_check = 0.0
        self._revoked = False
        self._refusals_logged: dict[str, float] = {}
        if not directory.is_dir():
            raise KeyFileError(directory, "no such directory (the authorized client keys go there)")
        self._reload()
        self._revoked = False
        if len(self._allowed) == 1:
            log.warning("no client key is authorized yet: copy clients' .key files into %s", directory)

    @property
    def allowed(self) -> frozenset[str]:
        """The keys that may connect now (the authorized ones and the broker's own)."""
        return self._allowed

    def handle(self, request: list[bytes], now: float) -> list[bytes]:
        """The reply frames to one ZAP request (the frames after the envelope's delimiter)."""
        if len(request) < 6:
            log.error("malformed ZAP request of %d frames", len(request))
            return [ZAP_VERSION, request[1] if len(request) > 1 else b"", _FAILURE, b"malformed request", b"", b""]
        version, request_id, domain, address, _identity, mechanism, *credentials = request
        if version != ZAP_VERSION:
            return self._refuse(request_id, _FAILURE, "unsupported ZAP version", address=address)
        if domain != ZAP_DOMAIN.encode():
            return self._refuse(request_id, _DENIED, "unknown domain", address=address)
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return self._refuse(request_id, _DENIED, "CURVE required", address=address)
        key = encode_key(credentials[0])
        self.refresh(now)
        self._check_directory()
        if key not in self._allowed:
            return self._refuse(request_id, _DENIED, "unknown key", address=address, key=key, now=now)
        self.accepted += 1
        return [ZAP_VERSION, request_id, _OK, b"OK", key.encode("ascii"), b""]

    def refresh(self, now: float, *, force: bool = False) -> None:
        """Re-read the directory if it changed (compared at most every ``check_every`` s)."""
        if not force and now < self._next_check:
            return
        self._next_check = now + self.check_every
        try:
            signature: Signature | None = directory_signature(self.directory)
        except OSError:
            signature = None
        if force or signature != self._signature:
            self._reload()

    def take_revoked(self) -> bool:
        """True (once) if keys were removed since the last call: end their sessions."""
        revoked, self._revoked = self._revoked, False
        return revoked

    def _check_directory(self) -> None:
        """One stat: a file added to (or removed from) the directory changes its mtime.

        File system timestamps are coarse (a clock tick of a few ms), so a file added in the
        same tick as our last read leaves the mtime as it was: while the directory changed
        recently, the listing is compared too. Otherwise a flood of handshakes costs one
        stat each, not a listing.
        """
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return
        if mtime != self._dir_mtime:
            self._reload()
        elif time.time_ns() - mtime < _RECENT_NS:
            with contextlib.suppress(OSError):
                if directory_signature(self.directory) != self._signature:
                    self._reload()

    def _reload(self) -> None:
        try:
            self._dir_mtime = os.stat(self.directory).st_mtime_ns  # before listing: a change meanwhile shows next time
            signature = directory_signature(self.directory)
            files, skipped = load_authorized_keys(self.directory)
        except (OSError, KeyFileError) as exc:
            # Fail closed: nobody but the broker itself until the directory is back.
            log.error("cannot read the authorized keys (%s): refusing every client key until it can", exc)
            signature, files, skipped = None, {}, []
        previous = {path: key for key, path in self._files.items()}
        for problem in skipped:
            key = previous.get(problem.path)
            if key is not None and _written_lately(problem.path):
                # Most likely caught half-way through being rewritten in place (cp, echo >):
                # keep its key, and read it again at the next check (signature unknown).
                files.setdefault(key, problem.path)
                signature = None
                continue
            log.warning("skipping %s", problem)
        allowed = frozenset({*files, self.server_key})
        added, removed = allowed - self._allowed, self._allowed - allowed
        for key in sorted(added):
            log.info("key authorized: %s (%s)", key, files[key].name)
        for key in sorted(removed):
            log.warning("key no longer authorized: %s (%s)", key, self._files[key].name if key in self._files else "?")
        self._allowed, self._files, self._signature = allowed, files, signature
        self._revoked = self._revoked or bool(removed)

    def _refuse(
        self, request_id: bytes, status: bytes, why: str, *, address: bytes, key: str | None = None, now: float = 0.0
    ) -> list[bytes]:
        self.refused += 1
        peer = address.decode("utf-8", "replace")
        if key is None:
            log.info("handshake from %s refused: %s", peer, why)
        elif now - self._refusals_logged.get(key, -_LOG_REFUSAL_EVERY) >= _LOG_REFUSAL_EVERY:
            if len(self._refusals_logged) > 1024:
                self._refusals_logged.clear()
            self._refusals_logged[key] = now
            log.info("handshake from %s refused: %s %s (not in %s)", peer, why, key, self.directory)
        return [ZAP_VERSION, request_id, status, why.encode(), b"", b""]


def _written_lately(path: Path) -> bool:
    """Whether ``path`` was modified less than ``_RECENT_NS`` ago (False if it is gone)."""
    try:
        return time.time_ns() - path.stat().st_mtime_ns < _RECENT_NS
    except OSError:
        return False
