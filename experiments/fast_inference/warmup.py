"""How long `--compile` takes to warm up: the first turn of a compiled nano RxT, with an empty inductor cache
(the first start on a machine) and again with the cache the first run left (every later start).

    python experiments/fast_inference/warmup.py [--preset nano] [--json FILE]

Each measurement is a fresh process (nothing compiled in memory), one torch thread, TORCHINDUCTOR_CACHE_DIR
pointing at a temporary directory that starts empty.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, time, torch
from torch._dynamo.utils import counters
from rxt import ModelConfig, ReactiveTransformer
from rxt.bench.latency import fixed_queries, run_conversations, special_tokens_only
from rxt.engine import ReactiveEngine
torch.set_num_threads(1)
config = ModelConfig.from_name({preset!r})
engine = ReactiveEngine(ReactiveTransformer(config), special_tokens_only(), "cpu", inference="compiled")
queries = fixed_queries(2, 32, config.vocab_size, 0)
times = []
for query in queries:
    start = time.perf_counter()
    run_conversations({{"rxt": engine}}, [query], 32, repeats=1)
    times.append(time.perf_counter() - start)
engine.close()
print(json.dumps({{"first_turn_s": times[0], "second_turn_s": times[1], "graphs": counters["stats"]["unique_graphs"]}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS="1")
        for name in ("empty_cache", "warm_cache"):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD.format(preset=args.preset)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            record["process_s"] = time.perf_counter() - start
            results[name] = record
            print(f"{name}: first turn (compilation) {record['first_turn_s']:.1f} s, next turn "
                  f"{record['second_turn_s'] * 1e3:.0f} ms, {record['graphs']} graphs; process {record['process_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, **results, "load_average": os.getloadavg()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
