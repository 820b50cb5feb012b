"""One atomic write of several SQLite statements, for the centre's stores."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


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
