"""The session stores (SQLite and a real Redis) honour one contract: atomic writes, compare-and-set, leases."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from rxt.serve.launch import free_port
from rxt.serve.redis_store import RedisStore, split_prefix
from rxt.serve.snapshots import Snapshots, snapshot_owner
from rxt.serve.store import SQLiteStore, StoreUnavailable, VersionConflict, open_store, sqlite_path
from test_serve_support import RedisProcess, redis_server_binary


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed and could not be installed")
    server = RedisProcess(binary, tmp_path_factory.mktemp("store-redis")).start()
    yield server
    server.kill()


@pytest.fixture(params=["sqlite-memory", "sqlite-file", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite-memory":
        store = open_store("sqlite:///:memory:")
    elif request.param == "sqlite-file":
        store = open_store(f"sqlite:///{tmp_path / 'db' / 'sessions.db'}")
    else:
        server = request.getfixturevalue("redis_server")
        store = open_store(f"{server.url}?prefix=test-{tmp_path.name}:")  # a fresh key space per test
    yield store
    store.close()


def test_put_get_delete_count(store):
    assert store.get("s1") is None and store.count() == 0
    assert store.put("s1", "owner-a", b"state-1") == 1
    assert store.put("s1", "owner-a", b"state-2") == 2
    assert store.put("s2", "owner-b", b"\x00\xff binary") == 1
    assert tuple(store.get("s1"))[:3] == ("owner-a", b"state-2", 2)
    assert abs(store.get("s1").updated - time.time()) < 60
    assert store.get("s2").state == b"\x00\xff binary" and store.count() == 2
    assert store.delete("s1") is True and store.delete("s1") is False
    assert store.get("s1") is None and store.count() == 1
    store.ping()


def test_sessions_per_owner_and_idle_expiry(store):
    for name in ("a1", "a2", "a3"):
        store.put(name, "owner-a", b"state")
    store.put("b1", "owner-b", b"state")
    assert (store.count_owned("owner-a"), store.count_owned("owner-b"), store.count_owned("nobody")) == (3, 1, 0)
    assert store.count_owned("owner-a", since=time.time() + 60) == 0  # none written in the future
    assert store.delete("a1") and store.count_owned("owner-a") == 2
    time.sleep(0.05)
    cutoff = time.time()
    store.put("a2", "owner-a", b"written again")  # a2 was used after the cutoff: it stays
    assert store.count_owned("owner-a", since=cutoff) == 1
    assert store.delete_idle(before=cutoff) == 2  # a3 and b1
    assert store.get("a3") is None and store.get("b1") is None and store.get("a2").state == b"written again"
    assert store.count() == 1 and store.count_owned("owner-a") == 1 and store.count_owned("owner-b") == 0


def test_compare_and_set(store):
    assert store.put("s", "o", b"v1", expected_version=0) == 1
    with pytest.raises(VersionConflict):
        store.put("s", "o", b"again", expected_version=0)  # create only if absent
    assert store.put("s", "o", b"v2", expected_version=1) == 2
    with pytest.raises(VersionConflict):
        store.put("s", "o", b"stale", expected_version=1)  # someone wrote in between
    assert store.get("s").state == b"v2"


def test_concurrent_read_modify_write_loses_nothing(store):
    store.put("counter", "o", b"0")

    def increment(_: int) -> int:
        conflicts = 0
        while True:
            current = store.get("counter")
            try:
                store.put("counter", "o", str(int(current.state) + 1).encode(), expected_version=current.version)
                return conflicts
            except VersionConflict:
                conflicts += 1

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(increment, range(40)))
    assert store.get("counter").state == b"40" and store.get("counter").version == 41


def test_leases(store):
    assert store.acquire_lock("s", "token-a", ttl_s=5)
    assert not store.acquire_lock("s", "token-b", ttl_s=5)
    assert not store.refresh_lock("s", "token-b", ttl_s=5)
    store.release_lock("s", "token-b")  # not the holder: no effect
    assert not store.acquire_lock("s", "token-b", ttl_s=5)
    assert store.refresh_lock("s", "token-a", ttl_s=5)
    store.release_lock("s", "token-a")
    assert store.acquire_lock("s", "token-b", ttl_s=0.2)
    time.sleep(0.35)  # a holder that died: its lease expires
    assert store.acquire_lock("s", "token-c", ttl_s=5)
    assert not store.refresh_lock("s", "token-b", ttl_s=5)


def test_response_snapshots_keep_memory_and_object_evict_and_delete(store):
    snapshots = Snapshots(store, retention=2)
    ids = [f"resp_s_{i:012d}" for i in range(3)]
    for i, id_ in enumerate(ids):  # a text with a newline and non-ASCII: the record's JSON line holds it
        snapshots.add("s", id_, "owner-a", f"state-{i}\n".encode(), {"id": id_, "text": f"line\nzwei {i} é"})
    assert snapshots.get(ids[0], "owner-a") is None and snapshots.response(ids[0], "owner-a") is None  # evicted
    assert snapshots.get(ids[1], "owner-a") == b"state-1\n"
    assert snapshots.response(ids[2], "owner-a") == {"id": ids[2], "text": "line\nzwei 2 é"}
    assert snapshots.get(ids[1], "owner-b") is None and snapshots.response(ids[1], "owner-b") is None
    assert not snapshots.delete("s", ids[1], "owner-b") and snapshots.get(ids[1], "owner-a") == b"state-1\n"
    assert snapshots.delete("s", ids[1], "owner-a") and not snapshots.delete("s", ids[1], "owner-a")
    assert snapshots.get(ids[1], "owner-a") is None and snapshots.get(ids[2], "owner-a") == b"state-2\n"
    snapshots.add("s", "resp_s_new", "owner-a", b"state-new", {})  # the deleted one no longer takes a place
    assert snapshots.get(ids[2], "owner-a") == b"state-2\n" and store.count() == 3  # 2 snapshots, the index
    store.put("resp_s_old", snapshot_owner("owner-a"), b"raw state")  # kept before response objects were
    assert snapshots.get("resp_s_old", "owner-a") == b"raw state" and snapshots.response("resp_s_old", "owner-a") is None
    snapshots.delete_all("s")
    assert store.count() == 1  # the old-format record was never in the index


def test_two_sqlite_handles_on_one_file_share_sessions_and_locks(tmp_path):
    """Two processes on one host may share a SQLite file."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = SQLiteStore(url), SQLiteStore(url)
    a.put("s", "o", b"from a")
    assert b.get("s").state == b"from a"
    assert a.acquire_lock("s", "ta", 5) and not b.acquire_lock("s", "tb", 5)
    with pytest.raises(VersionConflict):
        b.put("s", "o", b"stale", expected_version=0)
    a.close(), b.close()


