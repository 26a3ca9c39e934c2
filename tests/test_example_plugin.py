"""The example third-party plugin (examples/editkit-example-plugin).

1. As a user gets it: pip-installed (a real wheel build) into a temporary folder and driven
   through the `editkit` CLI in subprocesses whose PYTHONPATH sees that folder. Nothing is
   installed into the venv, so no other test (or other process using the venv) ever sees the
   plugin; the fixture's teardown deletes the folder, which uninstalls it.
2. Its `bias` editor in-process on the tiny models of every family: edits land, unrelated
   inputs are bit-identical, cached decoding is steered like a full forward, detach removes
   exactly what attach installed, state round-trips through safetensors and bad state is refused.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editkit.errors import EditVetoed, WorkspaceError
from editkit.host import Candidate, PluginHost, builtin_candidates
from editkit.schemas import EditRequest
from editkit.session import Session
from editkit.store import Journal

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "editkit-example-plugin"
DIST = "editkit-example-plugin"
VERSION = "0.1.0"
MAX_ENV = "EDITKIT_EXAMPLE_MAX_TARGET_CHARS"
# " Paris" is one token of the tiny tokenizer: one steering vector can make it exactly.
EDIT = EditRequest(prompt="The capital of Italy is", target_new="Paris")
OTHER = EditRequest(prompt="Who wrote Hamlet?", target_new="Paris")
UNRELATED = "the quick brown fox jumps over the lazy dog"
FAST = {"steps": 12, "lr": 0.5}


def changed(request: EditRequest, **fields) -> EditRequest:
    return EditRequest.model_validate({**request.model_dump(), **fields})


# ---- installed: the CLI in a subprocess ---------------------------------------------------
def _offline_build_possible() -> bool:
    """The example builds with setuptools>=77 (no `wheel` package needed). With it in this
    environment, pip needs no network at all (--no-build-isolation --no-index)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


def _visible_here() -> bool:
    return "example" in {ep.name for ep in importlib.metadata.entry_points(group="editkit")}


PREINSTALLED = _visible_here()


