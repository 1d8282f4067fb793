"""`rxt import gguf`: tiny GGUF files written with the gguf writer, checked against a reference forward
that reads the file's tensors in llama.cpp's own layout (adjacent RoPE pairs); and, slow, the real
SmolLM2 file against transformers' GGUF loading."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rxt.attention import RotaryEmbedding
from rxt.baselines import StatelessEngine
from rxt.chat import ChatREPL, build_engine
from rxt.cli import main
from rxt.generation import SamplingConfig
from rxt.model import StatelessLM, load_model
from rxt.pretrained import gguf as gguf_import
from rxt.pretrained.gguf import import_gguf, load_gguf, rotate_half_rows

pytestmark = pytest.mark.usefixtures("one_thread")

Q = GGMLQuantizationType
D, LAYERS, HEADS, KV_HEADS, FFN, THETA, EPS = 64, 2, 4, 2, 128, 500.0, 1e-5
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM = "You are a tiny test model"
JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [
    "Hello there, how are you today?",
    "I have 12 cats and 345 dogs; café naïve über.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is.",
]
SAMPLING = SamplingConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def original() -> HFTokenizer:
    """The tokenizer the tiny GGUF files carry: byte-level BPE that isolates digits (as "smollm")."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CONTROL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 20, trainer=trainer)
    return backend


def tokenizer_fields(backend: HFTokenizer) -> dict[str, object]:
    tokens = [backend.id_to_token(i) for i in range(backend.get_vocab_size())]
    merges = json.loads(backend.to_str())["model"]["merges"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in CONTROL else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "tokenizer.ggml.padding_token_id": tokens.index("<|im_end|>"),
        "tokenizer.chat_template": JINJA,
    }


def llama_weights(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in GGUF's layout (out, in), q/k rows in llama.cpp's RoPE order by definition."""
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 1.0 / math.sqrt(cols) * 2, (rows, cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.normal(size=D)).astype(np.float32)

    d_head = D // HEADS
    weights = {"token_embd.weight": matrix(vocab, D), "output_norm.weight": norm()}
    for i in range(LAYERS):
        weights |= {
            f"blk.{i}.attn_norm.weight": norm(),
            f"blk.{i}.attn_q.weight": matrix(HEADS * d_head, D),
            f"blk.{i}.attn_k.weight": matrix(KV_HEADS * d_head, D),
            f"blk.{i}.attn_v.weight": matrix(KV_HEADS * d_head, D),
            f"blk.{i}.attn_output.weight": matrix(D, HEADS * d_head),
            f"blk.{i}.ffn_norm.weight": norm(),
            f"blk.{i}.ffn_gate.weight": matrix(FFN, D),
            f"blk.{i}.ffn_up.weight": matrix(FFN, D),
            f"blk.{i}.ffn_down.weight": matrix(D, FFN),
        }
    return weights


def write_gguf(path: Path, fields: dict[str, object], weights: dict[str, np.ndarray], qtype: Q = Q.F32,
               arch: str = "llama", raw: dict[str, tuple[np.ndarray, Q]] | None = None, **overrides: object) -> Path:
    """A GGUF file as llama.cpp's converter writes one; ``overrides`` replace or (None) drop metadata."""
    metadata: dict[str, object] = {
        f"{arch}.block_count": LAYERS, f"{arch}.context_length": 256, f"{arch}.embedding_length": D,
        f"{arch}.feed_forward_length": FFN, f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS, f"{arch}.rope.freq_base": THETA,
        f"{arch}.attention.layer_norm_rms_epsilon": EPS, f"{arch}.rope.dimension_count": D // HEADS,
        **fields,
    }
    metadata.update({k.replace("llama.", f"{arch}."): v for k, v in overrides.items()})
    writer = GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in weights.items():
        if array.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, array)
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    for name, (array, kind) in (raw or {}).items():
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def vocab(original) -> int:
    return original.get_vocab_size()


