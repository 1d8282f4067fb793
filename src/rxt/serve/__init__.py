"""Serving RxT: an OpenAI-compatible HTTP API whose sessions keep their memory in a shared store.

    app.py          routes, error handling, `rxt serve`
    service.py      one turn on the server: lock, load, answer, remember, write back
    store.py        the session store interface and its SQLite implementation
    redis_store.py  the Redis implementation (several replicas)
    locks.py        per-session leases
    schemas.py      request parsing and response objects
    auth.py         bearer keys and session ownership
    metrics.py      Prometheus text-format metrics
    launch.py       start a server process and wait until it answers (benchmarks, tests)
"""
