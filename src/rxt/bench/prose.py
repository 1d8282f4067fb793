"""Real prose as fixed token streams for `rxt bench quality`: shards -> BPE tokenizer -> cached .npy.

The shards are UTF-8 text files with paragraphs separated by blank lines (what `rxt data fetch`
writes under data/prose/train and data/prose/valid). Every paragraph is encoded with its closing
blank line, and the paragraphs of all shards, in sorted file order, make one stream of token ids.

The streams are cached under a key that hashes the shards' contents and the tokenizer (its
vocabulary size when it is trained here, its file when one is given), so every variant and seed of
a benchmark, and every later resume of it, reads exactly the same tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from rxt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the way text becomes tokens changes: old caches are then not reused
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class TokenStreams:
    """Where the cached streams of one (shards, tokenizer) pair live, and their sizes."""

    key: str
    directory: Path
    vocab_size: int
    train_tokens: int
    valid_tokens: int

    @property
    def train_path(self) -> Path:
        return self.directory / "train.npy"

    @property
    def valid_path(self) -> Path:
        return self.directory / "valid.npy"

    def load(self, split: str) -> np.ndarray:
        """The token ids of ``split`` ("train" or "valid"), memory-mapped (read-only)."""
        return np.load(self.directory / f"{split}.npy", mmap_mode="r")


def find_shards(spec: str | Path, split: str) -> list[Path]:
    """The .txt shards named by a directory, a glob or one file. Raises FileNotFoundError if none."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        shards = sorted(path.glob("*.txt"))
    elif glob.has_magic(text):
        shards = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
    else:
        shards = [path] if path.is_file() else []
    if not shards:
        raise FileNotFoundError(
            f"no {split} shards at {text} (expected .txt files of paragraphs separated by blank lines); "
            f"run `rxt data fetch` to download real prose, or point --{split} at a directory or glob of .txt files"
        )
    return shards


def paragraphs(path: Path) -> list[str]:
    """The paragraphs of one shard, each with the blank line that closes it."""
    text = path.read_text(encoding="utf-8")
    return [p.strip() + "\n\n" for p in PARAGRAPH_BREAK.split(text) if p.strip()]


def prepare_streams(
    train: list[Path],
    valid: list[Path],
    cache: Path,
    vocab_size: int = 4096,
    tokenizer_dir: Path | None = None,
) -> TokenStreams:
    """Tokenize the shards once (training the tokenizer on the train shards unless one is given).

    A second call with the same shards and tokenizer settings only reads the cache.
    """
    tokenizer_file = _tokenizer_file(tokenizer_dir) if tokenizer_dir is not None else None
    key = cache_key(train, valid, vocab_size, tokenizer_file)
    directory = Path(cache) / key
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log.info("token streams from the cache %s", directory)
        return TokenStreams(key, directory, meta["vocab_size"], meta["train_tokens"], meta["valid_tokens"])
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_file is not None:
        tokenizer = Tokenizer.load(tokenizer_file)
    else:
        log.info("training a %d-token BPE tokenizer on %d train shard(s)", vocab_size, len(train))
        tokenizer = Tokenizer.train(_all_paragraphs(train), vocab_size=vocab_size)
    tokenizer.save(directory)
    sizes = {}
    for split, shards in (("train", train), ("valid", valid)):
        ids = encode_shards(tokenizer, shards)
        _save_atomically(directory / f"{split}.npy", ids)
        sizes[split] = int(ids.size)
        log.info("%s: %d shard(s) -> %d tokens", split, len(shards), ids.size)
    meta = {
        "format": CACHE_FORMAT,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": sizes["train"],
        "valid_tokens": sizes["valid"],
        "train_shards": [str(p) for p in train],
        "valid_shards": [str(p) for p in valid],
        "tokenizer": str(tokenizer_file) if tokenizer_file else f"trained here, vocab_size={vocab_size}",
    }
    _write_text_atomically(meta_path, json.dumps(meta, indent=2) + "\n")  # written last: marks the cache whole
    return TokenStreams(key, directory, tokenizer.vocab_size, sizes["train"], sizes["valid"])


def encode_shards(tokenizer: Tokenizer, shards: list[Path]) -> np.ndarray:
    """One stream of token ids: every paragraph of every shard, in order."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    plain = HFTokenizer.from_str(tokenizer.backend.to_str())
    plain.encode_special_tokens = True  # prose is text: an "[EOT]" in it is five characters, not the token
    parts = []
    for shard in shards:
        encodings = plain.encode_batch(paragraphs(shard), add_special_tokens=False)
        parts += [np.asarray(e.ids, dtype=dtype) for e in encodings]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def cache_key(train: list[Path], valid: list[Path], vocab_size: int, tokenizer_file: Path | None) -> str:
    """A hash of everything the token streams depend on."""
    digest = hashlib.sha256(f"rxt-prose-{CACHE_FORMAT}".encode())
    if tokenizer_file is not None:
        digest.update(b"tokenizer:" + tokenizer_file.read_bytes())
    else:
        digest.update(f"vocab_size:{vocab_size}".encode())
    for split, shards in (("train", train), ("valid", valid)):
        for shard in shards:
            digest.update(f"{split}:{shard.name}:".encode())
            digest.update(hashlib.sha256(shard.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _tokenizer_file(tokenizer_dir: Path) -> Path:
    path = Path(tokenizer_dir)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (--tokenizer takes a directory holding tokenizer.json)")
    return path


def _all_paragraphs(shards: list[Path]) -> Iterator[str]:
    for shard in shards:
        yield from paragraphs(shard)


def _save_atomically(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(partial, array)
    os.replace(partial, path)


def _write_text_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)
