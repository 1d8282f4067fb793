"""`rxt bench serve`: N concurrent conversations x M turns against an rxt server, streaming.

    rxt bench serve --url http://127.0.0.1:8000 --sessions 16 --turns 8 --max-tokens 32 --json out.json
    rxt bench serve --spawn-model models/nano/rxt --sessions 16 --turns 8     # starts its own server
    rxt bench serve --spawn-model models/nano/rxt --sessions 64 --max-batch 1,16,64  # one server each, back to back
    rxt bench serve --spawn-model models/nano/rxt --spawn-model models/nano/baseline --turns 32  # RxT vs stateless

Each conversation runs its turns one after another (a turn needs the memory of the one before),
with ``--think-s`` between them; the conversations run at the same time, one thread each. Time to
first token is measured at the client, to the first chunk that carries answer text; full answer to
the [DONE] event. The server's usage chunk says how many bytes it holds for the session after each
turn (RxT: the STM; a stateless model: its KV cache) and whether a stateless session's history had
to be read again (its KV cache was evicted): those give sessions per GB and the cost of bringing an
evicted session back.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
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
    state_bytes: int = 0  # what the server holds for the session after this turn
    history_reread: bool = False  # a stateless session whose KV cache had been evicted

    @property
    def decode_s_per_token(self) -> float | None:
        return (self.answer_s - self.first_token_s) / (self.tokens - 1) if self.tokens > 1 else None


def message(session: int, turn: int) -> str:
    """Short, so that 32 turns of history fit a 1024-token context for a stateless model."""
    return f"My favourite number is {session * 7 + turn}. What is yours?"


def stream_turn(connection: http.client.HTTPConnection, body: dict, headers: dict) -> tuple[int, dict, str | None]:
    """POST one streaming turn; return (status, timings and tokens, session id)."""
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    response = connection.getresponse()
    if response.status != 200:
        return response.status, {"error": response.read().decode(errors="replace")[:300]}, None
    first_token_s, tokens, extra = None, 0, {}
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
            extra = {k: event["usage"][k] for k in ("state_bytes", "history_reread") if k in event["usage"]}
    response.read()  # drain, so the connection can be reused
    answer_s = time.perf_counter() - start
    timings = {"first_token_s": first_token_s or answer_s, "answer_s": answer_s, "tokens": tokens, **extra}
    return 200, timings, response.getheader("X-Session-Id")


def run_conversation(url: str, index: int, turns: int, max_tokens: int, api_key: str | None,
                     timeout_s: float, think_s: float = 0.0) -> list[TurnResult]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    results, session_id = [], None
    try:
        for turn in range(turns):
            if turn and think_s:
                time.sleep(think_s)  # the user reads the answer and types the next message
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
             timeout_s: float = 120.0, think_s: float = 0.0) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        futures = [pool.submit(run_conversation, url, i, turns, max_tokens, api_key, timeout_s, think_s)
                   for i in range(sessions)]
        results = [r for f in futures for r in f.result()]
    wall_s = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    first, answer = [r.first_token_s for r in ok], [r.answer_s for r in ok]
    tokens = sum(r.tokens for r in ok)
    failed = sessions * turns - len(ok)
    decode = [d for r in ok if (d := r.decode_s_per_token) is not None]
    last = {}
    for r in ok:  # each session's state after its last answered turn
        last[r.session] = r if r.session not in last or r.turn > last[r.session].turn else last[r.session]
    state_bytes = statistics.median([r.state_bytes for r in last.values()]) if last else float("nan")
    return {
        "url": url, "sessions": sessions, "turns_per_session": turns, "max_tokens": max_tokens, "think_s": think_s,
        "client_machine": describe_machine("cpu"), "wall_s": wall_s,
        "turns_ok": len(ok), "turns_failed": failed, "failed": failed,
        "turns_per_s": len(ok) / wall_s, "tokens": tokens, "tokens_per_s": tokens / wall_s,
        "first_token_p50_s": percentile(first, 50), "first_token_p99_s": percentile(first, 99),
        "ttft_p50_s": percentile(first, 50), "ttft_p99_s": percentile(first, 99),
        "answer_p50_s": percentile(answer, 50), "answer_p99_s": percentile(answer, 99),
        "decode_ms_per_token": percentile(decode, 50) * 1000,
        "state_bytes_per_session": state_bytes,
        "sessions_per_gb": 1e9 / state_bytes if state_bytes else float("nan"),
        **eviction_cost(ok),
        "per_turn": per_turn(ok, turns),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "turn_results": [asdict(r) for r in results],
    }


def per_turn(results: list[TurnResult], turns: int) -> list[dict]:
    """Medians per turn index (0-based): how each figure grows with the conversation."""
    rows = []
    for turn in range(turns):
        mine = [r for r in results if r.turn == turn]
        if mine:
            rows.append({"turn": turn, "turns": len(mine),
                         "ttft_p50_s": percentile([r.first_token_s for r in mine], 50),
                         "answer_p50_s": percentile([r.answer_s for r in mine], 50),
                         "state_bytes": statistics.median([r.state_bytes for r in mine]),
                         "history_rereads": sum(r.history_reread for r in mine)})
    return rows


def eviction_cost(results: list[TurnResult]) -> dict:
    """Turns that re-read an evicted session's history against turns of the same index that did not:
    the median, over turn indices with both, of the difference of their median times to first token."""
    rereads = [r for r in results if r.history_reread]
    extra = []
    for turn in sorted({r.turn for r in rereads}):
        kept = [r.first_token_s for r in results if r.turn == turn and not r.history_reread]
        if kept:
            extra.append(percentile([r.first_token_s for r in rereads if r.turn == turn], 50) - percentile(kept, 50))
    return {"history_reread_turns": len(rereads),
            "reread_ttft_p50_s": percentile([r.first_token_s for r in rereads], 50),
            "evicted_return_extra_ttft_s": statistics.median(extra) if extra else float("nan")}


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
        f"  decode            {report['decode_ms_per_token']:.2f} ms per token (median)",
        f"  state per session {report['state_bytes_per_session']:,.0f} bytes after the last turn "
        f"({report['sessions_per_gb']:,.0f} sessions per GB)",
    ]
    if report["history_reread_turns"]:
        lines.append(f"  evicted sessions  {report['history_reread_turns']} turns re-read their history: time to "
                     f"first token {report['reread_ttft_p50_s'] * ms:.1f} ms median, "
                     f"+{report['evicted_return_extra_ttft_s'] * ms:.1f} ms against kept caches at the same turn")
    lines += [f"  error: {e}" for e in report["errors"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running rxt server")
    parser.add_argument("--spawn-model", metavar="DIR", action="append",
                        help="start a server for this model on a free loopback port; repeat it to run the same "
                             "workload against several models (e.g. an RxT model and a stateless baseline), "
                             "one after another")
    parser.add_argument("--store", help="store URL for --spawn-model (default: SQLite in a temporary directory)")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--think-s", type=float, default=0.0, help="pause between a conversation's turns")
    parser.add_argument("--api-key", help="bearer key, if the server wants one")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--max-batch", metavar="N[,N...]",
                        help="with --spawn-model: start the server with --max-batch N, once per value, one after "
                             "another in the same run (e.g. 1,16: one turn at a time vs batched)")
    parser.add_argument("--kv-cache-bytes", metavar="N[,N...]",
                        help="with --spawn-model: the stateless servers' KV cache budget (rxt serve --kv-cache-bytes), "
                             "once per value (e.g. 1073741824,0: caches kept vs every session evicted)")
    parser.add_argument("--json", metavar="FILE", help="also write the full report (every turn) as JSON")


def run(args: argparse.Namespace) -> int:
    if args.sessions < 1 or args.turns < 1 or args.max_tokens < 1 or args.think_s < 0:
        print("rxt bench serve: --sessions, --turns and --max-tokens must be >= 1, --think-s >= 0", file=sys.stderr)
        return 2
    batches, budgets = _numbers(args.max_batch, 1), _numbers(args.kv_cache_bytes, 0)
    if batches is None or budgets is None or ((args.max_batch or args.kv_cache_bytes) and not args.spawn_model):
        print("rxt bench serve: --max-batch takes numbers >= 1 and --kv-cache-bytes numbers >= 0, with "
              "--spawn-model", file=sys.stderr)
        return 2
    if args.spawn_model:
        reports = [_run_spawned(args, model, n, kv) for model in args.spawn_model for n in batches for kv in budgets]
    else:
        reports = [run_load(args.url, args.sessions, args.turns, args.max_tokens, args.api_key, args.timeout_s,
                            args.think_s)]
    print("\n".join(format_report(r) for r in reports))
    if len(reports) > 1:
        print(format_comparison(reports))
    if len(reports) > 1:
        print(format_per_turn(reports))
    if args.json:
        out = reports[0] if len(reports) == 1 else {"runs": reports}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["turns_ok"] for r in reports) else 1


def _numbers(values: str | None, least: int) -> list[int | None] | None:
    """'1,16' -> [1, 16]; no option -> [None]; None if a value is not a whole number >= least."""
    if not values:
        return [None]
    try:
        numbers = [int(n) for n in values.split(",")]
    except ValueError:
        return None
    return numbers if all(n >= least for n in numbers) else None


def label(report: dict) -> str:
    """The model's directory name and the server settings the run varied."""
    name = Path(report.get("model") or "server").name
    if report.get("max_batch") is not None:
        name += f" batch {report['max_batch']}"
    if report.get("kv_cache_bytes") is not None:
        name += f" kv {report['kv_cache_bytes']:,}"
    return name


