"""The centre's SQLite file as its instances and components share it (the store, the console's
accounts): how it is opened, and one atomic write of several statements."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Self


def connect_shared(path: Path) -> sqlite3.Connection:
    """WAL (readers never wait for the writer), synchronous=FULL (a commit survives power
    loss), autocommit (transactions are explicit), usable from any thread under the caller's
    own lock, and a 10 s wait for another instance's write lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


@contextlib.contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (the write lock at once: no upgrade deadlock between instances), COMMIT,
    or ROLLBACK on any exception. For a connection opened with `isolation_level=None`; the
    caller holds its own lock around it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SharedTables:
    """A component with tables of its own in the centre's shared file (the console's accounts,
    the escalation log, the webhook outbox): its connection, opened as `connect_shared` does,
    with `schema` (CREATE ... IF NOT EXISTS) run on it, a lock around its use, and close."""

    def __init__(self, path: str | Path, schema: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = connect_shared(self.path)
        self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        """One atomic write of several statements (the caller holds the lock)."""
        return immediate_transaction(self._db)