@pytest.fixture(scope="module")
def installed_env(tmp_path_factory):
    """Environment variables for a subprocess that sees the example installed."""
    if PREINSTALLED:
        pytest.skip("an 'example' editkit plugin is already installed in this environment; "
                    "uninstall it (pip uninstall editkit-example-plugin) to run the install tests")
    root = tmp_path_factory.mktemp("example-plugin")
    source, target = root / "source", root / "site"
    # Build from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
           "--quiet", "--target", str(target)]
    if _offline_build_possible():
        cmd += ["--no-build-isolation", "--no-index"]
    # else: pip fetches setuptools from PyPI into an isolated build environment.
    proc = subprocess.run(cmd + [str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    assert (target / f"editkit_example_plugin-{VERSION}.dist-info" / "entry_points.txt").is_file()
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDITKIT_PLUGINS", "EDITKIT_DISABLE_PLUGINS", MAX_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    yield env
    shutil.rmtree(root, ignore_errors=True)  # the uninstall: nothing of it was put anywhere else


def editkit(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI as a user would: the venv's `editkit` script, else its entry function."""
    script = Path(sys.executable).with_name("editkit")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-c", "from editkit.cli.main import main; main()"]
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def test_the_install_stays_out_of_this_environment(installed_env):
    importlib.invalidate_caches()
    assert not _visible_here(), "the example leaked into this environment; other tests would see it"


def test_plugins_lists_the_example(installed_env):
    proc = editkit(installed_env, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    (info,) = [p for p in listing["plugins"] if p["name"] == "example"]
    assert info["version"] == VERSION
    assert info["source"] == f"entry point ({DIST})"
    assert info["registers"] == {"editors": ["bias"], "commands": ["example"]}
    assert not [f for f in listing["failures"] if f["name"] == "example"]


def test_plugin_command_group(installed_env):
    proc = editkit(installed_env, "example", "hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{DIST} {VERSION}"


def test_disable_switch_hides_the_plugin(installed_env):
    proc = editkit({**installed_env, "EDITKIT_DISABLE_PLUGINS": "example"}, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "example" not in {p["name"] for p in json.loads(proc.stdout)["plugins"]}


def test_edit_then_generate_through_the_cli(installed_env, tiny_dirs, tmp_path):
    ws, model = tmp_path / "ws", str(tiny_dirs["gpt2"])
    config = [arg for key, value in FAST.items() for arg in ("--config", f"{key}={value}")]
    proc = editkit(installed_env, "edit", EDIT.prompt, EDIT.target_new, "--method", "bias", *config,
                   "--model", model, "--device", "cpu", "--workspace", str(ws), "--json")
    assert proc.returncode == 0, proc.stderr
    (record,) = json.loads(proc.stdout)
    assert record["method"] == "bias" and record["status"] == "applied"
    assert record["metrics"]["reliability"] == 1.0
    assert record["stats"]["edits"] == 1
    assert json.loads((ws / "workspace.json").read_text())["method_config"]["threshold"] == 0.95
    # A new process: the plugin is found again and its state is loaded from the workspace.
    proc = editkit(installed_env, "generate", EDIT.prompt, "--max-new-tokens", "1", "--workspace", str(ws),
                   "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["text"] == " Paris"


def test_veto_through_the_cli(installed_env, tiny_dirs, tmp_path):
    ws = tmp_path / "ws"
    proc = editkit({**installed_env, MAX_ENV: "3"}, "edit", EDIT.prompt, EDIT.target_new, "--method", "bias",
                   "--model", str(tiny_dirs["gpt2"]), "--device", "cpu", "--workspace", str(ws))
    assert proc.returncode == 1
    assert "vetoed by plugin 'example'" in proc.stderr
    assert f"target is 5 characters long, more than the 3 that {MAX_ENV} allows" in proc.stderr
    assert "Traceback" not in proc.stderr
    if (ws / "journal.sqlite").exists():
        journal = Journal(ws / "journal.sqlite")
        try:
            assert journal.records() == []
        finally:
            journal.close()


# ---- in-process: the bias editor on every family -----------------------------------------
@pytest.fixture(scope="module")
def example():
    """The example's module, imported from its source tree (not installed)."""
    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        yield importlib.import_module("editkit_example_plugin")
    finally:
        sys.path.remove(str(EXAMPLE / "src"))


@pytest.fixture(scope="module")
def host(example):
    host = PluginHost(candidates=builtin_candidates() + [Candidate("example", VERSION, "test", lambda: example)],
                      env={})
    assert "example" in host.plugins, host.failures
    return host


@torch.no_grad()
def logits(loaded, text):
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
    return loaded.model(input_ids=ids).logits


def forward_hooks(model) -> dict[str, list[int]]:
    return {name: list(m._forward_hooks) + list(m._forward_pre_hooks) for name, m in model.named_modules()}


def test_bias_edit_is_precise_and_detaches_exactly(tmp_path, tiny_loaded, tiny_family, host, monkeypatch):
    monkeypatch.delenv(MAX_ENV, raising=False)
    loaded = tiny_loaded[tiny_family]
    hooks, before, before_other = forward_hooks(loaded.model), logits(loaded, UNRELATED), logits(loaded, EDIT.prompt)
    with Session.open(tmp_path / "ws", method="bias", method_config=FAST, loaded=loaded, host=host) as s:
        assert torch.equal(logits(loaded, UNRELATED), before)  # attached, no edits: nothing changes
        (record,) = s.edit(changed(EDIT, locality=[{"prompt": UNRELATED}]))
        assert record.metrics["reliability"] == 1.0 and record.metrics["locality"] == 1.0
        assert record.stats["steps"] == FAST["steps"] and record.stats["slot"] == 0
        assert s.generate(EDIT.prompt, max_new_tokens=1) == [" Paris"]
        assert torch.equal(logits(loaded, UNRELATED), before)  # no key matches: bit-identical
        assert not torch.equal(logits(loaded, EDIT.prompt), before_other)
    assert forward_hooks(loaded.model) == hooks
    assert torch.equal(logits(loaded, EDIT.prompt), before_other)


def test_cached_decoding_is_steered_like_a_full_forward(tmp_path, tiny_loaded, tiny_family, host):
    loaded = tiny_loaded[tiny_family]
    with Session.open(tmp_path / "ws", method="bias", method_config=FAST, loaded=loaded, host=host) as s:
        s.edit(EDIT, measure=False)
        ids = loaded.tokenizer(EDIT.prompt + " Paris Paris", return_tensors="pt").input_ids
        n = len(loaded.tokenizer(EDIT.prompt).input_ids)
        with torch.no_grad():
            full = loaded.model(input_ids=ids).logits
            first = loaded.model(input_ids=ids[:, :n], use_cache=True)
            # transformers >= 5.24 calls the KV cache `cache` (before: `past_key_values`).
            name = "cache" if "cache" in first else "past_key_values"
            rest = loaded.model(input_ids=ids[:, n:], use_cache=True, **{name: first[name]})
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-4, rtol=1e-4)
        # ...and the steering is really there in both (the edit moved these logits a lot).
        s.editor.detach()
        with torch.no_grad():
            plain = loaded.model(input_ids=ids).logits
        s.editor.attach()  # fresh and empty; close() detaches it again
    assert (full[0, n - 1] - plain[0, n - 1]).abs().max() > 1e-2


def test_rollback_and_reedit(tmp_path, tiny_loaded, host):
    loaded = tiny_loaded["llama"]
    base = logits(loaded, EDIT.prompt)
    with Session.open(tmp_path / "ws", method="bias", method_config=FAST, loaded=loaded, host=host) as s:
        s.edit([EDIT, OTHER], measure=False)
        assert s.editor.state_dict()[0]["keys"].shape[0] == 2
        s.rollback(1)
        assert torch.equal(logits(loaded, EDIT.prompt), base)  # its key is gone
        assert s.generate(OTHER.prompt, max_new_tokens=1) == [" Paris"]
        # The same prompt again refines its own vector instead of adding a second key.
        (again,) = s.edit(changed(OTHER, target_new="Berlin"), measure=False)
        assert again.stats["slot"] == 0 and again.stats["edits"] == 1


def test_state_round_trip_and_validation(tmp_path, tiny_loaded, example):
    from safetensors.torch import load_file, save_file

    loaded = tiny_loaded["gpt_neox"]
    editor = example.BiasEditor(loaded, FAST)
    editor.attach()
    try:
        empty_tensors, empty_meta = editor.state_dict()
        editor.apply(EDIT)
        tensors, meta = editor.state_dict()
        assert set(tensors) == {"keys", "vectors"} and tensors["keys"].shape == (1, loaded.adapter.hidden_size)
        assert json.loads(json.dumps(meta)) == meta
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "s.safetensors"))
        save_file(empty_tensors, str(tmp_path / "empty.safetensors"))  # zero edits store fine too
        edited = logits(loaded, EDIT.prompt)
    finally:
        editor.detach()

    fresh = example.BiasEditor(loaded, FAST)
    fresh.attach()
    try:
        fresh.load_state_dict(load_file(str(tmp_path / "s.safetensors")), meta)
        assert torch.equal(logits(loaded, EDIT.prompt), edited)
        good = {k: v.clone() for k, v in tensors.items()}
        bad_states = [
            ({"keys": good["keys"]}, meta),
            ({"keys": good["keys"][:, :8], "vectors": good["vectors"][:, :8]}, meta),
            ({"keys": good["keys"], "vectors": torch.cat([good["vectors"]] * 2)}, meta),
            ({"keys": good["keys"], "vectors": good["vectors"] * float("nan")}, meta),
            (good, {**meta, "layer": meta["layer"] + 1}),
            (good, {**meta, "format": 99}),
        ]
        for bad, bad_meta in bad_states:
            with pytest.raises(WorkspaceError, match="bias state does not fit"):
                fresh.load_state_dict(bad, bad_meta)
            assert torch.equal(logits(loaded, EDIT.prompt), edited)  # refused state changed nothing
        fresh.load_state_dict(load_file(str(tmp_path / "empty.safetensors")), empty_meta)
        assert fresh.state_dict()[0]["keys"].shape[0] == 0
    finally:
        fresh.detach()


def test_config_is_validated(tiny_loaded, example):
    from editkit.errors import InvalidRequest

    for bad in ({"threshold": 1.5}, {"steps": 0}, {"lr": 0}, {"nope": 1}):
        with pytest.raises(InvalidRequest, match="invalid bias config"):
            example.BiasEditor(tiny_loaded["gpt2"], bad)


def test_target_length_policy(tmp_path, tiny_loaded, host, monkeypatch):
    monkeypatch.delenv(MAX_ENV, raising=False)
    assert host.veto(None, EDIT) is None  # unset: no limit
    for value, vetoed in (("5", False), ("4", True), ("", False), ("-1", True), ("five", True)):
        monkeypatch.setenv(MAX_ENV, value)
        result = host.veto(None, EDIT)
        assert (result is not None) == vetoed, (value, result)
        if result:
            assert result[0] == "example" and MAX_ENV in result[1]
    monkeypatch.setenv(MAX_ENV, "4")
    with Session.open(tmp_path / "ws", method="bias", method_config=FAST, loaded=tiny_loaded["gpt2"],
                      host=host) as s:
        with pytest.raises(EditVetoed, match="target is 5 characters long") as info:
            s.edit(EDIT)
        assert info.value.plugin == "example"
        assert s.history() == []