def format_comparison(reports: list[dict]) -> str:
    """One line per server, throughput relative to the first."""
    base = reports[0]["turns_per_s"]
    lines = ["  server                       turns/s  vs first  1st token p50 / p99 ms  state bytes  sessions/GB"
             "  failed"]
    for r in reports:
        lines.append(f"  {label(r)[:28]:28}"
                     f"  {r['turns_per_s']:7.2f}  {r['turns_per_s'] / base:7.1f}x"
                     f"  {r['first_token_p50_s'] * 1000:10.1f} / {r['first_token_p99_s'] * 1000:7.1f}"
                     f"  {r['state_bytes_per_session']:11,.0f}  {r['sessions_per_gb']:11,.0f}  {r['turns_failed']:6d}")
    return "\n".join(lines)


PER_TURN_FIGURES = {"ttft_p50_s": "time to first token p50", "answer_p50_s": "full answer p50",
                    "state_bytes": "state bytes per session"}


def format_per_turn(reports: list[dict], shown: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> str:
    """The first run against each later one, turn by turn: where the first wins from, on each figure."""
    first, lines = reports[0], []
    for other in reports[1:]:
        a, b = label(first), label(other)
        lines.append(f"  turn  1st token p50 ms ({a} / {b})  full answer p50 ms  state bytes per session")
        theirs = {row["turn"]: row for row in other["per_turn"]}
        for row in first["per_turn"]:
            if row["turn"] + 1 in shown and row["turn"] in theirs:
                them = theirs[row["turn"]]
                lines.append(f"  {row['turn'] + 1:4d}  {row['ttft_p50_s'] * 1000:9.1f} / {them['ttft_p50_s'] * 1000:7.1f}"
                             f"  {row['answer_p50_s'] * 1000:17.1f} / {them['answer_p50_s'] * 1000:7.1f}"
                             f"  {row['state_bytes']:10,.0f} / {them['state_bytes']:,.0f}")
        lines.append(f"  {a} against {b}, per turn (lower wins):")
        for key, figure in PER_TURN_FIGURES.items():
            turn = wins_from(first["per_turn"], other["per_turn"], key)
            where = "never" if turn is None else f"from turn {turn + 1} on"
            lines.append(f"    {figure:26} {a} lower {where}")
    return "\n".join(lines)


def wins_from(mine: list[dict], theirs: list[dict], key: str) -> int | None:
    """The first turn index from which ``mine`` is lower than ``theirs`` on every later turn (None: never)."""
    theirs_by_turn = {row["turn"]: row[key] for row in theirs}
    pairs = [(row["turn"], row[key] < theirs_by_turn[row["turn"]]) for row in mine if row["turn"] in theirs_by_turn]
    since = None
    for turn, lower in pairs:
        since = (turn if since is None else since) if lower else None
    return since


def _run_spawned(args: argparse.Namespace, model: str, max_batch: int | None = None,
                 kv_cache_bytes: int | None = None) -> dict:
    from rxt.serve.app import KEYS_ENV
    from rxt.serve.launch import ServerProcess

    with tempfile.TemporaryDirectory(prefix="rxt-bench-serve-") as tmp:
        store = args.store or f"sqlite:///{Path(tmp) / 'sessions.db'}"
        server_args = ["--max-tokens-limit", str(args.max_tokens)]
        if max_batch is not None:
            server_args += ["--max-batch", str(max_batch)]
        if kv_cache_bytes is not None:
            server_args += ["--kv-cache-bytes", str(kv_cache_bytes)]
        env = {KEYS_ENV: args.api_key} if args.api_key else {}  # not on the command line: ps shows that
        with ServerProcess(model, store, args=server_args, env=env, log_path=Path(tmp) / "server.log") as server:
            report = run_load(server.url, args.sessions, args.turns, args.max_tokens, args.api_key, args.timeout_s,
                              args.think_s)
        report["server"] = f"spawned: rxt serve --model {model} --store {store} {' '.join(server_args)}"
        report["model"], report["max_batch"], report["kv_cache_bytes"] = model, max_batch, kv_cache_bytes
        return report
