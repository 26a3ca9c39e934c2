"""Workspace commands: edit, generate, history, rollback."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from editkit.errors import InvalidRequest, WorkspaceError
from editkit.limits import MAX_SEED, check_texts, max_prompt_chars

from ._common import (DEFAULT_WORKSPACE, SCORES, SCORES_CAPTION, ConfigFileOpt, ConfigOpt, DeviceMapOpt, DeviceOpt,
                      DryRunOpt, DtypeOpt, JsonOpt, MethodOpt, ModelOpt, WorkspaceOpt, console, echo_json, fmt_score,
                      fmt_seconds, host_of, method_config, one_line, open_session)

if TYPE_CHECKING:
    from editkit.schemas import EditRequest
    from editkit.store import EditRecord, Journal

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


# ---- reading requests -------------------------------------------------------------------
class _DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is an error, not 'the last one wins'."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def parse_line(line: str) -> dict[str, Any]:
    """One JSONL line as a JSON object; InvalidRequest (without the line number) otherwise."""
    try:
        data = json.loads(line, object_pairs_hook=_object)
    except _DuplicateKey as exc:
        raise InvalidRequest(f"key '{exc.args[0]}' is given twice") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # e.g. a number over Python's digit limit, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else one_line(exc)
        raise InvalidRequest(f"invalid JSON: {reason}") from None
    if not isinstance(data, dict):
        kind = _JSON_TYPES.get(type(data), type(data).__name__)
        raise InvalidRequest(f"expected a JSON object (an edit request), got {kind}")
    return data


def checked(request: EditRequest) -> EditRequest:
    """`request`, once its texts are within the shared limit (the session checks it too,
    but only after opening the workspace)."""
    check_texts(request.texts(), max_prompt_chars())
    return request


def read_requests(path: str) -> list[EditRequest]:
    """Every request of a JSONL file (`-`: stdin), all validated before any is returned."""
    from editkit.session import as_request

    label = "stdin" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {label}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{label} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    requests = []
    # Lines end at \n only: str.splitlines() would also split inside a JSON string holding
    # U+2028, U+0085 and the like, which JSON allows unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            requests.append(checked(as_request(parse_line(line))))
        except InvalidRequest as exc:
            raise InvalidRequest(f"{label} line {number}: {exc}") from None
    if not requests:
        raise InvalidRequest(f"{label} holds no edit requests")
    return requests


def request_from_options(prompt: str, target: str, rephrases: list[str], locs: list[str],
                         loc_answers: list[str], subject: str | None, target_old: str | None) -> EditRequest:
    from editkit.session import as_request

    if loc_answers and len(loc_answers) != len(locs):
        raise InvalidRequest(f"--loc-answer is given {len(loc_answers)} time(s) for {len(locs)} --loc "
                             "prompt(s); give one per --loc, in the same order, or none")
    answers = loc_answers or [None] * len(locs)
    return checked(as_request({"prompt": prompt, "target_new": target, "subject": subject, "target_old": target_old,
                               "rephrases": rephrases,
                               "locality": [{"prompt": p, "answer": a} for p, a in zip(locs, answers)]}))


# ---- reading the journal without a model ------------------------------------------------
def open_journal_readonly(workspace: Path) -> tuple[dict[str, Any], Journal]:
    """The workspace settings and its journal, opened read-only (no lock, no model, no writes)."""
    from editkit.session import read_settings
    from editkit.store import Journal

    if not (workspace / "workspace.json").is_file():
        raise WorkspaceError(f"no workspace at {workspace}")
    settings = read_settings(workspace)
    path = workspace / "journal.sqlite"
    if not path.is_file():
        raise WorkspaceError(f"workspace {workspace} has no journal ({path} is missing)")
    journal = Journal(path, readonly=True)
    try:
        journal.db.execute("SELECT 1 FROM edits LIMIT 1")
    except sqlite3.Error as exc:
        journal.close()
        raise WorkspaceError(f"cannot read journal {path}: {exc}") from None
    return settings, journal


# ---- output -----------------------------------------------------------------------------
def _records_table(records: list[EditRecord], title: str, with_status: bool):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", caption=SCORES_CAPTION, caption_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("id", justify="right", no_wrap=True)
    if with_status:
        table.add_column("status", no_wrap=True)
    table.add_column("prompt", ratio=3, min_width=12)
    table.add_column("target", ratio=1, min_width=6)
    for col in ("rel", "gen", "loc", "sec"):
        table.add_column(col, justify="right", no_wrap=True)
    if with_status:
        table.add_column("created", no_wrap=True, min_width=11)
    for r in records:
        row = [Text(str(r.id))]
        if with_status:
            applied = r.status == "applied"
            row.append(Text("applied" if applied else "rolled back", style="green" if applied else "dim"))
        row += [Text(r.request.get("prompt", "")), Text(r.request.get("target_new", ""))]
        row += [Text(fmt_score(r.metrics.get(k))) for k in SCORES]
        row.append(Text(fmt_seconds(r.stats.get("seconds"))))
        if with_status:
            row.append(Text(time.strftime("%m-%d %H:%M", time.localtime(r.created_at))))
        table.add_row(*row)
    return table


# ---- commands ---------------------------------------------------------------------------
Texts = Optional[list[str]]


def _arg(metavar: str, help: str, **kw):
    return typer.Argument(metavar=metavar, help=help, show_default=False, **kw)


def edit(
    ctx: typer.Context,
    prompt: Annotated[Optional[str], _arg("PROMPT", "The prompt whose completion changes.")] = None,
    target: Annotated[Optional[str], _arg("TARGET", "The new completion.")] = None,
    rephrase: Annotated[Texts, typer.Option(
        "--rephrase", metavar="TEXT", help="A paraphrase that should follow the edit; repeatable.")] = None,
    loc: Annotated[Texts, typer.Option(
        "--loc", metavar="PROMPT", help="An unrelated prompt the edit must not change; repeatable.")] = None,
    loc_answer: Annotated[Texts, typer.Option(
        "--loc-answer", metavar="ANSWER", help="Expected answer of each --loc, in order (all or none).")] = None,
    subject: Annotated[Optional[str], typer.Option(
        "--subject", metavar="TEXT", help="The entity the fact is about, as written in the prompt (WISE answers the edit only where it occurs).")] = None,
    target_old: Annotated[Optional[str], typer.Option(
        "--target-old", metavar="TEXT", help="The completion before the edit, if known.")] = None,
    file: Annotated[Optional[str], typer.Option(
        "--file", "-f", metavar="FILE",
        help="JSONL file of edit requests, one per line (- reads stdin); all are validated before any is applied.")] = None,
    method: MethodOpt = None,
    config: ConfigOpt = None,
    config_file: ConfigFileOpt = None,
    dry_run: DryRunOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply edits (PROMPT TARGET, or --file) to the workspace, creating it on first use."""
    if file is not None:
        if prompt is not None or target is not None or rephrase or loc or loc_answer or subject or target_old:
            ctx.fail("give either PROMPT TARGET (with --rephrase/--loc/...) or --file, not both")
        requests = read_requests(file)
    else:
        if prompt is None or target is None:
            ctx.fail("give PROMPT and TARGET, or --file FILE")
        requests = [request_from_options(prompt, target, rephrase or [], loc or [], loc_answer or [],
                                         subject, target_old)]
    settings = method_config(config, config_file)
    if dry_run:
        from editkit.session import plan_open

        plan = {**plan_open(Path(workspace), host_of(ctx), model=model, method=method, method_config=settings),
                "requests": [r.model_dump(mode="json", exclude_defaults=True) for r in requests]}
        echo_json(plan)
        return
    with open_session(ctx, workspace, create=True, model=model, device=device, dtype=dtype,
                      device_map=device_map, method=method, method_config=settings) as session:
        records = _apply_with_progress(session, requests, quiet=as_json)
    if as_json:
        echo_json([r.to_dict() for r in records])
    else:
        console().print(_records_table(records, f"{len(records)} edit(s) applied to {workspace}", with_status=False))


