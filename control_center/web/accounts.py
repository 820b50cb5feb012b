"""The console's operator accounts and their server-side sessions (docs/CONSOLE-API.md).

Accounts live in the centre's store file (its SQLite, WAL), in tables of their own
(`console_users`, `console_sessions`), so every centre instance sharing the store knows the same
people, and `sos-center user disable` ends a session on all of them at once.

What is stored: a password only as its argon2id hash, a session token only as its SHA-256 (a
copy of the file lets nobody log in or take over a session). The CSRF token is stored as it is:
the console hands it back to the page (`/api/me`), and it is worth nothing without the session.

Time comes in as `now` (epoch seconds) or from the `clock` given to Accounts, never from the
wall clock inside the logic, so expiry can be tested to the second.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from control_center.shared_sqlite import SharedTables

ROLES = ("operator", "supervisor", "auditor")
# Exactly the table in docs/CONSOLE-API.md, "Accounts, roles and rights".
RIGHTS: dict[str, frozenset[str]] = {
    "operator": frozenset({"view", "act", "evidence"}),
    "supervisor": frozenset({"view", "act", "takeover", "evidence", "export"}),
    "auditor": frozenset({"view", "evidence", "export"}),
}
USERNAME = re.compile(r"[a-z][a-z0-9._-]{1,31}")  # matched whole (fullmatch): no trailing "\n"
MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # argon2 takes any length; this only stops a megabyte "password" in a POST
IDLE_S = 12 * 3600.0  # a session unused this long ends (a shift, with its breaks)
MAX_AGE_S = 24 * 3600.0  # and none outlives this, however busy: log in once a day
# Recording every request's time would be a write per API call into the store every instance
# shares; once a minute is enough for an idle timeout of hours. The price: a session may end up
# to a minute before its idle timeout.
TOUCH_EVERY_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS console_users (
    username      TEXT PRIMARY KEY,
    role          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS console_sessions (
    token_hash  TEXT PRIMARY KEY,
    username    TEXT NOT NULL,
    csrf        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    last_used   REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS console_sessions_by_user ON console_sessions(username);
"""


class AccountError(ValueError):
    """A refused account change (bad name, weak password, unknown or duplicate user, bad role);
    the text is one line that says what to do."""


@dataclass(frozen=True)
class User:
    username: str
    role: str
    disabled: bool
    created_at: float


@dataclass(frozen=True)
class Session:
    """A logged-in operator. `token` goes in the cookie; `expires_at` is when the session ends if
    unused from now on (the idle timeout, capped by its absolute end)."""

    token: str
    username: str
    role: str
    rights: frozenset[str]
    csrf: str
    expires_at: float


def rights_of(role: str) -> frozenset[str]:
    """What a role may do; AccountError for a role that does not exist."""
    check_role(role)
    return RIGHTS[role]


def check_role(role: str) -> None:
    if role not in ROLES:
        raise AccountError(f"role '{role}' does not exist: use one of {', '.join(ROLES)}")


def check_username(username: str) -> None:
    if not (isinstance(username, str) and USERNAME.fullmatch(username)):
        raise AccountError(f"user name '{username}': use 2-32 lower-case letters, digits, '.', "
                           f"'_' or '-', starting with a letter (e.g. alice, j.smith)")


