"""Does a token's own identity survive in SmolLM2's residual stream at the memory layers?

The logit lens: each memory layer's state of a token, through the final norm and the tied output head;
where the token itself ranks among the 49,152. A memory written from those states has to recover a told
word's identity from them; the token embeddings hold it verbatim (``reactive.ed_embeddings``).

    python experiments/reactive_pretrained/identity_probe.py runs/smollm2 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from rxt.model import StatelessLM

SENTENCES = [  # invented words as the fresh-values training tells them, and plain ones
    "My sister's name is Tomedugi.", "I moved to Sartwuing last spring.",
    "My dog is called Pelkarino and he is very old.", "My favourite food is the blorvish stew my aunt makes.",
    "Our new neighbour works as a glimbrotter.", "I work as a nurse in a big hospital in Leeds.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("--layers", type=int, nargs="*", default=list(range(2, 30, 3)))
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = StatelessLM.from_pretrained(args.base).eval()
    ranks: dict[int, list[int]] = {-1: []} | {layer: [] for layer in args.layers}  # -1: the token embeddings
    with torch.no_grad():
        for sentence in SENTENCES:
            ids = torch.tensor([model.tokenizer.encode(sentence)])
            x, positions = model.embedding(ids), torch.arange(ids.shape[1])
            for i, layer in enumerate([None, *model.decoder.layers], start=-1):
                if layer is not None:
                    x = layer(x, positions, None, None, None)
                if i in ranks:
                    logits = model.logits(model.decoder.norm(x))[0]  # (T, V)
                    own = logits.gather(1, ids[0][:, None])
                    ranks[i] += (logits > own).sum(1).tolist()
    rows = {}
    for layer, values in ranks.items():
        rows[layer] = {"median_rank": statistics.median(values), "top1": sum(v == 0 for v in values) / len(values),
                       "top10": sum(v < 10 for v in values) / len(values), "tokens": len(values)}
        name = "embedding" if layer < 0 else f"layer {layer:>2}"
        print(f"{name:>9}: the token itself ranks {rows[layer]['median_rank']:>6.0f} (median) of "
              f"{model.config.vocab_size}; top-1 {rows[layer]['top1']:.0%}, top-10 {rows[layer]['top10']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": rows, "sentences": SENTENCES}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