def test_unreachable_stores_raise_store_unavailable(tmp_path):
    (tmp_path / "a-file").write_text("")
    sqlite = SQLiteStore(f"sqlite:///{tmp_path / 'a-file' / 'sessions.db'}")  # parent is not a directory
    with pytest.raises(StoreUnavailable, match="SQLite"):
        sqlite.get("s")
    redis_store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    start = time.monotonic()
    for call in (redis_store.ping, lambda: redis_store.get("s"), lambda: redis_store.put("s", "o", b"x"),
                 lambda: redis_store.acquire_lock("s", "t", 1)):
        with pytest.raises(StoreUnavailable, match="Redis"):
            call()
    assert time.monotonic() - start < 10


def test_store_urls():
    assert sqlite_path("sqlite:///rel/s.db") == "rel/s.db"
    assert sqlite_path("sqlite:////abs/s.db") == "/abs/s.db"
    assert sqlite_path("sqlite:///:memory:") == ":memory:"
    assert split_prefix("redis://h:1/0?prefix=app:&socket_timeout=2") == ("redis://h:1/0?socket_timeout=2", "app:")
    assert split_prefix("redis://h:1/0")[1] == "rxt:"
    for bad in ("postgres://x", "sqlite://", "sessions.db"):
        with pytest.raises(ValueError):
            open_store(bad)
