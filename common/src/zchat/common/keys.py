"""CURVE key files: the czmq / pyzmq certificate format, written and read with safe permissions.

A key pair ``NAME`` is two files, as ``zmq.auth.create_certificates`` and czmq's ``zcert``
write them:

* ``NAME.key`` (mode 0644), the public certificate: give it to the other side.
* ``NAME.key_secret`` (mode 0600), the secret certificate: it holds both keys.

Both are ZPL text with a ``curve`` section holding ``public-key = "<Z85>"`` (and, in the
secret file, ``secret-key = "<Z85>"``). Keys are 32 bytes, written as 40 Z85 characters.

Secret files are created with ``O_CREAT | O_EXCL`` and mode 0600 (never overwritten unless
asked, and then replaced atomically), and :func:`load_secret_key` refuses one that group or
others may read, as ssh does with a private key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.utils.z85

from .errors import KeyFileError

#: File name suffixes of a key pair (the czmq convention).
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: Length of a CURVE key in Z85 text.
Z85_KEY_LENGTH = 40
PUBLIC_MODE = 0o644
SECRET_MODE = 0o600

_SECRET_BANNER = """#   ****  Generated on {when} by zchat-keygen  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {when} by zchat-keygen  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange.

"""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair as Z85 text (``repr`` hides the secret)."""

    public: str
    secret: str

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public!r}, secret=...)"


def is_z85_key(text: str) -> bool:
    """True if ``text`` is a CURVE key in Z85 (40 characters decoding to 32 bytes)."""
    if len(text) != Z85_KEY_LENGTH:
        return False
    try:
        return len(zmq.utils.z85.decode(text.encode("ascii"))) == 32
    except (ValueError, KeyError, UnicodeError, struct.error):
        return False


def encode_key(raw: bytes) -> str:
    """A 32-byte key (as ZAP hands it over) in Z85 text."""
    return zmq.utils.z85.encode(raw).decode("ascii")


def generate() -> KeyPair:
    """A fresh key pair (libzmq's ``zmq_curve_keypair``)."""
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode("ascii"), secret.decode("ascii"))


def public_of(secret: str) -> str:
    """The public key that belongs to ``secret`` (both Z85)."""
    return zmq.curve_public(secret.encode("ascii")).decode("ascii")


def _certificate(banner: str, public: str, secret: str | None) -> str:
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    lines = [banner.format(when=when), "metadata\n", "curve\n", f'    public-key = "{public}"\n']
    if secret is not None:
        lines.append(f'    secret-key = "{secret}"\n')
    return "".join(lines)


