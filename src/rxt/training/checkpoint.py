"""Training checkpoints without pickle: every tensor (weights, optimiser moments, RNG states) goes
into one safetensors file; everything else (steps, learning rates, Python and NumPy RNG positions)
into a JSON skeleton in its header that points at those tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def pack(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """The JSON skeleton of a nested value; its tensors and arrays are moved into ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value)
        return {"__ndarray__": path, "dtype": str(value.dtype)}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"checkpoint keys must be str or int at {path!r}")
        return {"__dict__": [[k, pack(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint {type(value).__name__} at {path!r}")


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, list):
        return [unpack(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__ndarray__" in skeleton:
        return tensors[skeleton["__ndarray__"]].numpy().astype(skeleton["dtype"])
    if "__tuple__" in skeleton:
        return tuple(unpack(v, tensors) for v in skeleton["__tuple__"])
    return {k: unpack(v, tensors) for k, v in skeleton["__dict__"]}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: an interrupted save leaves the previous checkpoint intact."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state, tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"rxt_checkpoint": json.dumps(skeleton)})
    tmp.replace(path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        skeleton = json.loads(handle.metadata()["rxt_checkpoint"])
    return unpack(skeleton, load_file(str(path), device=str(device)))
