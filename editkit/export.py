"""Writing a workspace's edited model as an ordinary Hugging Face checkpoint (`editkit export`,
`Session.export`): loadable by plain `AutoModelForCausalLM.from_pretrained(DIR)`, for serving
with vLLM, TGI or transformers. Only components whose effect is a change of weights can be
written so; each says how through `Component.folded_weights()`, and one that routes or looks
things up at inference refuses with what would be lost."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from editkit.errors import InvalidRequest

if TYPE_CHECKING:
    from editkit.session import Session


def parameter_name(model: torch.nn.Module, param: torch.Tensor) -> str:
    """The name model.named_parameters() gives `param` (tied weights: the first name)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    raise ValueError("not a parameter of this model")


def folded(session: "Session") -> dict[str, torch.Tensor]:
    """Every parameter the workspace's components change, with their effects folded in."""
    updates: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}
    for component in session._components():
        for name, value in component.folded_weights().items():
            if name in updates:
                raise InvalidRequest(f"both {owners[name]} and {component.name} change weight '{name}'; "
                                     "export does not compose two changes of one weight")
            updates[name], owners[name] = value, component.name
    return updates


def model_card(session: "Session") -> str:
    settings = session.settings
    records = session.journal.records(active_only=True)
    lines = ["---", "library_name: transformers", "tags: [editkit, model-editing]", "---", "",
             f"# {Path(settings['model']).name} edited with editkit", "",
             f"- base model: `{settings['model']}` (weights fingerprint `{settings['fingerprint']}`)",
             f"- method: `{settings['method']}` with config `{json.dumps(settings['method_config'], sort_keys=True)}`"]
    for name, intervention in session.interventions.items():
        lines.append(f"- intervention: `{name}` with config "
                     f"`{json.dumps(intervention.config.model_dump(mode='json'), sort_keys=True)}`")
    lines += [f"- edits in force: {len(records)}", "",
              "Scores measured right after each edit (reliability, generalization, locality; "
              "teacher-forced token accuracy, see editkit's docs).", "",
              "| id | prompt | new target | rel | gen | loc |", "|---|---|---|---|---|---|"]

    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    def score(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in records:
        m = r.metrics
        lines.append(f"| {r.id} | {cell(r.request['prompt'])} | {cell(r.request['target_new'])} | "
                     f"{score(m.get('reliability'))} | {score(m.get('generalization'))} | "
                     f"{score(m.get('locality'))} |")
    return "\n".join(lines) + "\n"


def export(session: "Session", out: str | Path) -> Path:
    """Write the edited model (safetensors), its tokenizer and a model card to `out`, which
    must not exist or be empty. Everything is checked first and written to a temporary
    directory renamed into place; the session's model is left exactly as it was."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequest(f"{out} exists and is not an empty directory; choose a new one")
    updates = folded(session)  # refusals come before anything is written
    model = session.loaded.model
    params = dict(model.named_parameters(remove_duplicate=False))
    if any(p.device.type == "meta" for p in params.values()):
        raise InvalidRequest("export writes the whole model from memory; this one has layers offloaded by a "
                             "device map: load it without offloading to export")
    unknown = sorted(set(updates) - set(params))
    if unknown:
        raise InvalidRequest(f"export: no parameters named {', '.join(unknown)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    saved = {name: params[name].detach().clone() for name in updates}
    try:
        with torch.no_grad():
            for name, value in updates.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    try:
        session.loaded.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(session), encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def push_to_hub(folder: str | Path, repo: str, token: str | None = None, private: bool = True) -> str:
    """Upload an exported folder to the Hugging Face Hub (huggingface_hub); returns the URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id=repo, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="Upload model edited with editkit")
    return str(getattr(info, "commit_url", info))
