"""The persistent KV caches of stateless sessions, kept in this process between turns.

A stateless model's session state in the store is its history (token ids). Its KV cache is far
bigger (tens of KB per token) and is not shipped to the store; a server keeps the caches of the
sessions it served last, and a turn uses one only if it was made from exactly the history the store
holds now. Otherwise (another replica answered, the session was reset or replaced, the cache was
evicted) the turn re-reads the history: slower, never wrong.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from rxt.session import Session


class KVCacheKeeper:
    """Least-recently-used caches of at most ``capacity`` sessions (0 keeps none)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[torch.Tensor, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def attach(self, session: Session) -> bool:
        """Give the session its kept cache if that cache was made from its current history."""
        with self._lock:
            entry = self._entries.pop(session.id, None)  # taken: a turn that fails leaves nothing stale
        if entry is None or not torch.equal(entry[0], session.tensors["history"]):
            return False
        session.runtime = entry[1]
        return True

    def keep(self, session: Session) -> None:
        """After a completed turn: keep the session's cache with the history it now matches."""
        if self.capacity < 1 or not session.runtime:
            return
        with self._lock:
            self._entries[session.id] = (session.tensors["history"].clone(), session.runtime)
            self._entries.move_to_end(session.id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
