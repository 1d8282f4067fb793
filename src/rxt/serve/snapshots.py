"""Per-turn memory snapshots for the Responses API, kept in the session store next to the sessions.

A response names the memory its turn produced: ``resp_{session id}_{12 hex}``. Its snapshot is a
store record under that id holding the session's state after the turn (for RxT the STM, 64 KiB for
the nano model), so a later response may continue from any kept one: branch the conversation, or
answer a turn again. The record also holds the response object the turn answered with, for
``GET /v1/responses/{id}``: ``rxt-response`` line, the object as one JSON line, then the state (a
record without that first line is a snapshot kept before objects were: its memory still serves
``previous_response_id``). Snapshots belong to the same key as their session, under an owner mark
of their own, so they never count as sessions against --max-sessions-per-key. An index record per
session lists its snapshots oldest first; beyond ``retention`` the oldest is deleted.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from rxt.serve.schemas import SESSION_ID_PATTERN
from rxt.serve.store import SessionStore, VersionConflict

PREFIX = "resp_"
MARK = b"rxt-response\n"  # a safetensors file starts with its header's length: never with these bytes


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

    def _record(self, response_id_: str, owner: str) -> tuple[dict[str, Any] | None, bytes] | None:
        """The kept response object (None in a record from before objects were kept) and the state."""
        stored = self.store.get(response_id_)
        if stored is None or stored.owner != snapshot_owner(owner):
            return None
        if not stored.state.startswith(MARK):
            return None, stored.state
        line, _, state = stored.state[len(MARK):].partition(b"\n")  # JSON escapes newlines in strings
        return json.loads(line), state

    def get(self, response_id_: str, owner: str) -> bytes | None:
        """The memory the response left."""
        record = self._record(response_id_, owner)
        return None if record is None else record[1]

    def response(self, response_id_: str, owner: str) -> dict[str, Any] | None:
        """The response object as its turn answered it."""
        record = self._record(response_id_, owner)
        return None if record is None else record[0]

    def add(self, session_id: str, response_id_: str, owner: str, state: bytes, response: dict[str, Any]) -> None:
        """Keep the snapshot; delete the oldest of the session's beyond the retention limit."""
        if self.retention < 1:
            return
        line = json.dumps(response, ensure_ascii=False).encode()
        self.store.put(response_id_, snapshot_owner(owner), MARK + line + b"\n" + state, 0)
        for old in self._edit_index(session_id, owner, lambda kept: [*kept, response_id_][-self.retention:]):
            self.store.delete(old)

    def delete(self, session_id: str, response_id_: str, owner: str) -> bool:
        """Forget one response: its record, then its place in the index (a crash between leaves only
        an index entry without a record, which the next eviction passes over). False if not kept."""
        if self._record(response_id_, owner) is None:
            return False
        self.store.delete(response_id_)
        self._edit_index(session_id, owner, lambda kept: [k for k in kept if k != response_id_])
        return True

    def _edit_index(self, session_id: str, owner: str, edit: Callable[[list[str]], list[str]]) -> list[str]:
        """Rewrite the session's list of kept responses; return the ids the edit left out."""
        for _ in range(10):  # the session lock is held; a conflict means a lease expired meanwhile
            stored = self.store.get(self._index(session_id))
            kept = json.loads(stored.state) if stored else []
            edited = edit(kept)
            try:
                self.store.put(self._index(session_id), snapshot_owner(owner), json.dumps(edited).encode(),
                               stored.version if stored else 0)
            except VersionConflict:
                continue
            return [k for k in kept if k not in edited]
        return []

    def delete_all(self, session_id: str) -> None:
        stored = self.store.get(self._index(session_id))
        for old in json.loads(stored.state) if stored else []:
            self.store.delete(old)
        self.store.delete(self._index(session_id))
