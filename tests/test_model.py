"""Model loading: local directories, options, and clear errors."""

import pytest
import torch

from editkit.errors import ModelLoadError
from editkit.model import load_model


def test_local_directory_loads_with_adapter(tiny_dirs, tiny_family):
    loaded = load_model(str(tiny_dirs[tiny_family]), device="cpu")
    assert loaded.adapter.config.model_type == tiny_family
    assert loaded.device == torch.device("cpu")
    assert not any(p.requires_grad for p in loaded.model.parameters())  # base weights are frozen
    assert loaded.tokenizer.pad_token_id is not None


def test_fingerprint_tells_weights_apart(tmp_path, tiny_dirs):
    from editkit.testing import save_tiny_model

    other = save_tiny_model("llama", tmp_path / "other", seed=1)
    assert load_model(str(other), device="cpu").fingerprint != load_model(str(tiny_dirs["llama"]), device="cpu").fingerprint
    assert load_model(str(tiny_dirs["llama"]), device="cpu").fingerprint == load_model(str(tiny_dirs["llama"]), device="cpu").fingerprint


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
])
def test_bad_options(tiny_dirs, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(tiny_dirs["gpt2"]), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(tiny_dirs):
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_model(str(tiny_dirs["gpt2"]), device="cuda")


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(tmp_path / "nothing-here"))
