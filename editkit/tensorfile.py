"""A standalone safetensors file carrying one JSON document in its metadata, for plugin
artefacts users move between workspaces (a trained reweaver, a synthetic-gradient module).
Written atomically; read without pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from editkit.errors import InvalidRequest


def save_tensor_file(path: str | Path, tensors: dict[str, torch.Tensor], key: str, doc: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={key: json.dumps(doc)})
    tmp.replace(path)


def load_tensor_file(path: str | Path, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, the JSON document under `key`); InvalidRequest naming `what` when the file is
    missing or is not such a file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"{what} {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            doc = json.loads((f.metadata() or {})[key])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, OSError) as exc:
        raise InvalidRequest(f"{path} is not a {what} ({exc})") from None
    return tensors, doc