@pytest.fixture(scope="module")
def make_gguf(original, tmp_path_factory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("gguf")
    fields = tokenizer_fields(original)
    counter = iter(range(10_000))

    def make(qtype: Q = Q.F32, weights: dict[str, np.ndarray] | None = None, **kwargs: object) -> Path:
        weights = llama_weights(original.get_vocab_size()) if weights is None else weights
        return write_gguf(root / f"model{next(counter)}.gguf", fields, weights, qtype, **kwargs)

    return make


@pytest.fixture(scope="module")
def gguf_file(make_gguf) -> Path:
    return make_gguf()


# -- a reference forward in llama.cpp's layout -------------------------------------------------------------
def rope_pairs(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """llama.cpp's RoPE for llama: dimensions (2i, 2i+1) rotate together by position * THETA^(-2i/d)."""
    d = x.shape[-1]
    angle = positions[:, None].float() * THETA ** (-torch.arange(0, d, 2).float() / d)  # (T, d/2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # broadcast over heads
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def reference_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) straight from the file's tensors, as llama.cpp computes them."""
    w = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
         for t in GGUFReader(path).tensors}
    t, d_head = len(ids), D // HEADS
    positions = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = w["token_embd.weight"][ids]  # (T, D)
    for i in range(LAYERS):
        p = f"blk.{i}."
        h = rms_norm(x, w[p + "attn_norm.weight"])
        q = rope_pairs((h @ w[p + "attn_q.weight"].T).view(t, HEADS, d_head), positions)
        k = rope_pairs((h @ w[p + "attn_k.weight"].T).view(t, KV_HEADS, d_head), positions)
        v = (h @ w[p + "attn_v.weight"].T).view(t, KV_HEADS, d_head)
        k, v = (z.repeat_interleave(HEADS // KV_HEADS, dim=1) for z in (k, v))  # query head h reads kv head h // g
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(d_head)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", weights, v).reshape(t, D) @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"])
        gated = F.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
        x = x + gated @ w[p + "ffn_down.weight"].T
    return rms_norm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


IDS = [5, 17, 230, 42, 99, 3, 250, 77, 11]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_imported_logits_match_the_reference_forward(make_gguf, qtype: Q) -> None:
    path = make_gguf(qtype)
    model = load_gguf(path)
    with torch.no_grad():
        ours = model.decode(torch.tensor([IDS]))[0]
    torch.testing.assert_close(ours, reference_logits(path, IDS), atol=2e-4, rtol=1e-4)


def test_quantised_weights_stay_close_to_the_originals(make_gguf, vocab) -> None:
    weights = llama_weights(vocab)
    model = load_gguf(make_gguf(Q.Q8_0, weights))
    q8 = model.state_dict()["decoder.layers.0.ffn.up.weight"]
    assert (q8 - torch.from_numpy(weights["blk.0.ffn_up.weight"])).abs().max() < 0.01  # 8-bit blocks of 32


def test_without_reordering_the_rope_rows_the_logits_differ(gguf_file, monkeypatch) -> None:
    """The q/k row order is not a no-op: importing the rows as they are breaks parity after position 0."""
    monkeypatch.setattr(gguf_import, "rotate_half_rows", lambda weight, n_heads: weight)
    with torch.no_grad():
        ours = load_gguf(gguf_file).decode(torch.tensor([IDS]))[0]
    reference = reference_logits(gguf_file, IDS)
    torch.testing.assert_close(ours[0], reference[0], atol=2e-4, rtol=1e-4)  # position 0: no rotation
    assert (ours[1:] - reference[1:]).abs().max() > 0.1


def test_rotate_half_rows_turns_adjacent_pairs_into_rotate_half() -> None:
    """q.k under llama.cpp's adjacent-pair RoPE equals q.k under rxt's rotate-half RoPE of the reordered rows."""
    torch.manual_seed(0)
    d_head, heads, t = 16, 3, 7
    w_q, w_k, x = torch.randn(heads * d_head, 32), torch.randn(heads * d_head, 32), torch.randn(t, 32)
    positions = torch.arange(t)
    q = rope_pairs((x @ w_q.T).view(t, heads, d_head), positions)
    k = rope_pairs((x @ w_k.T).view(t, heads, d_head), positions)
    pairs_scores = torch.einsum("thd,shd->hts", q, k)
    rotary = RotaryEmbedding(d_head, 64, THETA)
    q2 = rotary((x @ rotate_half_rows(w_q, heads).T).view(t, heads, d_head).transpose(0, 1), positions)
    k2 = rotary((x @ rotate_half_rows(w_k, heads).T).view(t, heads, d_head).transpose(0, 1), positions)
    torch.testing.assert_close(q2 @ k2.transpose(-2, -1), pairs_scores, atol=1e-4, rtol=1e-4)
    q3 = rotary((x @ w_q.T).view(t, heads, d_head).transpose(0, 1), positions)  # rows left as they are
    k3 = rotary((x @ w_k.T).view(t, heads, d_head).transpose(0, 1), positions)
    assert not torch.allclose(q3 @ k3.transpose(-2, -1), pairs_scores, atol=1e-2)


