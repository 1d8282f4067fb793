"""One conversation's state: for RxT its Short-Term Memory, for a stateless baseline its history.

A session is saved as safetensors (tensors + a JSON header of metadata; no pickle). The header
carries the model's identity and the tensors' shapes, so state is refused by a model it does not fit,
and a SHA-256 checksum over the header fields and the tensors' bytes, so a flipped bit is caught.
Reading is strict: every header field must have its type and range, and nothing else may be there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
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

FORMAT_VERSION = 2  # 2 added the checksum; format 1 (no checksum) is still read
HEADER_FIELDS = {"format", "model_type", "model_identity", "turns", "id", "created", "shapes", "dtypes", "checksum"}


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
        header["checksum"] = checksum(header, self.tensors)
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
        """Read saved state; SessionStateError names what is wrong with it."""
        try:
            tensors = load_bytes(data)
            header = _read_header(data)
        except (SafetensorError, ValueError, KeyError, TypeError, RecursionError) as error:
            raise SessionStateError("session state is truncated or corrupt (not a readable rxt session file)") from error
        fields = _check_header(header, tensors)
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


def checksum(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the header fields (but the checksum) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _read_header(data: bytes) -> Any:
    length = int.from_bytes(data[:8], "little")
    raw = json.loads(data[8 : 8 + length], parse_constant=_reject_constant)
    return json.loads(raw["__metadata__"]["rxt_session"], parse_constant=_reject_constant)


def _check_header(header: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every field of a session header with its type and range, the tensors it lists, and the checksum."""
    if not isinstance(header, dict) or type(header.get("format")) is not int or header["format"] not in (1, 2):
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise SessionStateError(f"unsupported session format {found!r}")
    expected = HEADER_FIELDS if header["format"] == 2 else HEADER_FIELDS - {"checksum"}
    if set(header) != expected:
        missing, unknown = sorted(expected - set(header)), sorted(set(header) - expected)
        raise SessionStateError(f"session header fields are wrong (missing {missing}, unknown {unknown})")
    for name in ("model_type", "model_identity", "id"):
        if not isinstance(header[name], str) or not 0 < len(header[name]) <= 256:
            raise SessionStateError(f"session header field {name!r} must be a non-empty string")
    turns, created = header["turns"], header["created"]
    if type(turns) is not int or not 0 <= turns < 2**53:
        raise SessionStateError("session header field 'turns' must be a whole number >= 0")
    if type(created) not in (int, float) or not math.isfinite(created) or created < 0:
        raise SessionStateError("session header field 'created' must be a finite time >= 0")
    _check_tensors(header, tensors)
    if header["format"] == 2 and header["checksum"] != checksum(header, tensors):
        raise SessionStateError("session state fails its checksum: it was changed or damaged after it was saved")
    return {"model_type": header["model_type"], "model_identity": header["model_identity"], "turns": turns,
            "id": header["id"], "created": float(created)}


def _check_tensors(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    shapes, dtypes = header["shapes"], header["dtypes"]
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict) or set(shapes) != set(tensors):
        raise SessionStateError(f"session header lists shapes that do not match the file's {sorted(tensors)}")
    if set(dtypes) != set(tensors):
        raise SessionStateError(f"session header lists dtypes that do not match the file's tensors {sorted(tensors)}")
    for name, tensor in tensors.items():
        if shapes[name] != list(tensor.shape):
            raise SessionStateError(f"session tensor {name} has shape {list(tensor.shape)}, header says {shapes[name]}")
        if dtypes[name] != str(tensor.dtype).removeprefix("torch."):
            raise SessionStateError(f"session tensor {name} is {tensor.dtype}, header says {dtypes[name]!r}")
