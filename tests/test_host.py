"""The plugin host: built-in and third-party plugins load the same way; a broken plugin is
reported by name with its cause while the rest load; the allow/block switches; name clashes;
and the lifecycle hooks as a Session calls them."""

from __future__ import annotations

import types

import pytest
import torch
import typer

from editkit import hookimpl
from editkit.adapters import Adapter
from editkit.components import Editor, Intervention
from editkit.errors import EditVetoed, PluginError, UnknownComponent, UnsupportedArchitecture
from editkit.evaluation import Suite
from editkit.host import BUILTIN_PLUGINS, Candidate, PluginHost, builtin_candidates
from editkit.model import load_model
from editkit.schemas import EditRequest
from editkit.session import Session
from editkit.sites import Site

FT_FAST = {"steps": 2}
EDIT = EditRequest(prompt="The capital of France is", target_new="Rome")


def plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module holding `hooks` (functions already decorated with hookimpl)."""
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, fn)
    return module


def candidate(name: str, module=None, load=None, version: str = "1.0") -> Candidate:
    return Candidate(name, version, f"entry point (editkit-{name})", load or (lambda: module))


def editor_class(editor_name: str) -> type[Editor]:
    return type(f"Editor_{editor_name}", (Editor,), {"name": editor_name})


def editor_plugin(name: str, editor_name: str) -> types.ModuleType:
    cls = editor_class(editor_name)

    @hookimpl
    def register_editors(register):
        register(cls)

    return plugin(name, register_editors=register_editors)


# ---- loading ----------------------------------------------------------------------------
def test_builtins_load_like_any_plugin():
    host = PluginHost(candidates=builtin_candidates(), env={})
    assert set(BUILTIN_PLUGINS) <= set(host.plugins), host.failures
    assert not host.failures
    for name in BUILTIN_PLUGINS:
        assert host.plugins[name].source == "builtin"
    assert host.editor("ft").name == "ft"
    assert {"gpt2", "llama", "gpt_neox"} <= set(host.registry["adapters"])
    assert host.plugins["ft"].registers == {"editors": ["ft"]}


def test_import_error_is_reported_and_the_rest_load():
    def broken():
        raise ImportError("No module named 'missing_dependency'")

    host = PluginHost(candidates=[candidate("broken", load=broken), *builtin_candidates(),
                                  candidate("fine", editor_plugin("fine", "fine-editor"))], env={})
    assert host.failures == {"broken": "ImportError: No module named 'missing_dependency'"}
    assert "broken" not in host.plugins
    assert {"fine", "ft", "adapters"} <= set(host.plugins)
    assert host.editor("fine-editor").name == "fine-editor"
    # Asking for something the broken plugin would have provided names the failure.
    with pytest.raises(UnknownComponent, match=r"unknown editor 'nope'; available: .*fine-editor.*"
                                               r"plugins that failed to load: broken"):
        host.editor("nope")


def test_register_hook_error_is_reported_and_the_rest_load():
    cls = editor_class("half")

    @hookimpl
    def register_editors(register):
        register(cls)

    @hookimpl
    def register_suites(register):
        raise RuntimeError("suite data missing")

    host = PluginHost(candidates=[*builtin_candidates(),
                                  candidate("bad", plugin("bad", register_editors=register_editors,
                                                          register_suites=register_suites)),
                                  candidate("fine", editor_plugin("fine", "fine-editor"))], env={})
    assert host.failures == {"bad": "register_suites failed: RuntimeError: suite data missing"}
    # Everything the failed plugin had registered is withdrawn; the others are untouched.
    assert "bad" not in host.plugins and "half" not in host.registry["editors"]
    assert {"fine", "ft"} <= set(host.plugins)
    assert {"fine-editor", "ft"} <= set(host.registry["editors"])


def test_same_plugin_name_twice_is_a_failure_not_a_crash():
    host = PluginHost(candidates=[candidate("twin", editor_plugin("twin", "a")),
                                  candidate("twin", editor_plugin("twin", "b"))], env={})
    assert host.failures == {"twin": "a plugin named 'twin' is already loaded"}
    assert set(host.registry["editors"]) == {"a"}


def test_allow_and_block_lists():
    cands = [*builtin_candidates(), candidate("extra", editor_plugin("extra", "extra-editor"))]
    only = PluginHost(candidates=cands, env={"EDITKIT_PLUGINS": " adapters, extra "})
    assert set(only.plugins) == {"adapters", "extra"}
    with pytest.raises(UnknownComponent, match="unknown editor 'ft'; available: extra-editor"):
        only.editor("ft")

    blocked = PluginHost(candidates=cands, env={"EDITKIT_DISABLE_PLUGINS": "extra,ft"})
    assert "extra" not in blocked.plugins and "ft" not in blocked.plugins
    assert "adapters" in blocked.plugins and not blocked.failures

    both = PluginHost(candidates=cands, env={"EDITKIT_PLUGINS": "adapters,extra", "EDITKIT_DISABLE_PLUGINS": "extra"})
    assert set(both.plugins) == {"adapters"}  # the block list wins

    everything = PluginHost(candidates=cands, env={"EDITKIT_PLUGINS": "", "EDITKIT_DISABLE_PLUGINS": ""})
    assert set(everything.plugins) == set(BUILTIN_PLUGINS) | {"extra"}


def test_two_plugins_registering_one_editor_name():
    with pytest.raises(PluginError, match="editor 'clash' is registered by two plugins: ") as info:
        PluginHost(candidates=[candidate("first", editor_plugin("first", "clash")),
                               candidate("second", editor_plugin("second", "clash"))], env={})
    # Both are named (in the order the host happened to call their hooks).
    assert "'first'" in str(info.value) and "'second'" in str(info.value)


def test_every_kind_registers_and_is_listed():
    class Prune(Intervention):
        name = "prune"

    class TinySuite(Suite):
        name = "tiny-suite"

    app = typer.Typer()

    @hookimpl
    def register_interventions(register):
        register(Prune)

    @hookimpl
    def register_suites(register):
        register(TinySuite)

    @hookimpl
    def register_commands(register):
        register("tiny", app)

    host = PluginHost(candidates=[candidate("kinds", plugin("kinds", register_interventions=register_interventions,
                                                            register_suites=register_suites,
                                                            register_commands=register_commands))], env={})
    assert host.intervention("prune") is Prune
    assert host.suite("tiny-suite") is TinySuite
    assert host.registry["commands"]["tiny"] == (app, "kinds")
    assert host.plugins["kinds"].registers == {"interventions": ["prune"], "suites": ["tiny-suite"],
                                               "commands": ["tiny"]}
    assert host.plugins["kinds"].source == "entry point (editkit-kinds)"


# ---- adapters ---------------------------------------------------------------------------
class PhiAdapter(Adapter):
    """The adapter of docs/plugins.md ("Adding an architecture"), for a family editkit lacks."""

    name = "phi"
    model_types = ("phi",)
    layers_path = "model.layers"
    embed_path = "model.embed_tokens"
    final_norm_path = "model.final_layernorm"
    unembed_path = "lm_head"
    block_paths = {"mlp": "mlp", "mlp.up": "mlp.fc1", "mlp.down": "mlp.fc2", "attn": "self_attn",
                   "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
                   "attn.out": "self_attn.dense"}
    rotary_path = "model.rotary_emb"


@pytest.fixture(scope="module")
def tiny_phi(tmp_path_factory):
    """A tiny from-config Phi model: an architecture with no built-in adapter."""
    from transformers import AutoModelForCausalLM, PhiConfig

    from editkit.testing import tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-phi")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_unsupported_architecture_names_the_supported_ones(tiny_phi):
    host = PluginHost(candidates=builtin_candidates(), env={})
    with pytest.raises(UnsupportedArchitecture) as info:
        load_model(str(tiny_phi), device="cpu", host=host)
    message = str(info.value)
    assert "no adapter for model_type 'phi'" in message
    supported = message.split("supported: ")[1].split(".")[0].split(", ")
    assert {"gpt2", "llama", "gpt_neox"} <= set(supported)
    assert "register_adapters" in message and "docs/plugins.md" in message


def test_a_plugin_adapter_adds_an_architecture(tiny_phi, tmp_path):
    @hookimpl
    def register_adapters(register):
        register(PhiAdapter)

    host = PluginHost(candidates=[*builtin_candidates(), candidate("phi", plugin("phi", register_adapters=register_adapters))],
                      env={})
    loaded = load_model(str(tiny_phi), device="cpu", host=host)
    assert isinstance(loaded.adapter, PhiAdapter)
    for component in PhiAdapter.block_paths:
        assert isinstance(loaded.adapter.module(Site(component, -1)), torch.nn.Module)
    for component in ("embed", "final_norm", "unembed"):
        assert isinstance(loaded.adapter.module(Site(component)), torch.nn.Module)
    # A built-in method now edits the new architecture.
    with Session.open(tmp_path / "ws", method="ft", method_config=FT_FAST, loaded=loaded, host=host) as s:
        (record,) = s.edit(EDIT, measure=False)
        assert record.status == "applied" and record.stats["steps"] == 2
    with pytest.raises(UnsupportedArchitecture, match="supported: .*phi"):
        host.adapter_for(types.SimpleNamespace(config=types.SimpleNamespace(model_type="rwkv")))


@pytest.fixture(scope="module")
def phi_loaded(tiny_phi):
    @hookimpl
    def register_adapters(register):
        register(PhiAdapter)

    host = PluginHost(candidates=[*builtin_candidates(), candidate("phi", plugin("phi", register_adapters=register_adapters))],
                      env={})
    return load_model(str(tiny_phi), device="cpu", host=host), host


@torch.no_grad()
def _logits(loaded, text="The capital of France is Paris. The quick brown fox"):
    return loaded.model(loaded.tokenizer(text, return_tensors="pt").input_ids).logits


@pytest.mark.parametrize("method, config", [
    ("grace", {"steps": 3}),
    ("wise", {"steps": 3, "n_contexts": 2, "context_lengths": [3], "unrelated_per_edit": 2, "replay": 1}),
    ("nmc", {"fast_steps": 0, "slow_steps": 5}),
])
def test_every_editor_runs_on_a_plugin_architecture(phi_loaded, tmp_path, method, config):
    """The editors reach the model only through the adapter (sites, capture, run_blocks,
    unembed), so an architecture a plugin adds is edited like a built-in one."""
    loaded, host = phi_loaded
    pristine = _logits(loaded, EDIT.prompt)
    with Session.open(tmp_path / "ws", method=method, method_config=config, loaded=loaded, host=host) as s:
        (record,) = s.edit(EDIT, measure=False)
        assert record.status == "applied"
        assert not torch.equal(_logits(loaded, EDIT.prompt), pristine)  # the edit's own prompt changes
    assert torch.equal(_logits(loaded, EDIT.prompt), pristine)  # detached bit-identically


def test_interventions_run_on_a_plugin_architecture(phi_loaded):
    from editkit.plugins.ph3.locate import capture, norm_scale
    from editkit.plugins.reweave.intervention import MemoryReweaving

    loaded, _ = phi_loaded
    pristine = _logits(loaded)
    got = capture(loaded, ["The capital of France is", "Who wrote Hamlet?"], positions=2)
    assert got.z.shape[:3] == (2, loaded.adapter.num_layers, 2) and got.logits.shape[0] == 2
    assert norm_scale(loaded.adapter, got.final).shape == (2, 1)  # the final norm linearises
    rw = MemoryReweaving(loaded, {"capture_layers": [0], "reweave_layer": 1})
    rw.attach()
    try:
        with rw.conversation("c") as buf:
            loaded.model(loaded.tokenizer("The code for the red door is 4821.", return_tensors="pt").input_ids)
            assert len(buf) > 0
    finally:
        rw.detach()
    assert torch.equal(_logits(loaded), pristine)


# ---- lifecycle hooks --------------------------------------------------------------------
def test_veto_reaches_the_user_and_changes_nothing(tmp_path, tiny_loaded):
    seen = []

    @hookimpl
    def before_edit(session, request):
        seen.append((session, request))
        return f"'{request.target_new}' is on the deny list" if request.target_new == "Rome" else None

    host = PluginHost(candidates=[*builtin_candidates(), candidate("policy", plugin("policy", before_edit=before_edit))],
                      env={})
    loaded = tiny_loaded["gpt2"]
    with Session.open(tmp_path / "ws", method="ft", method_config=FT_FAST, loaded=loaded, host=host) as s:
        state_before = {k: v.clone() for k, v in s.editor.state_dict()[0].items()}
        allowed = EditRequest(prompt="Who wrote Hamlet?", target_new="Paris")
        with pytest.raises(EditVetoed) as info:
            s.edit([allowed, EDIT])  # every request is put to the hooks before any is applied
        assert info.value.plugin == "policy"
        assert info.value.reason == "'Rome' is on the deny list"
        assert str(info.value) == "edit vetoed by plugin 'policy': 'Rome' is on the deny list"
        assert s.history() == []
        assert all(v.equal(state_before[k]) for k, v in s.editor.state_dict()[0].items())
        assert [(ses, req) for ses, req in seen] == [(s, allowed), (s, EDIT)]


def test_after_edit_and_after_rollback_receive_the_right_arguments(tmp_path, tiny_loaded):
    calls = []

    @hookimpl
    def after_edit(session, request, record):
        calls.append(("after_edit", session, request, record.id, record.status, len(session.history())))

    @hookimpl
    def after_rollback(session, edit_id):
        calls.append(("after_rollback", session, edit_id, session.history()[edit_id - 1].status))

    @hookimpl
    def before_edit(request):  # a hook may take a subset of the arguments
        calls.append(("before_edit", request))

    host = PluginHost(candidates=[*builtin_candidates(),
                                  candidate("audit", plugin("audit", after_edit=after_edit, after_rollback=after_rollback,
                                                            before_edit=before_edit))], env={})
    second = EditRequest(prompt="Who wrote Hamlet?", target_new="Paris")
    with Session.open(tmp_path / "ws", method="ft", method_config=FT_FAST, loaded=tiny_loaded["llama"], host=host) as s:
        s.edit([EDIT, second], measure=False)
        s.rollback(1)
    assert calls == [
        ("before_edit", EDIT), ("before_edit", second),
        ("after_edit", s, EDIT, 1, "applied", 1),  # called once the edit is journaled
        ("after_edit", s, second, 2, "applied", 2),
        ("after_rollback", s, 1, "rolled_back"),
    ]
