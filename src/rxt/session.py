"""One conversation's state: for RxT its Short-Term Memory, for a stateless baseline its history.

A session is saved as safetensors (tensors + a JSON header of metadata; no pickle). The header
carries the model's identity and the tensors' shapes, so state is refused by a model it does not fit.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

FORMAT_VERSION = 1


class SessionStateError(ValueError):
    """Saved state that is corrupt or does not fit the model it is loaded into."""


@dataclass
class TurnStats:
    turn: int
    prompt_tokens: int  # tokens the model read in the prompt phase (history included for baselines)
    answer_tokens: int
    time_to_first_token_s: float
    answer_s: float  # from the call to the last answer token
    memory_update_s: float | None = None  # RxT only; filled in when the background update ends
    tokens_processed: int = 0  # prompt + answer (+ the memory encoder's input for RxT)
    state_bytes: int = 0  # STM bytes (RxT) or KV cache bytes (cached baseline) after the turn


@dataclass
class Session:
    """State and metadata of one conversation. Create through an engine's ``new_session``."""

    model_type: str
    model_identity: str
    tensors: dict[str, torch.Tensor]
    turns: int = 0
    id: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    created: float = field(default_factory=time.time)
    stats: list[TurnStats] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict, repr=False)  # not saved (e.g. KV caches)
    pending: Future | None = field(default=None, repr=False)  # background memory update

    def wait(self) -> None:
        """Block until the background memory update (if any) is done; re-raise its error here."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def metadata(self) -> dict[str, str]:
        shapes = {name: list(t.shape) for name, t in self.tensors.items()}
        dtypes = {name: str(t.dtype).removeprefix("torch.") for name, t in self.tensors.items()}
        header = {
            "format": FORMAT_VERSION,
            "model_type": self.model_type,
            "model_identity": self.model_identity,
            "turns": self.turns,
            "id": self.id,
            "created": self.created,
            "shapes": shapes,
            "dtypes": dtypes,
        }
        return {"rxt_session": json.dumps(header)}

    def to_bytes(self) -> bytes:
        self.wait()
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.tensors.items()}
        return save_bytes(tensors, metadata=self.metadata())

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash mid-write never leaves a torn file in place of a good one."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> Session:
        try:
            tensors = load_bytes(data)
            header = _read_header(data)
        except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as error:
            raise SessionStateError(f"session state is truncated or corrupt: {error}") from error
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            found = header.get("format") if isinstance(header, dict) else header
            raise SessionStateError(f"unsupported session format {found!r}")
        try:
            shapes = dict(header["shapes"])
            fields = dict(
                model_type=str(header["model_type"]),
                model_identity=str(header["model_identity"]),
                turns=int(header["turns"]),
                id=str(header["id"]),
                created=float(header["created"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise SessionStateError(f"session header is incomplete or malformed: {error!r}") from error
        for name, tensor in tensors.items():
            if list(tensor.shape) != shapes.get(name):
                raise SessionStateError(f"session tensor {name} has shape {list(tensor.shape)}, header says "
                                        f"{shapes.get(name)}")
        return cls(tensors={name: t.to(device) for name, t in tensors.items()}, **fields)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> Session:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no session file at {path}")
        return cls.from_bytes(path.read_bytes(), device)

    def fork(self) -> Session:
        """A new, independent conversation that starts from this one's state."""
        self.wait()
        runtime = copy.deepcopy(self.runtime)  # e.g. a list of KV caches: the fork must not append to the parent's
        return Session(
            model_type=self.model_type,
            model_identity=self.model_identity,
            tensors={name: t.clone() for name, t in self.tensors.items()},
            turns=self.turns,
            runtime=runtime,
        )

    def replace_with(self, other: Session) -> None:
        """Take another session's state in place (used by restore: validated before anything changes)."""
        self.wait()
        self.model_type, self.model_identity = other.model_type, other.model_identity
        self.tensors, self.turns, self.runtime = other.tensors, other.turns, other.runtime
        self.stats = []

    def state_bytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.tensors.values())


def _read_header(data: bytes) -> dict[str, Any]:
    length = int.from_bytes(data[:8], "little")
    raw = json.loads(data[8 : 8 + length])
    return json.loads(raw["__metadata__"]["rxt_session"])
