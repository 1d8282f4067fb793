"""`rxt import gguf FILE --out DIR`: a llama-layout GGUF model as an rxt StatelessLM directory.

A GGUF file (llama.cpp's format) holds the weights, possibly quantised, and everything else in its
metadata. The ``gguf`` library (llama.cpp's own reader and dequantiser) reads it; this module maps it:

    llama.* metadata         -> ModelConfig (GQA head counts, SwiGLU size, RMSNorm eps, RoPE base)
    token_embd, blk.N.*, ... -> embedding, decoder.layers.N.*, ... (fp32; the output head stays tied)
    tokenizer.ggml.*         -> a byte-level BPE tokenizer (`tokenizers`) with the file's merges
    tokenizer.chat_template  -> a ChatTemplate (ChatML), kept with the tokenizer

RoPE order. llama.cpp rotates adjacent pairs of a head's dimensions, (0, 1), (2, 3), ...; rxt rotates
dimension i with i + d_head/2 ("rotate half"), as the models GGUF files are converted from do. The
converter reorders each head's q and k rows so that llama.cpp's pair (2i, 2i+1) is the original pair
(i, i + d_head/2); ``rotate_half_rows`` puts them back. Both rotate that pair by the same angle, so
the attention scores, and everything after them, are the same.

Anything the mapping does not express (another architecture, a quantisation type outside
SUPPORTED_TYPES, RoPE scaling, a separate output matrix, another tokenizer) is refused by name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from rxt.config import ModelConfig
from rxt.model import StatelessLM
from rxt.tokenizer import ChatTemplate, Tokenizer, chatml_template

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (1 is a normal token)

# metadata key (after "llama.") -> ModelConfig field; required unless it has a default here
LLAMA_KEYS = {
    "block_count": "n_layers",
    "embedding_length": "d_model",
    "feed_forward_length": "ffn_dim",
    "attention.head_count": "n_heads",
    "attention.head_count_kv": "n_kv_heads",
    "attention.layer_norm_rms_epsilon": "norm_eps",
    "context_length": "max_seq_len",
    "rope.freq_base": "rope_theta",
}
LLAMA_DEFAULTS = {"rope.freq_base": 10000.0}
# llama.* keys that change nothing as long as they hold the value this layout implies
LLAMA_CHECKED_KEYS = ("vocab_size", "rope.dimension_count", "attention.key_length", "attention.value_length",
                      "rope.scaling.type", "expert_count", "expert_used_count")

# GGUF tensor name -> rxt parameter name; blk.N.* maps into decoder.layers.N.*
GLOBAL_TENSORS = {"token_embd.weight": "embedding.weight", "output_norm.weight": "decoder.norm.weight"}
LAYER_TENSORS = {
    "attn_norm.weight": "self_norm.weight",
    "attn_q.weight": "self_attention.q_proj.weight",
    "attn_k.weight": "self_attention.k_proj.weight",
    "attn_v.weight": "self_attention.v_proj.weight",
    "attn_output.weight": "self_attention.o_proj.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "ffn.gate.weight",
    "ffn_up.weight": "ffn.up.weight",
    "ffn_down.weight": "ffn.down.weight",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre -> how text is split before BPE. GPT-2's split; "smollm" first isolates every digit.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _byte_level,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
}

# a default system message written out in a ChatML template (as a Jinja string: "\n" may be escaped)
CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^{}'\"<]*)<\|im_end\|>")


def load_gguf(path: str | Path, progress: bool = False) -> StatelessLM:
    """The model of a GGUF file as an rxt StatelessLM (fp32, eval mode), its tokenizer attached."""
    return _read(Path(path), progress)[0]


def import_gguf(path: str | Path, out: str | Path, progress: bool = False) -> StatelessLM:
    """Import a GGUF file into the rxt model directory ``out`` and return the model.

    The directory holds config.json, model.safetensors, tokenizer.json, chat_template.json and
    import.json (the source file's name, sha256, architecture and tensor types).
    """
    path = Path(path)
    model, source = _read(path, progress)
    out = model.save_pretrained(out)
    source = {"format": "gguf", "file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size, **source}
    (out / "import.json").write_text(json.dumps(source, indent=2) + "\n")
    return model


def _read(path: Path, progress: bool) -> tuple[StatelessLM, dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {architecture!r}: rxt imports {list(SUPPORTED_ARCHITECTURES)}")
    check_tensor_types(reader.tensors)
    config = llama_config(meta)
    tokenizer = gguf_tokenizer(meta)
    model = StatelessLM(config)
    state = llama_state_dict(reader.tensors, config, progress)
    _check_shapes(state, model.state_dict())
    model.load_state_dict(state, assign=True)  # the dequantised tensors become the parameters: no copy
    model.tokenizer = tokenizer
    source = {
        "architecture": architecture,
        "name": meta.get("general.name"),
        "license": meta.get("general.license"),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
    }
    return model.eval(), source


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"the GGUF tensors do not fit its metadata: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, weight in state.items():
        if weight.shape != expected[name].shape:
            raise ValueError(f"GGUF tensor for {name} has shape {tuple(weight.shape)}; the metadata implies "
                             f"{tuple(expected[name].shape)}")


def check_tensor_types(tensors: list[ReaderTensor]) -> None:
    """Refuse, naming them, quantisation types outside SUPPORTED_TYPES."""
    unsupported: dict[str, list[str]] = {}
    for tensor in tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            unsupported.setdefault(tensor.tensor_type.name, []).append(tensor.name)
    if unsupported:
        found = "; ".join(f"{kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                          for kind, names in unsupported.items())
        raise ValueError(f"unsupported GGUF tensor types: {found}; rxt reads {[t.name for t in SUPPORTED_TYPES]}")


def llama_config(meta: dict[str, Any]) -> ModelConfig:
    """A ModelConfig for the llama metadata: self-attention GQA heads, SwiGLU, RMSNorm, RoPE."""
    known = set(LLAMA_KEYS) | set(LLAMA_CHECKED_KEYS)
    for key in sorted(k for k in meta if k.startswith("llama.")):
        if key.removeprefix("llama.") not in known:
            raise ValueError(f"unsupported GGUF metadata {key}={meta[key]!r}: rxt's llama import does not express it")
    values: dict[str, Any] = {}
    for key, field in LLAMA_KEYS.items():
        value = meta.get(f"llama.{key}", LLAMA_DEFAULTS.get(key))
        if key == "attention.head_count_kv" and value is None:
            value = values["n_heads"]  # no GQA
        if value is None:
            raise ValueError(f"the GGUF file lacks llama.{key}")
        if isinstance(value, list):
            raise ValueError(f"unsupported GGUF metadata llama.{key}: per-layer values {value[:4]}...")
        values[field] = value
    values["norm_eps"] = float(f"{values['norm_eps']:.6g}")  # stored as float32: 1e-5 reads as 9.9999997e-06
    if not meta.get("tokenizer.ggml.tokens"):
        raise ValueError("the GGUF file has no vocabulary (tokenizer.ggml.tokens)")
    n_heads, d_model = values["n_heads"], values["d_model"]
    if d_model % n_heads:
        raise ValueError(f"llama.embedding_length={d_model} is not a multiple of head_count={n_heads}")
    implied = {
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "rope.dimension_count": d_model // n_heads,  # RoPE on the whole head
        "attention.key_length": d_model // n_heads,
        "attention.value_length": d_model // n_heads,
        "rope.scaling.type": "none",
        "expert_count": 0,
        "expert_used_count": 0,
    }
    for key, expected in implied.items():
        found = meta.get(f"llama.{key}", expected)
        if found != expected:
            raise ValueError(f"unsupported GGUF metadata llama.{key}={found!r}: rxt's llama import needs {expected!r}")
    return ModelConfig(
        vocab_size=implied["vocab_size"],
        n_q_heads=n_heads,
        cross_n_q_heads=n_heads,  # (unused by a stateless model; kept valid)
        cross_n_kv_heads=values["n_kv_heads"],
        **values,
    )


def rotate_half_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's q/k projection rows from llama.cpp's RoPE pairs (2i, 2i+1) to rxt's (i, i + d/2).

    weight: (n_heads * d_head, D). Within a head, row 2i + s moves to s * d_head/2 + i.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rxt_name(gguf_name: str) -> str | None:
    """The rxt parameter a GGUF tensor fills, or None if the mapping has none."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"decoder.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"
    return None


def llama_state_dict(tensors: list[ReaderTensor], config: ModelConfig, progress: bool = False) -> dict[str, torch.Tensor]:
    """Dequantised fp32 weights under rxt's names, q/k rows in rxt's RoPE order."""
    unknown = [t.name for t in tensors if rxt_name(t.name) is None]
    if "output.weight" in unknown:
        raise ValueError("unsupported GGUF tensor output.weight: a separate output matrix; rxt ties the output "
                         "head to the token embedding")
    if unknown:
        raise ValueError(f"unsupported GGUF tensors {unknown[:5]}: rxt's llama mapping has no place for them")
    state = {}
    for tensor in tqdm(tensors, desc="dequantising", unit="tensor", disable=not progress):
        weight = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        if tensor.name.endswith("attn_q.weight"):
            weight = rotate_half_rows(weight, config.n_q_heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = rotate_half_rows(weight, config.n_kv_heads)
        state[rxt_name(tensor.name)] = weight
    return state


def gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The file's byte-level BPE: its vocabulary (ids kept), merges, control tokens and chat template."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {kind!r}: rxt imports byte-level BPE ('gpt2') tokenizers")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: rxt knows {sorted(PRE_TOKENIZERS)}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"the GGUF vocabulary repeats {len(tokens) - len(vocab)} token strings")
    merges = [tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges", [])]
    if any(len(pair) != 2 for pair in merges):
        raise ValueError("a GGUF merge is not two tokens separated by one space")
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types, strict=True) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED])
    control = {t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL}
    return Tokenizer(backend, chat_template(meta, control))


