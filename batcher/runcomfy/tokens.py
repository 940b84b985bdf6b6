"""Which API tokens does a run hold, and how is each account named without its token?

One token comes from ``RUNCOMFY_API_TOKEN``. Several, for several RunComfy
accounts in one run (each with its own limits), come from
``RUNCOMFY_API_TOKENS`` (comma-separated) or from a file named by
``RUNCOMFY_API_TOKEN_FILE`` (one token a line, ``#`` comments; readable by
its owner alone, as ssh insists of its keys: a token file others can read,
or one another user owns, is refused). Tokens never enter the journal, logs or messages: an account
is named by its *fingerprint*, ``HMAC-SHA256(key=FINGERPRINT_KEY,
token)`` cut to 12 hex digits. The key is fixed and public, so the same
token has the same fingerprint on every machine and every run (that is
what lets a resumed run find the account that submitted a job); 48 bits of
a keyed hash say nothing about the token, and a token is far too long to
guess from it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from ..errors import UsageError
from .refusals import TOKEN_ENV

__all__ = [
    "FINGERPRINT_KEY",
    "TOKENS_ENV",
    "TOKEN_FILE_ENV",
    "fingerprint",
    "read_token_file",
    "token_source",
    "tokens_from_env",
]

TOKENS_ENV = "RUNCOMFY_API_TOKENS"
TOKEN_FILE_ENV = "RUNCOMFY_API_TOKEN_FILE"
FINGERPRINT_KEY = b"batcher account fingerprint v1"
"""The HMAC key of fingerprints: fixed and documented, so a fingerprint is the same everywhere."""
_FINGERPRINT_DIGITS = 12
_MAX_TOKENS = 64
_MAX_FILE_BYTES = 64 * 1024


def fingerprint(token: str) -> str:
    """The account's name in the journal, status and messages: 12 hex digits of a keyed hash of its token."""
    return hmac.new(FINGERPRINT_KEY, token.encode(), hashlib.sha256).hexdigest()[:_FINGERPRINT_DIGITS]


def token_source() -> str:
    """The name of the environment variable the run's tokens come from (see `tokens_from_env`), as a
    message about a refused token names it; RUNCOMFY_API_TOKEN when none is set."""
    for name in (TOKEN_FILE_ENV, TOKENS_ENV, TOKEN_ENV):
        if os.environ.get(name, "").strip():
            return name
    return TOKEN_ENV


def tokens_from_env() -> tuple[str, ...]:
    """Every token the environment gives, first one first (the account prices and single calls use).

    ``RUNCOMFY_API_TOKEN_FILE``, else ``RUNCOMFY_API_TOKENS``, else ``RUNCOMFY_API_TOKEN``; setting
    two of them is a UsageError (which one was meant?), as are an empty list and a repeated token.
    """
    path = os.environ.get(TOKEN_FILE_ENV, "").strip()
    listed = os.environ.get(TOKENS_ENV, "").strip()
    single = os.environ.get(TOKEN_ENV, "").strip()
    given = [name for name, value in ((TOKEN_FILE_ENV, path), (TOKENS_ENV, listed), (TOKEN_ENV, single)) if value]
    if len(given) > 1:
        msg = f"{' and '.join(given)} are both set: set only one of them (which tokens were meant?)"
        raise UsageError(msg)
    if path:
        return read_token_file(Path(path))
    if listed:
        return _checked([t.strip() for t in listed.split(",")], TOKENS_ENV)
    if single:
        return _checked([single], TOKEN_ENV)
    msg = (
        f"no API token: set {TOKEN_ENV} (RunComfy profile > API keys), {TOKENS_ENV} (several, comma-separated) "
        f"or {TOKEN_FILE_ENV}, or add --sandbox to rehearse the run locally without one"
    )
    raise UsageError(msg)


def read_token_file(path: Path) -> tuple[str, ...]:
    """The tokens in a token file: one a line, blank lines and ``#`` comments skipped.

    UsageError when it is missing, not a regular file, owned by another user, or readable or writable by
    anyone but its owner.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        msg = f"cannot read the token file {path} ({TOKEN_FILE_ENV}): {exc.strerror or exc}"
        raise UsageError(msg) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            msg = f"the token file {path} ({TOKEN_FILE_ENV}) is not a regular file"
            raise UsageError(msg)
        if info.st_mode & 0o077:
            msg = (
                f"the token file {path} ({TOKEN_FILE_ENV}) is open to others (mode {stat.S_IMODE(info.st_mode):04o}): "
                f"tokens spend money. Run: chmod 600 {path}"
            )
            raise UsageError(msg)
        if info.st_uid != os.geteuid():
            # Another user's file (root reads it all the same; mode 600 does not make it this user's): whoever
            # owns it can change the tokens this run spends, or read them.
            msg = (
                f"the token file {path} ({TOKEN_FILE_ENV}) belongs to another user (uid {info.st_uid}, this "
                f"process runs as uid {os.geteuid()}): keep tokens in a file of your own (chmod 600)"
            )
            raise UsageError(msg)
        data = os.read(fd, _MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        msg = f"the token file {path} is over {_MAX_FILE_BYTES // 1024} KiB: is it the right file?"
        raise UsageError(msg)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        msg = f"the token file {path} is not UTF-8 text"
        raise UsageError(msg) from exc
    lines = [line.strip() for line in text.splitlines()]
    return _checked([line for line in lines if line and not line.startswith("#")], f"the token file {path}")


def _checked(tokens: list[str], source: str) -> tuple[str, ...]:
    if not tokens or any(not t for t in tokens):
        msg = f"{source} holds an empty token: give one or more tokens, comma-separated (no empty ones)"
        raise UsageError(msg)
    # An HTTP header takes visible ASCII only: anything else fails in the client before a byte is sent,
    # where it would look like a submit lost in flight (found by review: every job "uncertain").
    if any(not t.isascii() or any(c.isspace() or not c.isprintable() for c in t) for t in tokens):
        msg = (
            f"{source} holds a token with spaces, control or non-ASCII characters in it: copy it again from "
            "RunComfy (profile > API keys), one token per entry"
        )
        raise UsageError(msg)
    prints = [fingerprint(t) for t in tokens]
    repeated = sorted({p for p in prints if prints.count(p) > 1})
    if repeated:
        msg = f"{source} holds the same token twice (account {', '.join(repeated)}): give each account once"
        raise UsageError(msg)
    if len(tokens) > _MAX_TOKENS:
        msg = f"{source} holds {len(tokens)} tokens; at most {_MAX_TOKENS}"
        raise UsageError(msg)
    return tuple(tokens)
