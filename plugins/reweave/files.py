"""A trained reweaver as one standalone safetensors file: the tensors, and in its metadata the
config, the state's JSON and the model fingerprint it was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from editkit.tensorfile import load_tensor_file, save_tensor_file

KEY = "editkit.reweave"


def save_file(path: str | Path, tensors: dict[str, torch.Tensor], config: dict, meta: dict,
              fingerprint: str | None = None) -> None:
    save_tensor_file(path, tensors, KEY, {"config": config, "state": meta, "fingerprint": fingerprint})


def load_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, {"config", "state", "fingerprint"}) from save_file's output."""
    return load_tensor_file(path, KEY, "reweave file")