def chat_template(meta: dict[str, Any], control: set[str]) -> ChatTemplate:
    """The file's Jinja chat template as a ChatTemplate; ChatML is the one rxt maps."""
    source = meta.get("tokenizer.chat_template")
    if not source:
        raise ValueError("the GGUF file has no chat template (tokenizer.chat_template): rxt imports chat models")
    if "<|im_start|>" not in source or not {"<|im_start|>", "<|im_end|>"} <= control:
        raise ValueError(f"unsupported chat template: rxt maps ChatML (<|im_start|>role ... <|im_end|>); "
                         f"this one begins {source[:80]!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    pad = tokens[pad_id] if pad_id is not None and tokens[pad_id] in control else "<|im_end|>"
    system = CHATML_SYSTEM.search(source)
    template = chatml_template(system.group(1) if system else "", source=source, pad=pad)
    if meta.get("tokenizer.ggml.add_bos_token"):
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        if bos not in control:
            raise ValueError(f"the beginning-of-text token {bos!r} is not a control token")
        template = ChatTemplate(**{**template.to_dict(), "preamble": bos + template.preamble})
    return template


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .gguf file (llama architecture, byte-level BPE, ChatML template)")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--force", action="store_true", help="write into a directory that is not empty")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} is not empty; pass --force to write into it")
    start = time.perf_counter()
    model = import_gguf(args.file, out, progress=True)
    c = model.config
    print(f"wrote {out}: stateless LM, {model.num_parameters():,} parameters, {c.n_layers} layers, d_model "
          f"{c.d_model}, heads {c.n_q_heads}/{c.n_kv_heads}, vocab {c.vocab_size}, context {c.max_seq_len} "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"chat: rxt chat {out} --baseline cached")
    return 0
