"""The persistent KV caches of stateless sessions, kept in this process between turns.

A stateless model's session state in the store is its history (token ids). Its KV cache is far
bigger (kilobytes per token) and is not shipped to the store; a server keeps the caches of the
sessions it served last, within a byte budget and a session count, evicting the least recently used,
and a turn uses one only if it was made from exactly the history the store holds now. Otherwise
(another replica answered, the session was reset or replaced, the cache was evicted) the turn
re-reads the history: slower, never wrong. This is what servers with prefix caching do.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, NamedTuple

import torch

from rxt.session import Session


class _Entry(NamedTuple):
    history: torch.Tensor  # the history the cache was made from
    runtime: dict[str, Any]  # the session's runtime: its KV caches
    nbytes: int


class KVCacheKeeper:
    """Least-recently-used caches of at most ``capacity`` sessions (0 keeps none) and ``max_bytes``
    bytes of KV cache (None: no byte budget). A cache bigger than the whole budget is not kept."""

    def __init__(self, capacity: int, max_bytes: int | None = None):
        self.capacity, self.max_bytes = capacity, max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0  # KV cache bytes held now
        self.hits = self.misses = self.evictions = 0

    def attach(self, session: Session) -> bool:
        """Give the session its kept cache if that cache was made from its current history."""
        with self._lock:
            entry = self._entries.pop(session.id, None)  # taken: a turn that fails leaves nothing stale
            if entry is not None:
                self.nbytes -= entry.nbytes
            hit = entry is not None and torch.equal(entry.history, session.tensors["history"])
            self.hits, self.misses = self.hits + hit, self.misses + (not hit)
        if hit:
            session.runtime = entry.runtime
        return hit

    def keep(self, session: Session) -> None:
        """After a completed turn: keep the session's cache with the history it now matches."""
        if self.capacity < 1 or not session.runtime:
            return
        nbytes = sum(cache.nbytes() for cache in session.runtime.get("caches", []))
        if "state" in session.runtime:  # the fast path's preallocated cache (rxt.fast): all of it is held
            nbytes += session.runtime["state"].allocated_bytes()
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(session.id, None)
            self.nbytes += nbytes - (old.nbytes if old else 0)
            self._entries[session.id] = _Entry(session.tensors["history"].clone(), session.runtime, nbytes)
            while len(self._entries) > self.capacity or (self.max_bytes is not None and self.nbytes > self.max_bytes):
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)
