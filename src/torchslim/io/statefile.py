"""Nested training state (an optimizer's ``state_dict``, a random generator's state, adapters' weights, history) in
one safetensors file: the tensors as tensors, the structure around them as JSON in the metadata. Nothing is
unpickled on reading; dictionary keys keep their type (an optimizer's state is keyed by integers).

Example:
    >>> import tempfile, torch
    >>> state = {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    >>> path = tempfile.mkdtemp() + "/training.safetensors"
    >>> _ = save_state(state, path)
    >>> load_state_file(path)["state"][0]["momentum_buffer"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from torchslim.core.errors import TorchslimError
from torchslim.core.files import write_atomic

FORMAT = "torchslim-state"
STRUCTURE_KEY = "torchslim.structure"


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise TorchslimError("training state has a mapping with keys other than strings and integers")
        return {"dict": [[type(k).__name__, k, _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_pack(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TorchslimError(f"training state holds a {type(value).__name__}, which a state file does not store")


def _unpack(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise TorchslimError(f"{where}: malformed training-state structure")
    kind, content = next(iter(node.items()))
    if kind == "tensor" and content in tensors:
        return tensors[content]
    if kind == "value" and (content is None or isinstance(content, (bool, int, float, str))):
        return content
    if kind == "list" and isinstance(content, list):
        return [_unpack(item, tensors, where) for item in content]
    if kind == "dict" and isinstance(content, list):
        out: dict[Any, Any] = {}
        for entry in content:
            if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in ("str", "int") and isinstance(entry[1], (str, int))):
                raise TorchslimError(f"{where}: malformed training-state entry")
            out[int(entry[1]) if entry[0] == "int" else str(entry[1])] = _unpack(entry[2], tensors, where)
        return out
    raise TorchslimError(f"{where}: malformed training-state structure ({kind!r})")


def save_state(state: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``state`` (dicts, lists, tensors, numbers, strings, None) to one file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _pack(state, tensors)
    path = Path(path)
    write_atomic(path, safetensors_save(tensors, metadata={"format": FORMAT, STRUCTURE_KEY: json.dumps(structure)}))
    return path


def load_state_file(path: str | os.PathLike[str]) -> Any:
    """The state ``save_state`` wrote (lists come back as lists)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
        structure = json.loads(metadata[STRUCTURE_KEY]) if metadata.get("format") == FORMAT else None
    except Exception as error:  # safetensors and json raise several types for a damaged file
        raise TorchslimError(f"{path}: not a readable training-state file ({type(error).__name__})") from None
    if structure is None:
        raise TorchslimError(f"{path}: not a torchslim training-state file")
    try:
        return _unpack(structure, tensors, str(path))
    except RecursionError:
        raise TorchslimError(f"{path}: training-state structure nested too deeply") from None


__all__ = ["load_state_file", "save_state"]
