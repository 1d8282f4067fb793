"""`rxt bench serve`: N concurrent conversations x M turns against an rxt server, streaming.

    rxt bench serve --url http://127.0.0.1:8000 --sessions 16 --turns 8 --max-tokens 32 --json out.json
    rxt bench serve --spawn-model models/nano/rxt --sessions 16 --turns 8     # starts its own server
    rxt bench serve --spawn-model models/nano/rxt --sessions 64 --max-batch 1,16,64  # one server each, back to back

Each conversation runs its turns one after another (a turn needs the memory of the one before);
the conversations run at the same time, one thread each. Time to first token is measured at the
client, to the first chunk that carries answer text; full answer to the [DONE] event.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rxt.bench.timing import describe_machine


@dataclass
class TurnResult:
    session: int
    turn: int
    ok: bool
    first_token_s: float = 0.0
    answer_s: float = 0.0
    tokens: int = 0
    error: str = ""


def message(session: int, turn: int) -> str:
    return f"Turn {turn} of conversation {session}: my favourite number is {session * 7 + turn}. What is yours?"


def stream_turn(connection: http.client.HTTPConnection, body: dict, headers: dict) -> tuple[int, dict, str | None]:
    """POST one streaming turn; return (status, timings and tokens, session id)."""
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    response = connection.getresponse()
    if response.status != 200:
        return response.status, {"error": response.read().decode(errors="replace")[:300]}, None
    first_token_s, tokens = None, 0
    while line := response.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            return 500, {"error": event["error"].get("message", "error in stream")}, None
        if first_token_s is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
            first_token_s = time.perf_counter() - start
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    response.read()  # drain, so the connection can be reused
    answer_s = time.perf_counter() - start
    timings = {"first_token_s": first_token_s or answer_s, "answer_s": answer_s, "tokens": tokens}
    return 200, timings, response.getheader("X-Session-Id")


def run_conversation(url: str, index: int, turns: int, max_tokens: int, api_key: str | None,
                     timeout_s: float) -> list[TurnResult]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    results, session_id = [], None
    try:
        for turn in range(turns):
            body = {"messages": [{"role": "user", "content": message(index, turn)}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            if session_id:
                body["session_id"] = session_id
            try:
                status, timings, returned_id = stream_turn(connection, body, headers)
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
                connection.close()  # reconnects on the next request
                status, timings, returned_id = 0, {"error": f"{type(error).__name__}: {error}"}, None
            if status != 200:
                results.append(TurnResult(index, turn, False, error=f"HTTP {status}: {timings['error']}"))
                if session_id is None:
                    break  # no session to go on with
                continue
            session_id = session_id or returned_id
            results.append(TurnResult(index, turn, True, **timings))
    finally:
        connection.close()
    return results


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_load(url: str, sessions: int, turns: int, max_tokens: int = 32, api_key: str | None = None,
             timeout_s: float = 120.0) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        futures = [pool.submit(run_conversation, url, i, turns, max_tokens, api_key, timeout_s) for i in range(sessions)]
        results = [r for f in futures for r in f.result()]
    wall_s = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    first, answer = [r.first_token_s for r in ok], [r.answer_s for r in ok]
    tokens = sum(r.tokens for r in ok)
    return {
        "url": url, "sessions": sessions, "turns_per_session": turns, "max_tokens": max_tokens,
        "client_machine": describe_machine("cpu"), "wall_s": wall_s,
        "turns_ok": len(ok), "turns_failed": sessions * turns - len(ok),
        "turns_per_s": len(ok) / wall_s, "tokens": tokens, "tokens_per_s": tokens / wall_s,
        "first_token_p50_s": percentile(first, 50), "first_token_p99_s": percentile(first, 99),
        "answer_p50_s": percentile(answer, 50), "answer_p99_s": percentile(answer, 99),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "turn_results": [asdict(r) for r in results],
    }


def format_report(report: dict) -> str:
    ms = 1000.0
    lines = [
        f"rxt bench serve: {report['sessions']} sessions x {report['turns_per_session']} turns, "
        f"max_tokens {report['max_tokens']}, against {report['url']}",
        f"  server: {report.get('server', 'already running')}",
        f"  client: {report['client_machine']}",
        f"  turns             {report['turns_ok']} ok, {report['turns_failed']} failed in {report['wall_s']:.2f} s",
        f"  throughput        {report['turns_per_s']:.2f} turns/s, {report['tokens_per_s']:.1f} tokens/s "
        f"({report['tokens']} tokens)",
        f"  time to 1st token p50 {report['first_token_p50_s'] * ms:8.1f} ms   p99 {report['first_token_p99_s'] * ms:8.1f} ms",
        f"  full answer       p50 {report['answer_p50_s'] * ms:8.1f} ms   p99 {report['answer_p99_s'] * ms:8.1f} ms",
    ]
    lines += [f"  error: {e}" for e in report["errors"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running rxt server")
    parser.add_argument("--spawn-model", metavar="DIR", help="start a server for this model on a free loopback port")
    parser.add_argument("--store", help="store URL for --spawn-model (default: SQLite in a temporary directory)")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--api-key", help="bearer key, if the server wants one")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--max-batch", metavar="N[,N...]",
                        help="with --spawn-model: start the server with --max-batch N, once per value, one after "
                             "another in the same run (e.g. 1,16: one turn at a time vs batched)")
    parser.add_argument("--json", metavar="FILE", help="also write the full report (every turn) as JSON")


def run(args: argparse.Namespace) -> int:
    if args.sessions < 1 or args.turns < 1 or args.max_tokens < 1:
        print("rxt bench serve: --sessions, --turns and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        batches = [int(n) for n in args.max_batch.split(",")] if args.max_batch else [None]
    except ValueError:
        batches = [0]
    if any(n is not None and n < 1 for n in batches) or (args.max_batch and not args.spawn_model):
        print("rxt bench serve: --max-batch takes numbers >= 1, with --spawn-model", file=sys.stderr)
        return 2
    if args.spawn_model:
        reports = [_run_spawned(args, n) for n in batches]
    else:
        reports = [run_load(args.url, args.sessions, args.turns, args.max_tokens, args.api_key, args.timeout_s)]
    print("\n".join(format_report(r) for r in reports))
    if len(reports) > 1:
        print(format_comparison(reports))
    if args.json:
        out = reports[0] if len(reports) == 1 else {"runs": reports}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["turns_ok"] for r in reports) else 1


def format_comparison(reports: list[dict]) -> str:
    """One line per server setting, throughput relative to the first."""
    base = reports[0]["turns_per_s"]
    lines = ["  max_batch  turns/s  vs first  1st token p50 / p99 ms  failed"]
    for r in reports:
        lines.append(f"  {r.get('max_batch') or '-':>9}  {r['turns_per_s']:7.2f}  {r['turns_per_s'] / base:7.1f}x"
                     f"  {r['first_token_p50_s'] * 1000:10.1f} / {r['first_token_p99_s'] * 1000:7.1f}"
                     f"  {r['turns_failed']:6d}")
    return "\n".join(lines)


def _run_spawned(args: argparse.Namespace, max_batch: int | None = None) -> dict:
    from rxt.serve.app import KEYS_ENV
    from rxt.serve.launch import ServerProcess

    with tempfile.TemporaryDirectory(prefix="rxt-bench-serve-") as tmp:
        store = args.store or f"sqlite:///{Path(tmp) / 'sessions.db'}"
        server_args = ["--max-tokens-limit", str(args.max_tokens)]
        if max_batch is not None:
            server_args += ["--max-batch", str(max_batch)]
        env = {KEYS_ENV: args.api_key} if args.api_key else {}  # not on the command line: ps shows that
        with ServerProcess(args.spawn_model, store, args=server_args, env=env,
                           log_path=Path(tmp) / "server.log") as server:
            report = run_load(server.url, args.sessions, args.turns, args.max_tokens, args.api_key, args.timeout_s)
        report["server"] = f"spawned: rxt serve --model {args.spawn_model} --store {store} {' '.join(server_args)}"
        report["max_batch"] = max_batch
        return report