def test_config_expresses_the_llama_layout(gguf_file, original) -> None:
    config = load_gguf(gguf_file).config
    assert (config.d_model, config.n_layers, config.ffn_dim) == (D, LAYERS, FFN)
    assert (config.n_heads, config.n_q_heads, config.n_kv_heads, config.d_head) == (HEADS, HEADS, KV_HEADS, D // HEADS)
    assert (config.rope_theta, config.norm_eps, config.max_seq_len) == (THETA, EPS, 256)
    assert config.vocab_size == original.get_vocab_size()


# -- refusals --------------------------------------------------------------------------------------------------
def test_refuses_another_architecture(make_gguf) -> None:
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'qwen2'"):
        load_gguf(make_gguf(arch="qwen2"))


def test_refuses_an_unsupported_quantisation_type_by_name(make_gguf, vocab) -> None:
    weights = llama_weights(vocab)
    del weights["blk.1.ffn_down.weight"]
    q6k = np.zeros((D, 210), dtype=np.uint8)  # Q6_K: 210 bytes per block of 256 (refused before any shape check)
    with pytest.raises(ValueError, match=r"unsupported GGUF tensor types: Q6_K \(blk\.1\.ffn_down\.weight\)"):
        load_gguf(make_gguf(Q.F32, weights, raw={"blk.1.ffn_down.weight": (q6k, Q.Q6_K)}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"llama.rope.scaling.type": "linear"}, "llama.rope.scaling.type='linear'"),
        ({"llama.rope.dimension_count": 8}, "llama.rope.dimension_count=8"),
        ({"llama.expert_count": 4}, "llama.expert_count=4"),
        ({"llama.attention.sliding_window": 64}, "llama.attention.sliding_window=64"),
        ({"llama.block_count": None}, "lacks llama.block_count"),
        ({"tokenizer.ggml.tokens": None}, "no vocabulary"),
        ({"tokenizer.ggml.model": "llama"}, "unsupported GGUF tokenizer 'llama'"),
        ({"tokenizer.ggml.pre": "qwen2"}, "unsupported GGUF pre-tokenizer 'qwen2'"),
        ({"tokenizer.chat_template": None}, "no chat template"),
        ({"tokenizer.chat_template": "{{ '[INST] ' + message }}"}, "unsupported chat template"),
    ],
)
def test_refuses_what_the_mapping_does_not_express(make_gguf, overrides, message) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_gguf(make_gguf(**overrides))


def test_refuses_a_separate_output_matrix(make_gguf, vocab) -> None:
    weights = llama_weights(vocab) | {"output.weight": np.zeros((vocab, D), dtype=np.float32)}
    with pytest.raises(ValueError, match="output.weight: a separate output matrix"):
        load_gguf(make_gguf(weights=weights))


def test_refuses_tensors_that_do_not_fit_the_metadata(make_gguf) -> None:
    with pytest.raises(ValueError, match=r"missing \['decoder\.layers\.2\."):
        load_gguf(make_gguf(**{"llama.block_count": 3}))


# -- tokenizer and chat template ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imported(gguf_file) -> StatelessLM:
    return load_gguf(gguf_file)


def test_tokenizer_matches_the_one_the_file_was_made_from(imported, original) -> None:
    tokenizer = imported.tokenizer
    for text in [*TEXTS, "a 2024 date: 31.12.", "  spaces\n\nand lines", "Ünïcödé ✓ 🙂"]:
        ids = tokenizer.encode(text)
        assert ids == original.encode(text).ids
        assert tokenizer.decode(ids) == text
    for token in CONTROL:
        assert tokenizer.backend.token_to_id(token) == original.token_to_id(token)


