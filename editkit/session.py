"""A session: one model, one editing method and a workspace directory that journals every
edit. Reopening a workspace restores exactly the state it was closed with."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from editkit import legacy
from editkit.chunks import ChunkStore
from editkit.components import Editor, Intervention, describe_validation_error
from editkit.errors import EditVetoed, InvalidRequest, WorkspaceError
from editkit.generation import Decoded, Row, check_fits, decode as _decode, read_ahead
from editkit.host import PluginHost, get_host
from editkit.model import DEFAULT_ALIASES, DEFAULT_MODEL, LoadedModel, load_model
from editkit.limits import check_sampling, check_seed, check_texts, max_prompt_chars
from editkit.schemas import EditRequest
from editkit.scoring import item_baselines, journal_figures, measure_items
from editkit.store import EditRecord, Journal, atomic_write_text, checkpoint_spacing

# What a new workspace edits with unless told otherwise; docs/wise.md gives its measured figures.
DEFAULT_METHOD = "wise"
WORKSPACE_FORMAT = 2  # 1: state as whole directories (journal schema 1); migrated on open
EDITOR_STATE = "editor"
INTERVENTION_STATE = "intervention."  # + name; its JSON holds {"config": ..., "state": ...}
# Tokens an edit's texts leave free in the model's context: a method's context prefix (WISE:
# up to 10 tokens) and the 8 tokens generated for a locality probe without an answer.
EDIT_CONTEXT_ROOM = 16


def _model_key(name: str | None) -> str:
    """How a workspace records its model: a local directory by absolute path, so `./m`
    and `m/` name one model."""
    if name is None or name in DEFAULT_ALIASES:
        return DEFAULT_MODEL
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def as_request(value: EditRequest | dict, index: int | None = None) -> EditRequest:
    if isinstance(value, EditRequest):
        return value
    try:
        return EditRequest.model_validate(value)
    except ValidationError as exc:
        where = "edit request" if index is None else f"edit request {index}"
        raise InvalidRequest(describe_validation_error(exc, where)) from None


def request_seed(request: EditRequest) -> int:
    """Seed derived from the request itself, so a replay trains exactly as the original did."""
    digest = hashlib.sha256(request.model_dump_json().encode()).digest()
    return int.from_bytes(digest[:4], "little")


def turn_seed(requests: list[EditRequest]) -> int:
    """A turn's seed: its request's own for a turn of one, else one derived from them all."""
    if len(requests) == 1:
        return request_seed(requests[0])
    digest = hashlib.sha256("\n".join(r.model_dump_json() for r in requests).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _turns(records: list[EditRecord]) -> list[list[EditRecord]]:
    """Consecutive records of one turn, grouped."""
    groups: list[list[EditRecord]] = []
    for record in records:
        if groups and groups[-1][-1].turn == record.turn:
            groups[-1].append(record)
        else:
            groups.append([record])
    return groups


class Session:
    # The longest prompt or target accepted by edit() and generate(); None: the shared
    # default, $EDITKIT_MAX_PROMPT_CHARS or 4000 (editkit.limits). The service sets its own.
    max_prompt_chars: int | None = None

    def __init__(self, workspace: Path, settings: dict[str, Any], loaded: LoadedModel, editor: Editor,
                 journal: Journal, chunks: ChunkStore, bases: dict[str, dict],
                 interventions: dict[str, Intervention], host: PluginHost, lock_file, readonly: bool):
        self.workspace = workspace
        self.interventions = interventions  # name -> attached intervention, in attach order
        self.settings = settings
        self.loaded = loaded
        self.editor = editor
        self.journal = journal
        self.chunks = chunks
        self._bases = bases  # each component's part of the head manifest: the base of the next write
        self.host = host
        self.readonly = readonly
        self._lock_file = lock_file
        self._closed = False
        self.head_id = 0  # the journal's id of the state this session holds
        self.following = False
        self._held: dict = {}

    # ---- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, workspace: str | Path, *, model: str | None = None, method: str | None = None,
             method_config: dict | None = None, device: str = "auto", dtype: str | None = None,
             device_map: str | dict | None = None, checkpoint_every: int = 10, create: bool = True,
             readonly: bool = False, follow: bool = False, loaded: LoadedModel | None = None,
             host: PluginHost | None = None) -> "Session":
        """Open (or create) the workspace. Everything is checked before anything is written.

        A new workspace is built in a temporary directory beside it and renamed into place, so
        a failed first open leaves nothing behind, and an open only ever removes what it made.
        `readonly` opens an existing workspace for generation only: it writes nothing (no lock
        file, no sweep), so it works on a read-only copy; edits and rollbacks are refused.
        `follow` is read-only without the lock, beside a writer that keeps editing: poll() and
        switch() bring in the heads it commits (a read replica)."""
        readonly = readonly or follow
        ws = Path(workspace)
        host = host or get_host()
        if ws.exists() and not ws.is_dir():
            raise WorkspaceError(f"{ws} exists and is not a directory")
        wanted = loaded.name if loaded is not None and model is None else model
        if (ws / "workspace.json").exists():
            settings = read_settings(ws)
            editor_cls, config = _check_reopen(ws, settings, host, wanted, method, method_config)
            lock_file = None if follow else _lock(ws, shared=readonly)
            try:
                if loaded is None:
                    loaded = load_model(settings["model"], device=device, dtype=dtype,
                                        device_map=device_map, host=host)
                if loaded.fingerprint != settings["fingerprint"]:
                    raise WorkspaceError(f"workspace {ws} was made with different weights for model "
                                         f"'{settings['model']}' (fingerprint {settings['fingerprint']}, "
                                         f"loaded {loaded.fingerprint})")
                parts = _open_parts(ws, settings, loaded, editor_cls, config, host, readonly, follow)
            except BaseException:
                if lock_file is not None:
                    lock_file.close()
                raise
            session = cls(ws, settings, loaded, *parts[:5], host, lock_file, readonly)
            session.head_id, session.following = parts[5], follow
            session._held = parts[6] if follow else {}  # a follower keeps it, to fall back on
            return session

        if not create or readonly:
            raise WorkspaceError(f"no workspace at {ws} (create one with `editkit edit ... --workspace {ws}`)")
        if ws.exists() and any(ws.iterdir()):
            raise WorkspaceError(f"{ws} is a non-empty directory that is not an editkit workspace "
                                 "(no workspace.json); choose a new or empty directory")
        if checkpoint_every < 1:
            raise InvalidRequest("checkpoint_every must be at least 1")
        method = method or DEFAULT_METHOD
        editor_cls = host.editor(method)
        config = editor_cls.make_config(method_config)
        if loaded is None:
            loaded = load_model(wanted, device=device, dtype=dtype, device_map=device_map, host=host)
        settings = {"format": WORKSPACE_FORMAT, "model": _model_key(wanted), "fingerprint": loaded.fingerprint,
                    "method": method, "method_config": config.model_dump(mode="json"),
                    "checkpoint_every": checkpoint_every, "created_at": time.time()}
        existed = ws.exists()
        lock_file = _create_workspace(ws, settings)
        try:
            parts = _open_parts(ws, settings, loaded, editor_cls, config, host, readonly=False)
        except BaseException:
            lock_file.close()
            _remove_created(ws, existed)
            raise
        session = cls(ws, settings, loaded, *parts[:5], host, lock_file, readonly=False)
        session.head_id = parts[5]
        return session

    def close(self) -> None:
        """Detach the editor (the model is as loaded) and release the workspace."""
        if self._closed:
            return
        self._closed = True
        for intervention in reversed(self.interventions.values()):
            intervention.detach()
        self.editor.detach()
        self.journal.close()
        if self._lock_file is not None:
            self._lock_file.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_writable(self, action: str) -> None:
        if self.readonly:
            raise WorkspaceError(f"workspace {self.workspace} is open read-only; cannot {action}")

    @property
    def method(self) -> str:
        return self.settings["method"]

    # ---- editing -----------------------------------------------------------------------
    def edit(self, requests: EditRequest | dict | list, measure: bool = True,
             on_applied: Callable[[EditRecord], None] | None = None) -> list[EditRecord]:
        """Apply requests in order, each journaled as its own entry. All are validated and put
        to the plugins' before_edit hooks before the first one changes anything. For an editor
        that edits in turns (`edits_in_turns`) the requests of one call are one turn, applied
        together; otherwise each request is a turn of its own."""
        self._check_writable("edit")
        items = requests if isinstance(requests, list) else [requests]
        reqs = [as_request(r, i if len(items) > 1 else None) for i, r in enumerate(items)]
        if not reqs:
            raise InvalidRequest("no edit requests given")
        limit = self.prompt_limit()
        for i, req in enumerate(reqs):
            where = f"edit request {i}: " if len(reqs) > 1 else ""
            check_texts(((where + field, text) for field, text in req.texts()), limit)
            check_fits(self.loaded, ((where + field, text, EDIT_CONTEXT_ROOM) for field, text in _sequences(req)))
        for req in reqs:
            veto = self.host.veto(self, req)
            if veto:
                raise EditVetoed(*veto)
        turns = [reqs] if self.editor.edits_in_turns else [[req] for req in reqs]
        records = []
        for turn in turns:
            for record in self._apply_turn(turn, measure):
                records.append(record)
                if on_applied is not None:
                    on_applied(record)
        return records

    def _apply_turn(self, reqs: list[EditRequest], measure: bool) -> list[EditRecord]:
        baselines = item_baselines(self.loaded, reqs) if measure else None
        try:
            started = time.perf_counter()
            stats = self._run_turn(self.editor, reqs)
            seconds = (time.perf_counter() - started) / len(reqs)
            metrics = ([journal_figures(m) for m in measure_items(self.loaded, reqs, baselines)] if measure
                       else [{}] * len(reqs))
            manifest = self._write_state(self.editor, self._bases)
            entries = [(r.model_dump(mode="json"), self.method, m, {**s, "seconds": seconds})
                       for r, m, s in zip(reqs, metrics, stats)]
            records, dead = self.journal.commit_turn(entries, manifest, self.chunks, self.settings["checkpoint_every"])
        except BaseException:
            self._discard_unsaved()
            self.editor = self._editor_from_head(self.editor)  # nothing half-applied stays in the model
            raise
        self._saved(manifest, dead)
        for req, record in zip(reqs, records):
            self.host.notify("after_edit", session=self, request=req, record=record)
        return records

    def _run_turn(self, editor: Editor, reqs: list[EditRequest]) -> list[dict[str, Any]]:
        """Apply one turn under a seed derived from its requests, so a replay is exact."""
        device = self.loaded.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(turn_seed(reqs))
            if not editor.edits_in_turns:
                (req,) = reqs
                return [dict(editor.apply(req))]
            stats = [dict(s) for s in editor.apply_turn(reqs)]
        if len(stats) != len(reqs):
            raise RuntimeError(f"{self.method}.apply_turn returned {len(stats)} stats for {len(reqs)} requests")
        return stats

    # ---- state -------------------------------------------------------------------------
    def _keyed(self, editor: Editor) -> dict[str, Editor | Intervention]:
        """The components whose state the workspace records, by state key."""
        return {EDITOR_STATE: editor, **{INTERVENTION_STATE + n: i for n, i in self.interventions.items()}}

    def _states(self, editor: Editor):
        """Everything the workspace head records: the editor and each intervention."""
        states = {}
        for key, component in self._keyed(editor).items():
            tensors, meta = component.state_dict()
            if key != EDITOR_STATE:
                meta = {"config": component.config.model_dump(mode="json"), "state": meta}
            states[key] = (tensors, meta)
        return states

    def _write_state(self, editor: Editor, bases: dict[str, dict]) -> dict:
        """Chunks of every component's state (only what changed since `bases`); the manifest."""
        changes = {key: c.changes if c.tracks_changes else None for key, c in self._keyed(editor).items()}
        return self.chunks.write(self._states(editor), bases, changes)

    def _saved(self, manifest: dict, dead: list[str]) -> None:
        """The journal committed `manifest` as the head: it is the base of the next write."""
        self._bases = manifest["components"]
        for component in self._components():
            component.changes.clear()
        self.chunks.remove(dead + self.journal.unreferenced(self.chunks.written))
        self.chunks.written = []

    def _discard_unsaved(self) -> None:
        """Delete the chunk files a failed write or commit created (no state names them)."""
        self.chunks.remove(self.chunks.written)
        self.chunks.written = []

    def _editor_from_head(self, old: Editor) -> Editor:
        """A fresh editor holding the head state, in place of `old`."""
        old.detach()
        fresh = type(old)(self.loaded, old.config)
        fresh.attach()
        manifest = self.journal.head()
        if manifest is not None:
            fresh.load_state_dict(*self.chunks.read(manifest)[EDITOR_STATE])
        fresh.changes.clear()
        return fresh

    def _commit_head(self) -> None:
        try:
            manifest = self._write_state(self.editor, self._bases)
            dead = self.journal.commit_head(manifest, self.chunks)
        except BaseException:
            self._discard_unsaved()
            raise
        self._saved(manifest, dead)

    # ---- interventions -----------------------------------------------------------------
    def add_intervention(self, name: str, config: dict | None = None,
                         state: tuple[dict, dict] | None = None) -> Intervention:
        """Attach intervention `name` (with a state from its own calibration or training, if
        any) and record it in the workspace; it stays attached across reopenings."""
        self._check_writable("attach an intervention")
        if name in self.interventions:
            raise InvalidRequest(f"intervention '{name}' is already attached; remove it first")
        intervention = self.host.intervention(name)(self.loaded, config)
        intervention.attach()
        try:
            if state is not None:
                intervention.load_state_dict(*state)
            self.interventions[name] = intervention
            self._commit_head()
        except BaseException:
            self.interventions.pop(name, None)
            intervention.detach()
            raise
        return intervention

    def remove_intervention(self, name: str) -> None:
        """Detach intervention `name` and drop it from the workspace."""
        self._check_writable("remove an intervention")
        if name not in self.interventions:
            attached = ", ".join(self.interventions) or "none"
            raise InvalidRequest(f"intervention '{name}' is not attached (attached: {attached})")
        intervention = self.interventions.pop(name)
        intervention.detach()
        try:
            self._commit_head()
        except BaseException:
            intervention.attach()
            intervention.load_state_dict(*intervention.state_dict())
            self.interventions[name] = intervention
            raise

    # ---- rollback ----------------------------------------------------------------------
    def rollback(self, edit_id: int) -> EditRecord:
        """Rebuild the editor state without edit `edit_id`: from the newest checkpoint taken
        before it, replaying the later active edits turn by turn with their original seeds (a
        turn that held the edit is solved again without it). Checkpoints are taken along the
        replay as along the original stream."""
        self._check_writable("roll back")
        record = self.journal.record(edit_id)
        if record is None:
            raise InvalidRequest(f"no edit with id {edit_id}")
        if record.status != "applied":
            raise InvalidRequest(f"edit {edit_id} is already rolled back")
        every = self.settings["checkpoint_every"]
        newest = self.journal.last_id()
        base = self.journal.checkpoint_before(edit_id)
        last = base[0] if base else 0
        replay = [r for r in self.journal.records(active_only=True, after=last) if r.id != edit_id]

        old = self.editor
        old.detach()
        fresh = type(old)(self.loaded, old.config)
        fresh.attach()
        try:
            bases = dict(self._bases)
            bases.pop(EDITOR_STATE, None)
            if base:
                fresh.load_state_dict(*self.chunks.read(base[1])[EDITOR_STATE])
                bases[EDITOR_STATE] = base[1]["components"][EDITOR_STATE]
            fresh.changes.clear()
            rebuilt = []
            for turn in _turns(replay):
                self._run_turn(fresh, [EditRequest.model_validate(r.request) for r in turn])
                if turn[-1].id - last >= checkpoint_spacing(newest - turn[-1].id, every):
                    manifest = self._write_state(fresh, bases)
                    bases[EDITOR_STATE] = manifest["components"][EDITOR_STATE]
                    fresh.changes.clear()
                    rebuilt.append((turn[-1].id, manifest))
                    last = turn[-1].id
            manifest = self._write_state(fresh, bases)
            dead = self.journal.commit_rollback(edit_id, manifest, rebuilt, self.chunks, every)
        except BaseException:
            self._discard_unsaved()
            fresh.detach()
            old.attach()
            self.editor = self._editor_from_head(old)
            raise
        self.editor = fresh
        self._saved(manifest, dead)
        self.host.notify("after_rollback", session=self, edit_id=edit_id)
        return self.journal.record(edit_id)

    # ---- following a writer ------------------------------------------------------------
    def poll(self):
        """For a following session: the head its writer committed since, read from the chunks
        (only those that changed are read), or None when the head is the same."""
        state_id, manifest = self.journal.head_state()
        if state_id == self.head_id:
            return None
        return state_id, (self.chunks.read(manifest, reuse=True) if manifest else {})

    def switch(self, polled) -> None:
        """Hold the head poll() read: the components are rebuilt with it. Call it with the model
        idle (the service takes its write lock), so a generation sees one head, never a mixture."""
        state_id, states = polled
        old_editor, old_interventions = self.editor, self.interventions
        for intervention in reversed(old_interventions.values()):
            intervention.detach()
        old_editor.detach()
        try:
            self.editor, self.interventions = _attach_states(self.loaded, type(old_editor), old_editor.config,
                                                             states, self.host)
        except BaseException:  # keep serving the head held before
            self.editor, self.interventions = _attach_states(self.loaded, type(old_editor), old_editor.config,
                                                             self._held, self.host)
            raise
        self.head_id, self._held = state_id, states

    # ---- leaving editkit ---------------------------------------------------------------
    def export(self, out: str | Path) -> Path:
        """Write the edited model as a plain Hugging Face checkpoint (safetensors), with its
        tokenizer and a model card listing the edits; see editkit.export."""
        from editkit.export import export

        return export(self, out)

    # ---- reading -----------------------------------------------------------------------
    def history(self, active_only: bool = False) -> list[EditRecord]:
        return self.journal.records(active_only=active_only)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, conversation: str | None = None) -> list[str]:
        """Continuations of `prompts` with the edits in force (one random stream from `seed`
        for the whole call when sampling). With `conversation`, components that keep runtime
        memory per conversation (memory reweaving) read and extend that conversation's memory;
        without it they stay inert."""
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [Row(p, max_new_tokens, temperature, top_p, stream=0, seed=seed) for p in items]
        return [d.text for d in self.decode(rows, conversation)]

    def decode(self, rows: list[Row], conversation: str | None = None, on_token=None,
               cancelled=None) -> list[Decoded]:
        """Continue each row (its own prompt, length, sampling, stream and stop strings) in one
        batch; see editkit.generation.decode. Checked first (check_rows)."""
        self.check_rows(rows, conversation)
        if conversation is None:
            return _decode(self.loaded, rows, on_token, cancelled)
        with ExitStack() as stack:
            for component in self._components():
                stack.enter_context(component.conversation(conversation))
            size = self.chunk_tokens()
            if size:
                rows = read_ahead(self.loaded, rows, size)
            return _decode(self.loaded, rows, on_token, cancelled)

    def chunk_tokens(self) -> int | None:
        """Within a conversation, inputs longer than this are read chunk by chunk (the
        smallest chunk any attached component asks for; None: read whole)."""
        sizes = [n for n in (c.chunk_tokens() for c in self._components()) if n]
        return min(sizes) if sizes else None

    def check_rows(self, rows: list[Row], conversation: str | None = None) -> None:
        """InvalidRequest unless every row can be decoded: a prompt within the limit and the
        model's context, valid sampling values and seed, a valid conversation id."""
        if not rows:
            raise InvalidRequest("no prompts given")
        if any(not r.prompt or not r.prompt.strip() for r in rows):
            raise InvalidRequest("prompt must not be empty")
        name = (lambda i: f"prompt {i}") if len(rows) > 1 else (lambda i: "prompt")
        check_texts(((name(i), r.prompt) for i, r in enumerate(rows)), self.prompt_limit())
        for r in rows:
            check_seed(r.seed)
            check_sampling(r.temperature, r.top_p)
        size = self.chunk_tokens() if conversation is not None else None
        limit = self.loaded.context_length
        if size:  # read chunk by chunk: generation continues from at most `size` tokens (and a BOS)
            longest = max(r.max_new_tokens for r in rows)
            if limit and size + 1 + longest > limit:
                raise InvalidRequest(f"a chunk of {size} tokens + {longest} to generate is over the model's "
                                     f"context of {limit} tokens")
        else:
            check_fits(self.loaded, ((name(i), r.prompt, r.max_new_tokens) for i, r in enumerate(rows)))
        if conversation is not None:
            check_conversation(conversation)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat (role/content messages) in the model's chat template, ready
        for the assistant's turn. Edits are made on prompt texts: to edit what the model says in
        chat, edit the prompt this returns (see the README)."""
        tok = self.loaded.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidRequest(f"model '{self.settings['model']}' has no chat template; use completions")
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template's own error (e.g. roles it does not accept): one line
            raise InvalidRequest(f"chat template: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def prompt_limit(self) -> int:
        """The longest prompt or target this session accepts (see max_prompt_chars)."""
        return self.max_prompt_chars or max_prompt_chars()

    def clear_conversation(self, conversation: str) -> None:
        """Forget everything `conversation` left in runtime memory (its next turn starts fresh)."""
        check_conversation(conversation)
        for component in self._components():
            component.clear_conversation(conversation)

    def _components(self) -> list:
        return [self.editor, *self.interventions.values()]


def _sequences(req: EditRequest) -> list[tuple[str, str]]:
    """The texts an edit runs through the model: each prompt followed by its answer."""
    return [("prompt + target_new", req.prompt + req.target_new),
            *[(f"rephrases.{i} + target_new", r + req.target_new) for i, r in enumerate(req.rephrases)],
            *[(f"locality.{i}", p.prompt + (p.answer or "")) for i, p in enumerate(req.locality)]]


CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


def check_conversation(conversation: str) -> None:
    if not isinstance(conversation, str) or not CONVERSATION_ID.fullmatch(conversation):
        raise InvalidRequest("conversation: 1 to 128 characters from letters, digits and _ . : @ -")


def read_settings(ws: Path) -> dict[str, Any]:
    path = ws / "workspace.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"cannot read {path}: {exc}") from exc
    missing = {"format", "model", "fingerprint", "method", "method_config", "checkpoint_every"} - set(settings)
    if missing:
        raise WorkspaceError(f"{path} lacks {', '.join(sorted(missing))}")
    if settings["format"] not in (1, WORKSPACE_FORMAT):
        raise WorkspaceError(f"{path} has format {settings['format']}; this editkit reads 1 to {WORKSPACE_FORMAT}")
    return settings


def plan_open(ws: Path, host: PluginHost, *, model: str | None = None, method: str | None = None,
              method_config: dict | None = None) -> dict[str, Any]:
    """What Session.open would do with these arguments, checked as it checks them, without
    loading the model or touching anything (for --dry-run)."""
    if ws.exists() and not ws.is_dir():
        raise WorkspaceError(f"{ws} exists and is not a directory")
    if (ws / "workspace.json").exists():
        settings = read_settings(ws)
        editor_cls, config = _check_reopen(ws, settings, host, model, method, method_config)
        journal = Journal(ws / "journal.sqlite", readonly=True)
        try:
            active = journal.count("applied")
        finally:
            journal.close()
        return {"workspace": str(ws), "exists": True, "model": settings["model"], "method": settings["method"],
                "method_config": config.model_dump(mode="json"), "active_edits": active,
                "edits_in_turns": editor_cls.edits_in_turns}
    if ws.exists() and any(ws.iterdir()):
        raise WorkspaceError(f"{ws} is a non-empty directory that is not an editkit workspace "
                             "(no workspace.json); choose a new or empty directory")
    editor_cls = host.editor(method or DEFAULT_METHOD)
    config = editor_cls.make_config(method_config)
    return {"workspace": str(ws), "exists": False, "model": _model_key(model), "method": method or DEFAULT_METHOD,
            "method_config": config.model_dump(mode="json"), "active_edits": 0,
            "edits_in_turns": editor_cls.edits_in_turns}


def _check_reopen(ws: Path, settings: dict[str, Any], host: PluginHost, wanted: str | None,
                  method: str | None, method_config: dict | None):
    """The editor class and config of an existing workspace, after checking that what the
    caller asked for (model, method, config) is what the workspace was made with."""
    if wanted is not None and _model_key(wanted) != settings["model"]:
        raise WorkspaceError(f"workspace {ws} was made with model '{settings['model']}', not '{wanted}'")
    if method is not None and method != settings["method"]:
        raise WorkspaceError(f"workspace {ws} uses method '{settings['method']}', not '{method}'")
    editor_cls = host.editor(settings["method"])
    config = editor_cls.make_config(settings["method_config"])
    if method_config is not None and editor_cls.make_config(method_config) != config:
        raise WorkspaceError(f"workspace {ws} was created with a different {settings['method']} config")
    return editor_cls, config


def _open_parts(ws: Path, settings: dict[str, Any], loaded: LoadedModel, editor_cls, config,
                host: PluginHost, readonly: bool, follow: bool = False):
    """Journal, chunk store, and the editor and interventions attached with the head state
    (a schema-1 workspace is migrated first, unless read-only). On failure everything
    attached is detached again and the journal closed."""
    journal = Journal(ws / "journal.sqlite", readonly=readonly, no_writer=readonly and not follow)
    try:
        chunks = ChunkStore(ws / "state", readonly=readonly)
        if not readonly:
            if journal.legacy:
                legacy.migrate(journal, ws / "state", chunks)
            if settings["format"] != WORKSPACE_FORMAT:  # the journal is migrated: say so
                settings["format"] = WORKSPACE_FORMAT
                atomic_write_text(ws / "workspace.json", json.dumps(settings, indent=2, sort_keys=True))
            _sweep(ws / "state", journal, chunks)
        if follow and journal.legacy:
            raise WorkspaceError(f"workspace {ws} has the old layout; open it for writing once (its writer does) "
                                 "before following it")
        head_id, manifest = (0, None) if journal.legacy else journal.head_state()
        if journal.legacy:
            states = legacy.legacy_head(journal, ws / "state") or {}
        else:
            states = chunks.read(manifest, reuse=follow) if manifest else {}
        editor, interventions = _attach_states(loaded, editor_cls, config, states, host)
    except BaseException:
        journal.close()
        raise
    bases = manifest["components"] if manifest else {}
    return editor, journal, chunks, bases, interventions, head_id, states


def _attach_states(loaded: LoadedModel, editor_cls, config, states, host: PluginHost):
    """A new editor and the interventions of `states`, attached and holding their states; on
    failure everything attached is detached again."""
    editor = editor_cls(loaded, config)
    editor.attach()
    interventions: dict[str, Intervention] = {}
    try:
        if EDITOR_STATE in states:
            editor.load_state_dict(*states[EDITOR_STATE])
        for key, (tensors, meta) in states.items():
            if key.startswith(INTERVENTION_STATE):
                name = key[len(INTERVENTION_STATE):]
                intervention = host.intervention(name)(loaded, meta.get("config"))
                intervention.attach()
                interventions[name] = intervention
                intervention.load_state_dict(tensors, meta.get("state", {}))
        for component in [editor, *interventions.values()]:
            component.changes.clear()
    except BaseException:
        for intervention in reversed(interventions.values()):
            intervention.detach()
        editor.detach()
        raise
    return editor, interventions


def _sweep(state_root: Path, journal: Journal, chunks: ChunkStore) -> None:
    """Delete what a crash may have left: chunk files no state references, temporary
    files, and directories of the schema-1 layout whose migration committed."""
    chunks.remove_temporaries()
    live = journal.live_chunks()
    chunks.remove([d for d in chunks.files() if d not in live])
    for entry in state_root.iterdir():
        if entry != chunks.root:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _create_workspace(ws: Path, settings: dict[str, Any]):
    """Build a new workspace in a temporary directory beside `ws` and rename it into place
    (onto `ws` itself when that is an empty directory). Returns the held lock."""
    try:
        ws.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{ws.name}.creating-", dir=ws.parent))
    except OSError as exc:
        raise WorkspaceError(f"cannot create workspace {ws}: {exc.strerror or exc}") from None
    lock_file = None
    try:
        lock_file = _lock(tmp)
        atomic_write_text(tmp / "workspace.json", json.dumps(settings, indent=2, sort_keys=True))
        Journal(tmp / "journal.sqlite").close()
        ChunkStore(tmp / "state")
        os.replace(tmp, ws)  # fails if `ws` appeared meanwhile and is not empty
    except BaseException as exc:
        if lock_file is not None:
            lock_file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise WorkspaceError(f"cannot create workspace {ws}: {exc.strerror or exc}") from None
        raise
    return lock_file


def _remove_created(ws: Path, existed: bool) -> None:
    """Undo _create_workspace: everything in `ws` came from it (it was absent or empty)."""
    if not existed:
        shutil.rmtree(ws, ignore_errors=True)
        return
    for entry in ws.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _lock(ws: Path, shared: bool = False):
    """A lock on the workspace for the session's lifetime: one writer, or any number of
    read-only sessions. A read-only session opens the lock file for reading (it writes
    nothing) and goes unlocked where there is none."""
    path = ws / ".lock"
    if shared and not path.exists():
        return None
    try:
        fh = open(path, "r" if shared else "a+")
    except OSError as exc:
        raise WorkspaceError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise WorkspaceError(f"workspace {ws} is in use by another process") from None
    return fh
