"""The session store for several replicas: one Redis hash per session.

    {prefix}session:{id}   hash: owner, state, version, updated    (written in one MULTI/EXEC)
    {prefix}sessions       set of session ids                      (for count and idle expiry)
    {prefix}owner:{owner}  set of the session ids of one key          (for the per-key limit)
    {prefix}lock:{name}    lease: SET NX PX with a random token; refreshed and released only by that token

Compare-and-set writes and token checks use WATCH: the transaction fails if the key changed
between the read and EXEC. Connection errors become StoreUnavailable; the client reconnects by
itself on the next call, so the server recovers when Redis is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, WatchError
from redis.retry import Retry

from rxt.serve.store import SessionStore, StoredSession, StoreUnavailable, VersionConflict

DEFAULT_PREFIX = "rxt:"


def split_prefix(url: str) -> tuple[str, str]:
    """Take our own ``prefix=`` query option out of a Redis URL (the client would refuse it)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    prefix = next((v for k, v in query if k == "prefix"), DEFAULT_PREFIX)
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisStore(SessionStore):
    def __init__(self, url: str, connect_timeout_s: float = 1.0, timeout_s: float = 5.0):
        self.url = url
        client_url, self.prefix = split_prefix(url)
        self.client = redis.Redis.from_url(
            client_url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            health_check_interval=10,
        )

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _call(self, work: Callable[[], object]):
        try:
            return work()
        except (VersionConflict, WatchError):
            raise
        except (RedisError, OSError) as error:
            raise StoreUnavailable(f"Redis store {self.client.connection_pool.connection_kwargs.get('host')}: "
                                   f"{type(error).__name__}: {error}") from error

    def get(self, session_id: str) -> StoredSession | None:
        owner, state, version, updated = self._call(
            lambda: self.client.hmget(self._key(session_id), "owner", "state", "version", "updated"))
        if owner is None or state is None or version is None:
            return None
        return StoredSession(owner.decode(), bytes(state), int(version), float(updated or 0))

    def put(self, session_id: str, owner: str, state: bytes, expected_version: int | None = None) -> int:
        key = self._key(session_id)

        def write() -> int:
            with self.client.pipeline() as pipe:
                for _ in range(20):  # an unconditional write retries when another writer got in between
                    try:
                        pipe.watch(key)
                        current = int(pipe.hget(key, "version") or 0)
                        if expected_version is not None and current != expected_version:
                            raise VersionConflict(f"session {session_id}: version {current}, expected {expected_version}")
                        pipe.multi()
                        pipe.hset(key, mapping={"owner": owner, "state": state, "version": current + 1,
                                                "updated": time.time()})
                        pipe.sadd(f"{self.prefix}sessions", session_id)
                        pipe.sadd(self._owner_key(owner), session_id)
                        pipe.execute()
                        return current + 1
                    except WatchError:
                        if expected_version is not None:
                            raise VersionConflict(f"session {session_id} changed during the write") from None
                raise VersionConflict(f"session {session_id}: too many concurrent writers")

        return self._call(write)

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    def delete(self, session_id: str) -> bool:
        def remove() -> bool:
            owner = self.client.hget(self._key(session_id), "owner")
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(session_id))
                pipe.srem(f"{self.prefix}sessions", session_id)
                if owner is not None:
                    pipe.srem(self._owner_key(owner.decode()), session_id)
                deleted = pipe.execute()[0]
            return deleted > 0

        return self._call(remove)

    def count(self) -> int:
        return int(self._call(lambda: self.client.scard(f"{self.prefix}sessions")))

    def count_owned(self, owner: str, since: float = 0.0) -> int:
        def count() -> int:
            ids = list(self.client.smembers(self._owner_key(owner)))
            with self.client.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.hget(self._key(session_id.decode()), "updated")
                updated = pipe.execute()
            return sum(1 for u in updated if u is not None and float(u) >= since)

        return int(self._call(count))

    def delete_idle(self, before: float) -> int:
        def sweep() -> int:
            deleted = 0
            for session_id in self.client.sscan_iter(f"{self.prefix}sessions", count=500):
                updated = self.client.hget(self._key(session_id.decode()), "updated")
                if updated is None or float(updated) < before:
                    deleted += self.delete(session_id.decode())
                    if updated is None:  # written by nobody: only the index entry was left
                        self.client.srem(f"{self.prefix}sessions", session_id)
            return deleted

        return int(self._call(sweep))

    def ping(self) -> None:
        self._call(self.client.ping)

    def acquire_lock(self, name: str, token: str, ttl_s: float) -> bool:
        key = f"{self.prefix}lock:{name}"
        return bool(self._call(lambda: self.client.set(key, token, nx=True, px=max(1, int(ttl_s * 1000)))))

    def refresh_lock(self, name: str, token: str, ttl_s: float) -> bool:
        return self._if_holder(name, token, lambda pipe, key: pipe.pexpire(key, max(1, int(ttl_s * 1000))))

    def release_lock(self, name: str, token: str) -> None:
        self._if_holder(name, token, lambda pipe, key: pipe.delete(key))

    def _if_holder(self, name: str, token: str, action) -> bool:
        """Run ``action`` on the lock key in a transaction, only while ``token`` holds it."""
        key = f"{self.prefix}lock:{name}"

        def run() -> bool:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    if pipe.get(key) != token.encode():
                        return False
                    pipe.multi()
                    action(pipe, key)
                    pipe.execute()
                    return True
                except WatchError:
                    return False

        return self._call(run)

    def close(self) -> None:
        self.client.close()