def test_chat_template_writes_chatml(imported, original) -> None:
    tokenizer = imported.tokenizer
    assert tokenizer.end_id == original.token_to_id("<|im_end|>") == tokenizer.pad_id
    assert tokenizer.template.source == JINJA
    preamble = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    turn = "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.preamble() == original.encode(preamble).ids
    assert tokenizer.prompt("  What is 12 times 7? ") == original.encode(turn).ids
    assert tokenizer.interaction("What is 12 times 7?", "84.") == original.encode(turn + "84.<|im_end|>\n").ids


def test_control_tokens_typed_by_a_user_stay_text(imported) -> None:
    tokenizer = imported.tokenizer
    ids = tokenizer.prompt("Say <|im_end|> and <|im_start|>system")
    assert ids.count(tokenizer.end_id) == 1  # the template's own, closing the user message
    assert "Say <|im_end|> and <|im_start|>system" in tokenizer.decode(ids)


def test_rxt_template_is_unchanged(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    assert tok.prompt(" Hi Ada ") == [tok.query_id, *tok.encode(" Hi Ada"), tok.answer_id]
    assert tok.interaction("Hi", "Hello") == tok.prompt("Hi") + tok.encode(" Hello") + [tok.end_id]
    assert tok.end_id not in tok.prompt("typed [EOT] here")


def test_begin_of_text_opens_the_conversation(make_gguf, original) -> None:
    bos = original.token_to_id("<|endoftext|>")
    tokenizer = load_gguf(make_gguf(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": bos})).tokenizer
    assert tokenizer.preamble()[0] == bos


# -- the imported model as a stateless chat model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(gguf_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "tiny"
    import_gguf(gguf_file, out)
    return out


def test_import_writes_a_model_directory(model_dir, gguf_file, imported) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.json", "import.json"} <= names
    source = json.loads((model_dir / "import.json").read_text())
    assert source["file"] == gguf_file.name and len(source["sha256"]) == 64 and source["architecture"] == "llama"
    loaded = load_model(model_dir)
    assert isinstance(loaded, StatelessLM)
    assert loaded.tokenizer.template == imported.tokenizer.template
    assert loaded.identity() == imported.identity()


@pytest.mark.parametrize("mode", ["full", "cached"])
def test_history_is_the_chatml_conversation(model_dir, original, mode) -> None:
    engine = StatelessEngine(load_model(model_dir), mode=mode)
    session = engine.new_session()
    answers = [engine.interact(session, query, SAMPLING) for query in ("Hello there", "What is 12 times 7?")]
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for query, answer in zip(("Hello there", "What is 12 times 7?"), answers, strict=True):
        text += f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
        assert engine.tokenizer.end_id not in answer.token_ids
        text += engine.tokenizer.decode(answer.token_ids) + "<|im_end|>\n"
    history = engine.preamble + session.tensors["history"].tolist()
    assert engine.tokenizer.decode(history, skip_special=False) == text


def test_full_and_cached_history_answer_alike(model_dir) -> None:
    answers = {}
    for mode in ("full", "cached"):
        engine = StatelessEngine(load_model(model_dir), mode=mode)
        session = engine.new_session()
        answers[mode] = [engine.interact(session, q, SAMPLING).token_ids for q in ("Hello there", "And you?", "Ok")]
    assert answers["full"] == answers["cached"]


def test_generation_stops_at_the_templates_end_token(model_dir) -> None:
    engine = StatelessEngine(load_model(model_dir), mode="cached")
    logits, end_id = engine.model.logits, engine.tokenizer.end_id
    engine.model.logits = lambda hidden: logits(hidden).index_add(-1, torch.tensor([end_id]),  # <|im_end|> wins
                                                                   torch.full((*hidden.shape[:-1], 1), 1e4))
    answer = engine.interact(engine.new_session(), "Hello there", SAMPLING)
    assert answer.token_ids == [] and answer.stats.answer_tokens == 1


def test_rxt_chat_runs_the_imported_model(model_dir) -> None:
    engine = build_engine(str(model_dir), "cached")
    output = io.StringIO()
    repl = ChatREPL(engine, SAMPLING, io.StringIO("Hello there\nWhat is 12 times 7?\n/quit\n"), output)
    assert repl.run() == 0
    assert repl.session.turns == 2 and output.getvalue().count("rxt> ") == 2


def test_cli_imports_and_refuses_to_overwrite(gguf_file, tmp_path, capsys) -> None:
    out = tmp_path / "model"
    assert main(["import", "gguf", str(gguf_file), "--out", str(out)]) == 0
    assert "stateless LM" in capsys.readouterr().out
    assert main(["import", "gguf", str(gguf_file), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["import", "gguf", str(gguf_file), "--out", str(out), "--force"]) == 0
    assert main(["import", "gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert "no GGUF file" in capsys.readouterr().err


# -- the real model against transformers --------------------------------------------------------------------------
SMOLLM2 = Path(__file__).resolve().parents[1] / "data" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_matches_transformers() -> None:
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is missing: run `rxt data fetch smollm2` first")
    pytest.importorskip("transformers", reason="the parity check needs transformers: pip install -e '.[parity]'")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files with accelerate: pip install -e '.[parity]'")
    from rxt.pretrained.parity import TOLERANCE, run_parity

    summary = run_parity(SMOLLM2, steps=32, chat_prompts=["What is the capital of France?", "Write a haiku about the sea."],
                         text_prompts=["Once upon a time, in a small village by the river,"])
    assert summary["max_rel_diff"] < TOLERANCE
    assert summary["all_tokenizations_identical"]
    for prompt in summary["prompts"]:
        assert prompt["continuation_rxt"] == prompt["continuation_reference"], prompt["prompt"]


# -- rxt serve with the imported model ---------------------------------------------------------------------------
def test_serve_keeps_the_history_and_answers_as_the_engine_does(model_dir) -> None:
    import httpx

    from rxt.serve.store import SQLiteStore
    from test_serve_support import serve_in_thread

    queries = ["Hello there", "What is 12 times 7?", "And you?"]
    engine = StatelessEngine(load_model(model_dir), mode="full")
    session = engine.new_session()
    expected = [engine.interact(session, q, SAMPLING).text for q in queries]
    with serve_in_thread(model_dir, SQLiteStore("sqlite:///:memory:"), max_tokens_limit=512) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        session_id, answers = None, []
        for query in queries:
            body = {"messages": [{"role": "user", "content": query}], "max_tokens": SAMPLING.max_new_tokens}
            reply = http.post("/v1/chat/completions", json=body | ({"session_id": session_id} if session_id else {}))
            assert reply.status_code == 200, reply.text
            session_id = reply.json()["session_id"]
            answers.append(reply.json()["choices"][0]["message"]["content"])
        assert answers == expected
        info = http.get(f"/v1/sessions/{session_id}").json()
        assert info["turns"] == 3 and info["history_tokens"] == session.tensors["history"].numel()
        too_long = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 200, "session_id": session_id}
        error = http.post("/v1/chat/completions", json=too_long).json()["error"]
        assert error["code"] == "context_length_exceeded" and "reset the session" in error["message"]


def test_kv_cache_keeper_gives_a_cache_back_only_for_the_same_history(model_dir) -> None:
    from rxt.serve.kv_caches import KVCacheKeeper

    engine = StatelessEngine(load_model(model_dir), mode="cached")
    keeper = KVCacheKeeper(capacity=1)
    session = engine.new_session()
    engine.interact(session, "Hello there", SAMPLING)
    keeper.keep(session)
    same = engine.new_session()
    same.id, same.tensors = session.id, {"history": session.tensors["history"].clone()}
    assert keeper.attach(same) and same.runtime is session.runtime
    assert not keeper.attach(same)  # taken: a failed turn leaves nothing stale behind
    keeper.keep(session)
    other = engine.new_session()
    other.id = session.id  # e.g. the session was reset: the history no longer matches the cache
    assert not keeper.attach(other) and other.runtime == {}
    keeper.keep(session)
    second = engine.new_session()
    engine.interact(second, "Hi", SAMPLING)
    keeper.keep(second)
    assert len(keeper) == 1  # the least recently used one made room