def _apply_with_progress(session, requests, quiet: bool):
    """session.edit, with a progress bar on stderr when there are several requests."""
    if quiet or len(requests) < 2:
        return session.edit(requests)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("edits"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("edits", total=len(requests))
        return session.edit(requests, on_applied=lambda record: bar.advance(task))


def generate(
    ctx: typer.Context,
    prompts: Annotated[list[str], _arg("PROMPT", "One or more prompts.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate per prompt.")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(
        "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature > 0).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for sampling.")] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Send each PROMPT as a user message through the model's chat template.")] = False,
    conversation: Annotated[Optional[str], typer.Option(
        "--conversation", help="Read and extend this conversation's runtime memory (reweave) for the call; "
        "with reweave's chunk_tokens set, a PROMPT longer than that is read chunk by chunk.")] = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate with the workspace's edits and interventions in force (the workspace must exist)."""
    if any(not p.strip() for p in prompts):
        raise InvalidRequest("prompt must not be empty")
    check_texts((("PROMPT", p) for p in prompts), max_prompt_chars())
    with open_session(ctx, workspace, create=False, readonly=True, model=model, device=device, dtype=dtype,
                      device_map=device_map) as session:
        inputs = [session.chat_prompt([{"role": "user", "content": p}]) for p in prompts] if chat else prompts
        texts = session.generate(inputs, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, conversation=conversation)
    if as_json:
        echo_json([{"prompt": p, "text": t} for p, t in zip(prompts, texts)])
        return
    from rich.text import Text

    out = console()
    for i, (p, t) in enumerate(zip(prompts, texts)):
        if i:
            out.print()
        out.print(Text.assemble((p, "bold"), (t, "cyan")))


def history(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    all_: Annotated[bool, typer.Option("--all", help="Include rolled-back edits.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the workspace's edits (read from its journal; the model is not loaded)."""
    settings, journal = open_journal_readonly(Path(workspace))
    try:
        records = journal.records(active_only=not all_)
    except sqlite3.Error as exc:
        raise WorkspaceError(f"cannot read journal of {workspace}: {exc}") from None
    finally:
        journal.close()
    if as_json:
        echo_json([r.to_dict() for r in records])
        return
    out = console()
    title = f"{workspace} · model {settings['model']} · method {settings['method']}"
    if not records:
        out.print(f"{title}\nno {'' if all_ else 'active '}edits")
        return
    out.print(_records_table(records, title, with_status=True))


def rollback(
    ctx: typer.Context,
    edit_id: Annotated[int, _arg("ID", "Id of the edit to undo (see `editkit history`).")],
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Undo one edit: the model is rebuilt without it, the later edits kept."""
    with open_session(ctx, workspace, create=False, model=model, device=device, dtype=dtype,
                      device_map=device_map) as session:
        session.rollback(edit_id)
        remaining = len(session.history(active_only=True))
    typer.echo(f"rolled back edit {edit_id}; {remaining} edit(s) remain active in {workspace}")


def register(app: typer.Typer) -> None:
    app.command()(edit)
    app.command()(generate)
    app.command()(history)
    app.command()(rollback)
