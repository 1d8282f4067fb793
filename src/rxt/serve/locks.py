"""Per-session mutual exclusion: one turn (answer + memory update + write) at a time per session.

Two layers: an asyncio lock queues the requests of this process without touching the store, then
a lease in the store (token + expiry) keeps other processes out. The lease is refreshed while it is
held, so a slow memory update keeps it; a killed process's lease simply expires after ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

import anyio

from rxt.serve.errors import APIError
from rxt.serve.store import SessionStore

log = logging.getLogger(__name__)


@dataclass
class _LocalLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Lease:
    """A held session lock. ``release`` is safe to call from any task, once or more."""

    def __init__(self, locks: SessionLocks, session_id: str, token: str):
        self.locks, self.session_id, self.token = locks, session_id, token
        self.lost = False  # set if a refresh found the lease gone (then the version check fences the write)
        self._refresher = asyncio.create_task(self._refresh())
        self._released = False

    async def _refresh(self) -> None:
        interval = self.locks.ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await anyio.to_thread.run_sync(self.locks.store.refresh_lock, self.session_id, self.token,
                                                    self.locks.ttl_s)
            except Exception as error:  # the store is down: keep trying, the lease may still be valid
                log.warning("could not refresh the lock of session %s: %s", self.session_id, error)
                continue
            if not ok:
                self.lost = True
                log.error("lost the lock of session %s (expired while held)", self.session_id)
                return

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._refresher.cancel()
        try:
            await anyio.to_thread.run_sync(self.locks.store.release_lock, self.session_id, self.token)
        except Exception as error:  # it expires by itself
            log.warning("could not release the lock of session %s: %s", self.session_id, error)
        finally:
            self.locks._release_local(self.session_id)


class SessionLocks:
    def __init__(self, store: SessionStore, ttl_s: float = 30.0, wait_s: float = 60.0, poll_s: float = 0.05):
        self.store, self.ttl_s, self.wait_s, self.poll_s = store, ttl_s, wait_s, poll_s
        self._local: dict[str, _LocalLock] = {}

    def held(self) -> int:
        """Sessions with a turn (or another locked operation) running or queued in this process."""
        return len(self._local)

    async def acquire(self, session_id: str) -> Lease:
        """Wait up to ``wait_s`` for the session; 409 session_busy if it stays taken."""
        deadline = time.monotonic() + self.wait_s
        local = self._local.setdefault(session_id, _LocalLock())
        local.users += 1
        try:
            await asyncio.wait_for(local.lock.acquire(), timeout=self.wait_s)
        except asyncio.TimeoutError:
            self._forget(session_id)
            raise self._busy(session_id) from None
        except asyncio.CancelledError:
            self._forget(session_id)
            raise
        try:
            token = secrets.token_hex(16)
            while not await anyio.to_thread.run_sync(self.store.acquire_lock, session_id, token, self.ttl_s):
                if time.monotonic() > deadline:
                    raise self._busy(session_id)
                await asyncio.sleep(self.poll_s)
        except BaseException:
            self._release_local(session_id)
            raise
        return Lease(self, session_id, token)

    def _busy(self, session_id: str) -> APIError:
        return APIError(409, f"session {session_id!r} is busy with another request; retry later", "session_busy")

    def _release_local(self, session_id: str) -> None:
        local = self._local.get(session_id)
        if local is not None:
            with contextlib.suppress(RuntimeError):  # not locked: already released
                local.lock.release()
            self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        local = self._local.get(session_id)
        if local is not None:
            local.users -= 1
            if local.users <= 0:
                del self._local[session_id]
