"""Which memory encoder for a reactive SmolLM2? The cost of each option per turn, and how far the
pretrained layers' states move when they are run bidirectionally.

    python experiments/reactive_pretrained/encoder_choice.py models/smollm2 [--repeats 7] [--json out.json]

Options (docs/reactive-pretrained.md):
    own states    ED = the decoder's hidden states of the finished turn (ReactivePretrained.encode)
    bidirectional the same 30 pretrained layers over the turn without the causal mask
    small encoder 2 new bidirectional layers of the base's width (rxt's EncoderLayer, SQA 3/3)
A turn is what the engine feeds the decoder: SmolLM2's system message, the prompt, the answer. Times
are medians over --repeats runs, one thread, no gradient; the memory attention (consolidate) and the
prompt pass of the turn are timed for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from rxt.layers import EncoderLayer
from rxt.pretrained.reactive import ReactiveConfig, ReactivePretrained

TURN = (
    "I just got back from a week in Lisbon with my sister Maya. We stayed in Alfama, ate far too many "
    "custard tarts and took the old yellow tram up to the castle every evening. My flight home was "
    "delayed six hours, so I finished the novel I had been carrying around since March."
)
ANSWER = (
    "That sounds like a lovely trip! Alfama is beautiful at sunset, and six hours is a long delay, but "
    "at least you finished your book. What was the novel, and would you go back to Lisbon?"
)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bidirectional_pass(model: ReactivePretrained, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The pretrained layers over ids with no causal mask (no memory read: it adds zero before training):
    the last layer's states and those after each memory layer."""
    x = model.base.embedding(ids)
    positions = torch.arange(ids.shape[1])
    states = []
    for i, layer in enumerate(model.decoder.layers):
        x = x + layer.self_attention(layer.self_norm(x), positions=positions, causal=False)
        x = x + layer.ffn(layer.ffn_norm(x))
        if i in model.reactive.memory_layers:
            states.append(x)
    return x, states


def token_similarity(states: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Mean cosine between different tokens' states (T, D) after an RMS norm with this weight."""
    normed = F.normalize(states * (weight if weight is not None else 1.0), dim=-1)
    cosines = normed @ normed.T
    return round(float(cosines[~torch.eye(len(states), dtype=torch.bool)].mean()), 3)


def outlier_report(model: ReactivePretrained, own: list[torch.Tensor]) -> dict[int, dict[str, float]]:
    """Per memory layer, over the turn's tokens: the share of the states' energy in their 5 largest
    dimensions, and how alike tokens look through a unit-weight norm, through the layer's pretrained FFN
    norm (what the new norms start from, init_norms_from_base) and through the next layer's input norm."""
    report, turn, layers = {}, len(model.tokenizer.preamble()), model.decoder.layers
    for layer, states in zip(model.reactive.memory_layers, own, strict=True):
        x = states[0, turn:]
        energy = x.pow(2).mean(0)
        following = layers[layer + 1].self_norm if layer + 1 < len(layers) else model.decoder.norm
        report[layer] = {
            "top5_energy_share": round(float(energy.topk(5).values.sum() / energy.sum()), 3),
            "token_cosine_unit_norm": token_similarity(x),
            "token_cosine_ffn_norm": token_similarity(x, layers[layer].ffn_norm.weight),
            "token_cosine_next_input_norm": token_similarity(x, following.weight),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="an imported StatelessLM directory (rxt import gguf)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ReactivePretrained.from_base(args.base, ReactiveConfig()).eval()
    tok = model.tokenizer
    ids = model.interaction(TURN, ANSWER)[0]  # as the engine feeds a turn: system message, prompt, answer
    prompt_ids = torch.tensor([tok.preamble() + tok.prompt(TURN)])
    stm = model.initial_memory(1)
    c = model.memory_config
    encoder = torch.nn.ModuleList(EncoderLayer(c, model.decoder.layers[0].self_attention.rotary) for _ in range(2))
    encoder.eval()
    positions = torch.arange(ids.shape[1])

    def small_encoder() -> list[torch.Tensor]:
        x = model.base.embedding(ids)
        for layer in encoder:
            x = layer(x, positions)
        return [x] * len(model.reactive.memory_layers)

    with torch.no_grad():
        own = model.encode(ids, stm)
        last, bidirectional = bidirectional_pass(model, ids)
        results = {
            "turn_tokens": ids.shape[1],
            "prompt_tokens": prompt_ids.shape[1],
            "ms": {
                "prompt pass (generation's prefill, for scale)": median_ms(lambda: model.decode(prompt_ids, stm=stm), args.repeats),
                "own states: recomputed after the turn": median_ms(lambda: model.encode(ids, stm), args.repeats),
                "own states: kept from generation / the training pass": 0.0,
                "bidirectional pretrained layers": median_ms(lambda: bidirectional_pass(model, ids), args.repeats),
                "small new encoder (2 layers)": median_ms(small_encoder, args.repeats),
                "consolidate (memory attention, all memory layers)": median_ms(
                    lambda: model.consolidate(stm, own), args.repeats
                ),
            },
            "small_encoder_parameters": sum(p.numel() for p in encoder.parameters()),
            "adapter_parameters": sum(t.numel() for t in model.adapter_state_dict().values()),
            # how far the bidirectional pass moves each memory layer's states from the causal ones the
            # pretrained weights were trained to produce (1 = unchanged)
            "memory_layer_states": outlier_report(model, own),
            "bidirectional_vs_causal_cosine": {
                layer: round(float(F.cosine_similarity(a, b, dim=-1).mean()), 4)
                for layer, a, b in zip(model.reactive.memory_layers, own, bidirectional, strict=True)
            },
            # share of positions where the bidirectional pass still predicts the causal pass's next token
            "bidirectional_next_token_agreement": round(float(
                (model.base.logits(model.decoder.norm(last)).argmax(-1) == model.decode(ids, stm=stm).argmax(-1))
                .float().mean()
            ), 4),
        }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
