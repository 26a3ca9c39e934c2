"""A trained reweaver as one standalone safetensors file: the tensors, and in its metadata the
config, the state's JSON and the model fingerprint it was trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from editkit.errors import InvalidRequest

KEY = "editkit.reweave"


def save_file(path: str | Path, tensors: dict[str, torch.Tensor], config: dict, meta: dict,
              fingerprint: str | None = None) -> None:
    from safetensors.torch import save_file as save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": config, "state": meta, "fingerprint": fingerprint}
    tmp = path.with_name(path.name + ".tmp")
    save({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={KEY: json.dumps(doc)})
    tmp.replace(path)


def load_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, {"config", "state", "fingerprint"}) from save_file's output."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"reweave file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            doc = json.loads((f.metadata() or {})[KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, OSError) as exc:
        raise InvalidRequest(f"{path} is not a reweave file ({exc})") from None
    return tensors, doc
