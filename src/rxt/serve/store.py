"""Where sessions live between turns: their state bytes, the key that owns them, and a version.

    open_store("sqlite:///sessions.db")      embedded, one host (several processes may share the file)
    open_store("sqlite:///:memory:")         one process, for tests
    open_store("redis://127.0.0.1:6379/0")   shared by several replicas (see rxt.serve.redis_store)

Every write replaces owner + state + version in one atomic step, so a crash leaves the old record
or the new one, never a mix. ``put(..., expected_version=n)`` is a compare-and-set: it fails with
VersionConflict if someone else wrote in between, which fences off a writer whose lock expired.
Locks are leases (token + expiry) that serialise the turns of one session across processes.
A store that cannot be reached raises StoreUnavailable; the server answers 503 and tries again
on the next request.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or did not answer; the request may be retried later."""


class VersionConflict(RuntimeError):
    """A compare-and-set write found a different version than the one it expected."""


class StoredSession(NamedTuple):
    owner: str  # fingerprint of the API key that created the session ("" when auth is off)
    state: bytes  # Session.to_bytes(): safetensors with the model identity in its header
    version: int  # 1 after the first write, +1 per write
    updated: float = 0.0  # time.time() of the last write (idle expiry)


class SessionStore(ABC):
    """The interface the server needs. Implementations are blocking; the server calls them in threads."""

    url: str

    @abstractmethod
    def get(self, session_id: str) -> StoredSession | None: ...

    @abstractmethod
    def put(self, session_id: str, owner: str, state: bytes, expected_version: int | None = None) -> int:
        """Write owner and state atomically; return the new version.

        expected_version: None writes whatever is there; 0 writes only a new session; n > 0 writes
        only if the stored version is still n (else VersionConflict).
        """

    @abstractmethod
    def delete(self, session_id: str) -> bool:
        """Remove a session; False if there was none."""

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def count_owned(self, owner: str, since: float = 0.0) -> int:
        """Sessions of this owner written at or after ``since`` (time.time())."""

    @abstractmethod
    def delete_idle(self, before: float) -> int:
        """Delete the sessions last written before ``before`` (time.time()); return how many."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    @abstractmethod
    def acquire_lock(self, name: str, token: str, ttl_s: float) -> bool:
        """Take the lease ``name`` for ``ttl_s`` seconds unless another token holds it."""

    @abstractmethod
    def refresh_lock(self, name: str, token: str, ttl_s: float) -> bool:
        """Extend a lease this token holds; False if it was lost (expired and taken)."""

    @abstractmethod
    def release_lock(self, name: str, token: str) -> None:
        """Give the lease back if this token still holds it."""

    @abstractmethod
    def close(self) -> None: ...


def open_store(url: str) -> SessionStore:
    if url.startswith("sqlite://"):
        return SQLiteStore(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from rxt.serve.redis_store import RedisStore

        return RedisStore(url)
    raise ValueError(f"unknown store URL {url!r}: use sqlite:///path.db, sqlite:///:memory: or redis://host:port/db")


def sqlite_path(url: str) -> str:
    """sqlite:///relative.db, sqlite:////absolute.db, sqlite:///:memory: (the SQLAlchemy convention)."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"a SQLite store URL looks like sqlite:///path.db, got {url!r}")
    path = url.removeprefix("sqlite:///")
    if not path:
        raise ValueError(f"no database path in {url!r}")
    return path


class SQLiteStore(SessionStore):
    """One table row per session (WAL journal). All calls share one connection behind a lock."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS sessions (
            id TEXT PRIMARY KEY, owner TEXT NOT NULL, state BLOB NOT NULL,
            version INTEGER NOT NULL, updated REAL NOT NULL);
        CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner, updated);
        CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated);
        CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, token TEXT NOT NULL, expires REAL NOT NULL);
    """

    def __init__(self, url: str, timeout_s: float = 5.0):
        self.url, self.path, self.timeout_s = url, sqlite_path(url), timeout_s
        self._connection: sqlite3.Connection | None = None
        self._mutex = threading.Lock()
        if self.path != ":memory:":
            with contextlib.suppress(OSError):  # if this fails, connecting says why (as StoreUnavailable)
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                                         check_same_thread=False)
            if self.path != ":memory:":
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")  # a committed turn survives a power cut too
            connection.executescript(self.SCHEMA)
            self._connection = connection
        return self._connection

    def _run(self, work, write: bool = True):
        """Run ``work(connection)`` in one transaction; map database failures to StoreUnavailable.

        Writes start IMMEDIATE (take the write lock first), so a read-check-write is never interleaved.
        """
        with self._mutex:
            try:
                connection = self._connect()
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = work(connection)
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
                return result
            except sqlite3.Error as error:
                if self.path != ":memory:" and self._connection is not None:  # reconnect next time
                    self._connection.close()
                    self._connection = None
                raise StoreUnavailable(f"SQLite store {self.path}: {error}") from error

    def get(self, session_id: str) -> StoredSession | None:
        row = self._run(lambda c: c.execute(
            "SELECT owner, state, version, updated FROM sessions WHERE id = ?", (session_id,)).fetchone(), write=False)
        return StoredSession(row[0], bytes(row[1]), row[2], row[3]) if row else None

    def put(self, session_id: str, owner: str, state: bytes, expected_version: int | None = None) -> int:
        def write(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT version FROM sessions WHERE id = ?", (session_id,)).fetchone()
            current = row[0] if row else 0
            if expected_version is not None and current != expected_version:
                raise VersionConflict(f"session {session_id}: version {current}, expected {expected_version}")
            c.execute("INSERT OR REPLACE INTO sessions (id, owner, state, version, updated) VALUES (?, ?, ?, ?, ?)",
                      (session_id, owner, state, current + 1, time.time()))
            return current + 1

        return self._run(write)

    def delete(self, session_id: str) -> bool:
        return self._run(lambda c: c.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0)

    def count(self) -> int:
        return self._run(lambda c: c.execute("SELECT COUNT(*) FROM sessions").fetchone()[0], write=False)

    def count_owned(self, owner: str, since: float = 0.0) -> int:
        return self._run(lambda c: c.execute("SELECT COUNT(*) FROM sessions WHERE owner = ? AND updated >= ?",
                                             (owner, since)).fetchone()[0], write=False)

    def delete_idle(self, before: float) -> int:
        return self._run(lambda c: c.execute("DELETE FROM sessions WHERE updated < ?", (before,)).rowcount)

    def ping(self) -> None:
        self._run(lambda c: c.execute("SELECT 1").fetchone(), write=False)

    def acquire_lock(self, name: str, token: str, ttl_s: float) -> bool:
        def take(c: sqlite3.Connection) -> bool:
            now = time.time()
            c.execute("DELETE FROM locks WHERE name = ? AND expires < ?", (name, now))
            return c.execute("INSERT OR IGNORE INTO locks (name, token, expires) VALUES (?, ?, ?)",
                             (name, token, now + ttl_s)).rowcount > 0

        return self._run(take)

    def refresh_lock(self, name: str, token: str, ttl_s: float) -> bool:
        return self._run(lambda c: c.execute("UPDATE locks SET expires = ? WHERE name = ? AND token = ?",
                                             (time.time() + ttl_s, name, token)).rowcount > 0)

    def release_lock(self, name: str, token: str) -> None:
        self._run(lambda c: c.execute("DELETE FROM locks WHERE name = ? AND token = ?", (name, token)))

    def close(self) -> None:
        with self._mutex:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
