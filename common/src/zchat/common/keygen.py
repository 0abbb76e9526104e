"""``zchat-keygen``: create CURVE key pairs for the broker, clients and bots.

::

    zchat-keygen broker                          ./broker.key, ./broker.key_secret
    zchat-keygen --dir ~/.zchat alice            ~/.zchat/alice.key, ~/.zchat/alice.key_secret
    zchat-keygen --authorize /etc/zchat/authorized alice
                                                 ... and a copy of alice.key in the broker's
                                                 authorized-keys directory

The secret file is created with mode 0600 and never overwritten unless ``--force`` is given;
``--exist-ok`` keeps a key pair that exists already (for scripts and containers that run
at every start). Exit status: 0 done, 1 a file could not be written or read, 2 bad usage.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import __version__
from .errors import KeyFileError
from .keys import KeyPair, key_paths, load_public_key, load_secret_key, write_key_pair, write_public_key

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: use letters, digits, '.', '_' and '-' (not a path)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zchat-keygen",
        description="Create CURVE key pairs: NAME.key (public, give it out) and NAME.key_secret (keep it; "
        "mode 0600), in the czmq/pyzmq certificate format.",
    )
    parser.add_argument("--version", action="version", version=f"zchat-keygen {__version__}")
    parser.add_argument("names", nargs="+", type=_name, metavar="NAME", help="name of a key pair to create")
    parser.add_argument("--dir", "-d", type=Path, default=Path("."),
                        help="directory to write the key files in (created, mode 0700, if missing; default .)")
    parser.add_argument("--authorize", type=Path, metavar="DIR",
                        help="also copy each public key into DIR, a broker's --authorized-keys directory")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--force", action="store_true", help="replace key files that exist already")
    again.add_argument("--exist-ok", action="store_true",
                       help="keep a key pair that exists already (and still authorize it)")
    return parser


def _existing(directory: Path, name: str) -> KeyPair | None:
    """The key pair ``name`` if both its files exist; None if neither does.

    Raises:
        KeyFileError: only one of them exists, or the secret one is unusable.
    """
    public_path, secret_path = key_paths(directory, name)
    if not secret_path.exists() and not public_path.exists():
        return None
    pair = load_secret_key(secret_path)  # checks it exists, its mode and its content
    if not public_path.exists():
        write_public_key(public_path, pair.public)
    elif load_public_key(public_path) != pair.public:
        raise KeyFileError(public_path, f"does not match {secret_path.name} (pass --force to make a new pair)")
    return pair


def _authorize(directory: Path, name: str, public: str, *, force: bool) -> Path:
    path = directory / f"{name}.key"
    if path.exists() and not force:
        if load_public_key(path) == public:
            return path
        raise KeyFileError(path, "already holds another key (pass --force to replace it)")
    write_public_key(path, public, force=force)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if args.authorize is not None:
            args.authorize.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name in args.names:
            pair = _existing(args.dir, name) if args.exist_ok else None
            kept = pair is not None
            if pair is None:
                pair = write_key_pair(args.dir, name, force=args.force)
            public_path, secret_path = key_paths(args.dir, name)
            print(f"{name}: {'kept' if kept else 'wrote'} {public_path} and {secret_path}")
            print(f"{name}: public key {pair.public}")
            if args.authorize is not None:
                print(f"{name}: authorized in {_authorize(args.authorize, name, pair.public, force=args.force)}")
    except KeyFileError as exc:
        print(f"zchat-keygen: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"zchat-keygen: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
