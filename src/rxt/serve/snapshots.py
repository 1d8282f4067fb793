"""Per-turn memory snapshots for the Responses API, kept in the session store next to the sessions.

A response names the memory its turn produced: ``resp_{session id}_{12 hex}``. Its snapshot is a
store record under that id holding the session's state after the turn (for RxT the STM, 64 KiB for
the nano model), so a later response may continue from any kept one: branch the conversation, or
answer a turn again. Snapshots belong to the same key as their session, under an owner mark of
their own, so they never count as sessions against --max-sessions-per-key. An index record per
session lists its snapshots oldest first; beyond ``retention`` the oldest is deleted.
"""

from __future__ import annotations

import json
import secrets

from rxt.serve.schemas import SESSION_ID_PATTERN
from rxt.serve.store import SessionStore, VersionConflict

PREFIX = "resp_"


def response_id(session_id: str) -> str:
    return f"{PREFIX}{session_id}_{secrets.token_hex(6)}"


def session_of(response_id_: str) -> str | None:
    """The session a response id names, or None if it is not one this server makes."""
    if not response_id_.startswith(PREFIX):
        return None
    session_id, sep, suffix = response_id_[len(PREFIX):].rpartition("_")
    if not sep or len(suffix) != 12 or not SESSION_ID_PATTERN.match(session_id):
        return None
    return session_id


def snapshot_owner(owner: str) -> str:
    return f"response:{owner}"


class Snapshots:
    """Blocking, like the store: the server calls these in threads, holding the session's lock."""

    def __init__(self, store: SessionStore, retention: int):
        self.store, self.retention = store, retention

    @staticmethod
    def _index(session_id: str) -> str:
        return f"responses_{session_id}"

    def get(self, response_id_: str, owner: str) -> bytes | None:
        stored = self.store.get(response_id_)
        if stored is None or stored.owner != snapshot_owner(owner):
            return None
        return stored.state

    def add(self, session_id: str, response_id_: str, owner: str, state: bytes) -> None:
        """Keep the snapshot; delete the oldest of the session's beyond the retention limit."""
        if self.retention < 1:
            return
        self.store.put(response_id_, snapshot_owner(owner), state, 0)
        for _ in range(10):  # the session lock is held; a conflict means a lease expired meanwhile
            stored = self.store.get(self._index(session_id))
            kept = json.loads(stored.state) if stored else []
            kept.append(response_id_)
            dropped, kept = kept[:-self.retention], kept[-self.retention:]
            try:
                self.store.put(self._index(session_id), snapshot_owner(owner), json.dumps(kept).encode(),
                               stored.version if stored else 0)
            except VersionConflict:
                continue
            for old in dropped:
                self.store.delete(old)
            return

    def delete_all(self, session_id: str) -> None:
        stored = self.store.get(self._index(session_id))
        for old in json.loads(stored.state) if stored else []:
            self.store.delete(old)
        self.store.delete(self._index(session_id))