def check_password(password: str) -> None:
    """The one rule is length: a long passphrase beats a short password with symbols in it."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise AccountError(f"password too short: it must be at least {MIN_PASSWORD} characters "
                           f"(a few words make a good one)")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"password too long: at most {MAX_PASSWORD} characters")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Accounts(SharedTables):
    """Console users and sessions in the SQLite file at `path` (the centre's store file).

    `hasher`: argon2-cffi's PasswordHasher, argon2id with the library's defaults unless one is
    given (tests of rehashing give a cheap one); a stored hash made with other parameters is
    replaced at the user's next log-in."""

    def __init__(self, path: str | Path, *, idle_s: float = IDLE_S, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.time,
                 hasher: PasswordHasher | None = None) -> None:
        super().__init__(path, _SCHEMA)
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._hasher = hasher or PasswordHasher()
        self._dummy_hash: str | None = None  # made at the first log-in (see _dummy)


    # -- users -----------------------------------------------------------------------------------
    def add(self, username: str, role: str, password: str) -> User:
        """Create an enabled user; AccountError if the name, role or password is refused or the
        name is taken."""
        check_username(username)
        check_role(role)
        check_password(password)
        password_hash = self._hasher.hash(password)  # slow on purpose: outside the lock
        now = self._clock()
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO console_users(username, role, password_hash, disabled, "
                "created_at, updated_at) VALUES (?,?,?,0,?,?)",
                (username, role, password_hash, now, now))
        if cur.rowcount != 1:
            raise AccountError(f"user '{username}' already exists (change the password: "
                               f"sos-center user passwd {username})")
        return User(username, role, False, now)

    def user(self, username: str) -> User | None:
        """The user by that name, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT username, role, disabled, created_at FROM console_users "
                "WHERE username = ?", (username,)).fetchone()
        return None if row is None else User(row[0], row[1], bool(row[2]), row[3])

    def list(self) -> list[User]:
        """Every user, by name."""
        with self._lock:
            rows = self._db.execute("SELECT username, role, disabled, created_at FROM "
                                    "console_users ORDER BY username").fetchall()
        return [User(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def set_password(self, username: str, password: str) -> int:
        """Replace the password and end the user's sessions (whoever knew the old one is out);
        returns how many sessions ended."""
        check_password(password)
        self.known(username)
        password_hash = self._hasher.hash(password)
        with self._lock, self._transaction():
            cur = self._db.execute(
                "UPDATE console_users SET password_hash = ?, updated_at = ? WHERE username = ?",
                (password_hash, self._clock(), username))
            if cur.rowcount != 1:  # removed meanwhile, by hand
                raise AccountError(f"no user '{username}' (see: sos-center user list)")
            return self._end_sessions(username)

    def disable(self, username: str) -> int:
        """Refuse the user's log-ins and end their sessions at once; returns how many ended."""
        with self._lock, self._transaction():
            self._set_disabled(username, True)
            return self._end_sessions(username)

    def enable(self, username: str) -> None:
        """Let a disabled user log in again (with the password they had)."""
        with self._lock:
            self._set_disabled(username, False)

    def known(self, username: str) -> None:
        """AccountError unless `username` is a user."""
        if self.user(username) is None:
            raise AccountError(f"no user '{username}' (see: sos-center user list)")

    def _set_disabled(self, username: str, disabled: bool) -> None:
        cur = self._db.execute(
            "UPDATE console_users SET disabled = ?, updated_at = ? WHERE username = ?",
            (int(disabled), self._clock(), username))
        if cur.rowcount != 1:
            raise AccountError(f"no user '{username}' (see: sos-center user list)")

    def _end_sessions(self, username: str) -> int:
        return self._db.execute("DELETE FROM console_sessions WHERE username = ?",
                                (username,)).rowcount

    # -- sessions --------------------------------------------------------------------------------
    def login(self, username: str, password: str, now: float | None = None) -> Session | None:
        """A new session, or None for an unknown name, a wrong password or a disabled user (the
        console answers all three alike). Each takes one argon2 verification, so the time does
        not tell them apart either."""
        now = self._clock() if now is None else now
        dummy = self._dummy()
        if not (isinstance(username, str) and isinstance(password, str)):
            return None
        usable = USERNAME.fullmatch(username) is not None and len(password) <= MAX_PASSWORD
        for _ in range(3):  # the hash changed between reading and writing: verify the new one
            row = self._credentials(username) if usable else None
            stored = row[1] if row is not None else dummy
            if not self._verify(stored, password if usable else "") or row is None:
                return None
            role, password_hash, disabled = row
            if disabled:
                return None
            fresh = (self._hasher.hash(password)
                     if self._hasher.check_needs_rehash(password_hash) else None)
            token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            expires_at = now + self.max_age_s
            with self._lock, self._transaction():
                # Argon2 ran outside the lock and any transaction (other instances write alerts
                # to this file): make sure the password and the account are as we checked them.
                if self._credentials_locked(username) != row:
                    continue
                if fresh is not None:
                    self._db.execute("UPDATE console_users SET password_hash = ? "
                                     "WHERE username = ?", (fresh, username))
                self._db.execute("DELETE FROM console_sessions WHERE expires_at <= ? OR "
                                 "last_used <= ?", (now, now - self.idle_s))
                self._db.execute(
                    "INSERT INTO console_sessions(token_hash, username, csrf, created_at, "
                    "last_used, expires_at) VALUES (?,?,?,?,?,?)",
                    (_token_hash(token), username, csrf, now, now, expires_at))
            return Session(token, username, role, RIGHTS[role], csrf,
                           min(now + self.idle_s, expires_at))
        return None

    def session(self, token: str | None, now: float | None = None) -> Session | None:
        """The session this cookie value names, or None if unknown, expired (idle or past its
        absolute end) or its user is disabled. Records its use at most once a minute."""
        if not isinstance(token, str) or not token or len(token) > 256:
            return None
        now = self._clock() if now is None else now
        key = _token_hash(token)
        with self._lock:
            row = self._db.execute(
                "SELECT s.username, s.csrf, s.last_used, s.expires_at, u.role, u.disabled "
                "FROM console_sessions s JOIN console_users u ON u.username = s.username "
                "WHERE s.token_hash = ?", (key,)).fetchone()
            if row is None:
                return None
            username, csrf, last_used, expires_at, role, disabled = row
            if disabled or role not in RIGHTS:
                return None
            if now >= expires_at or now - last_used >= self.idle_s:
                self._db.execute("DELETE FROM console_sessions WHERE token_hash = ?", (key,))
                return None
            if now - last_used >= TOUCH_EVERY_S:
                self._db.execute("UPDATE console_sessions SET last_used = ? WHERE token_hash = ?",
                                 (now, key))
                last_used = now
        return Session(token, username, role, RIGHTS[role], csrf,
                       min(last_used + self.idle_s, expires_at))

    def logout(self, token: str | None) -> None:
        """End this session (unknown or already ended: nothing to do)."""
        if not isinstance(token, str) or not token:
            return
        with self._lock:
            self._db.execute("DELETE FROM console_sessions WHERE token_hash = ?",
                             (_token_hash(token),))

    @staticmethod
    def check_csrf(session: Session, presented: str | None) -> bool:
        """Whether the request's X-CSRF-Token is this session's (in constant time)."""
        if not isinstance(presented, str) or not presented:
            return False
        return hmac.compare_digest(session.csrf.encode("utf-8"), presented.encode("utf-8"))

    # -- internals -------------------------------------------------------------------------------
    def _credentials(self, username: str) -> tuple[str, str, int] | None:
        with self._lock:
            return self._credentials_locked(username)

    def _credentials_locked(self, username: str) -> tuple[str, str, int] | None:
        row = self._db.execute("SELECT role, password_hash, disabled FROM console_users "
                               "WHERE username = ?", (username,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def _dummy(self) -> str:
        """A hash verified when the name is unknown, so that answer takes as long as a wrong
        password for a real user: log-in timing must not tell which names exist. Made at the
        first log-in of any name (so that one is slower whoever logs in), not at start: the
        `sos-center user` commands never need it."""
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