def _write_new(path: Path, text: str, mode: int, *, force: bool) -> None:
    """Write ``path`` with exactly ``mode``; never follow or reuse an existing file.

    Without ``force`` an existing file is an error (``O_EXCL``); with it, the new content
    goes to a fresh temporary file in the same directory that then replaces ``path``, so the
    file is never briefly readable with the wrong mode or half written.
    """
    target = path.with_name(f".{path.name}.tmp{os.getpid()}") if force else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise KeyFileError(path, "already exists (pass --force to replace it)") from None
    try:
        os.fchmod(fd, mode)  # the umask must not loosen or tighten it
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
        if force:
            os.replace(target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


def key_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """Where the key pair ``name`` lives in ``directory``: (public file, secret file)."""
    return directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"


def write_key_pair(directory: Path, name: str, pair: KeyPair | None = None, *, force: bool = False) -> KeyPair:
    """Create ``directory/name.key`` (0644) and ``directory/name.key_secret`` (0600).

    Raises:
        KeyFileError: a file exists already (and not ``force``).
        OSError: the directory is missing or not writable.
    """
    pair = pair or generate()
    public_path, secret_path = key_paths(directory, name)
    if not force:
        for path in (secret_path, public_path):
            if path.exists() or path.is_symlink():
                raise KeyFileError(path, "already exists (pass --force to replace it)")
    _write_new(secret_path, _certificate(_SECRET_BANNER, pair.public, pair.secret), SECRET_MODE, force=force)
    write_public_key(public_path, pair.public, force=force)
    return pair


def write_public_key(path: Path, public: str, *, force: bool = False) -> None:
    """Write a public certificate holding ``public`` to ``path`` (mode 0644)."""
    _write_new(path, _certificate(_PUBLIC_BANNER, public, None), PUBLIC_MODE, force=force)


def _read_fields(path: Path) -> dict[str, str]:
    """The ``public-key`` and ``secret-key`` values of a certificate file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(path, "no such file") from None
    except IsADirectoryError:
        raise KeyFileError(path, "is a directory, not a key file") from None
    except UnicodeDecodeError:
        raise KeyFileError(path, "not a key file (not text)") from None
    except OSError as exc:
        raise KeyFileError(path, exc.strerror or str(exc)) from None
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if sep and name in ("public-key", "secret-key"):
            fields[name] = value.strip().strip("\"'")
    return fields


def load_public_key(source: str | Path) -> str:
    """A public key: ``source`` is the key itself (40 Z85 characters) or a certificate file.

    A secret certificate works too (its public key is read), so a client can point at the
    broker's ``.key`` or a bot at its own ``.key_secret``.

    Raises:
        KeyFileError: no such file, or it holds no valid public key.
    """
    if isinstance(source, str) and is_z85_key(source):
        return source
    path = Path(source)
    public = _read_fields(path).get("public-key")
    if public is None:
        raise KeyFileError(path, 'no public-key = "..." line: not a CURVE certificate')
    if not is_z85_key(public):
        raise KeyFileError(path, "its public-key is not a 40-character Z85 CURVE key")
    return public


def check_secret_permissions(path: Path) -> None:
    """Refuse a secret key file that is not a regular file or that group or others may read.

    Raises:
        KeyFileError: naming the file and the fix.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(path, "no such file") from None
    except OSError as exc:
        raise KeyFileError(path, exc.strerror or str(exc)) from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(path, "not a regular file")
    if os.name == "posix" and info.st_mode & 0o077:
        raise KeyFileError(
            path,
            f"permissions {stat.S_IMODE(info.st_mode):04o} are too open: a secret key must be readable by "
            f"its owner only (chmod 600 {path})",
        )


def load_secret_key(path: Path | str) -> KeyPair:
    """The key pair in a secret certificate (``NAME.key_secret``), after checking its mode.

    Raises:
        KeyFileError: missing, too open, malformed, or its two keys do not belong together.
    """
    path = Path(path)
    check_secret_permissions(path)
    fields = _read_fields(path)
    secret = fields.get("secret-key")
    if secret is None:
        hint = " (this is a public key file; give the .key_secret one)" if "public-key" in fields else ""
        raise KeyFileError(path, f'no secret-key = "..." line{hint}')
    if not is_z85_key(secret):
        raise KeyFileError(path, "its secret-key is not a 40-character Z85 CURVE key")
    public = public_of(secret)
    if fields.get("public-key", public) != public:
        raise KeyFileError(path, "its public-key does not belong to its secret-key")
    return KeyPair(public, secret)


def load_authorized_keys(directory: Path) -> tuple[dict[str, Path], list[KeyFileError]]:
    """The public keys of the ``*.key`` files in ``directory``: key -> file, and the files skipped.

    Like SSH's ``authorized_keys``, but one certificate per file so keys are added and
    removed by copying and deleting files. Hidden files and anything not ending in ``.key``
    are ignored; a file that holds no valid key is skipped and reported.

    Raises:
        KeyFileError: ``directory`` is missing or not a directory.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        raise KeyFileError(directory, "no such directory") from None
    except NotADirectoryError:
        raise KeyFileError(directory, "not a directory") from None
    except OSError as exc:
        raise KeyFileError(directory, exc.strerror or str(exc)) from None
    keys: dict[str, Path] = {}
    skipped: list[KeyFileError] = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(PUBLIC_SUFFIX):
            continue
        try:
            keys.setdefault(load_public_key(Path(entry.path)), Path(entry.path))
        except KeyFileError as exc:
            skipped.append(exc)
    return keys, skipped


def directory_signature(directory: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when a ``*.key`` file in ``directory`` is added, removed or rewritten.

    Raises:
        OSError: the directory cannot be listed.
    """
    found = []
    for entry in os.scandir(directory):
        if entry.name.endswith(PUBLIC_SUFFIX) and not entry.name.startswith("."):
            try:
                info = entry.stat()
            except OSError:
                continue  # removed meanwhile
            found.append((entry.name, info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(sorted(found))
