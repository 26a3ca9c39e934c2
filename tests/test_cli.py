"""The `editkit` CLI on tiny models: commands, output, and bad input that changes nothing."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from editkit.cli._common import parse_config
from editkit.cli.main import build_app, main
from editkit.errors import InvalidRequest
from editkit.hookspecs import hookimpl
from editkit.host import Candidate, PluginHost, builtin_candidates

FAST = ["--method", "ft", "--config", "steps=3", "--config", "lr=0.01"]
BUILTIN = {"adapters", "evaluation", "ft", "grace", "wise"}
runner = CliRunner()


def make_host(*extra: Candidate) -> PluginHost:
    """The plugins these tests are about, unaffected by EDITKIT_PLUGINS or other plugins."""
    return PluginHost([c for c in builtin_candidates() if c.name in BUILTIN] + list(extra), env={})


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return build_app(make_host())


@pytest.fixture(scope="module")
def gpt2(tiny_dirs) -> list[str]:
    return ["--model", str(tiny_dirs["gpt2"]), "--device", "cpu"]


def run(app, *args, env: dict | None = None, input: str | None = None):
    env = {"COLUMNS": "200", "EDITKIT_WORKSPACE": None, "EDITKIT_MODEL": None, **(env or {})}
    return runner.invoke(app, [str(a) for a in args], env=env, input=input)


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def user_error(result, *reasons: str) -> str:
    """Exit 1 with exactly one line `error: ...` on stderr naming the reason; no traceback."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for reason in reasons:
        assert reason in lines[0], lines[0]
    return lines[0]


def journal(ws: Path):
    """Everything the journal holds, read without touching it (None: no journal)."""
    path = ws / "journal.sqlite"
    if not path.exists():
        return None
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("edits", "head", "checkpoints", "states", "chunks")]
    finally:
        db.close()


def history(app, ws: Path, *flags: str) -> list[dict]:
    return json.loads(ok(run(app, "history", "--workspace", ws, "--json", *flags)))


def write_jsonl(path: Path, *lines) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def edited(app, gpt2, tmp_path) -> Path:
    """A workspace holding one edit."""
    ws = tmp_path / "ws"
    ok(run(app, "edit", "The capital of France is", "Rome", "--workspace", ws, *gpt2, *FAST))
    return ws


# ---- commands -----------------------------------------------------------------------------
def test_parse_config_reads_json_else_strings():
    assert parse_config(["lr=0.01", "layer=0.5", "steps=3", "flag=true", "name=a=b", "ids=[1,2]"]) == {
        "lr": 0.01, "layer": 0.5, "steps": 3, "flag": True, "name": "a=b", "ids": [1, 2]}
    assert parse_config(None) is None
    for bad in (["lr"], ["=1"], ["lr=1", "lr=2"]):
        with pytest.raises(InvalidRequest):
            parse_config(bad)


def test_edit_history_generate_rollback(app, gpt2, tmp_path):
    ws = tmp_path / "ws"
    out = ok(run(app, "edit", "The capital of France is", "Rome", "--rephrase", "France's capital is",
                 "--loc", "The capital of Italy is", "--loc-answer", "Rome", "--subject", "France",
                 "--workspace", ws, *gpt2, *FAST, "--json"))
    (record,) = json.loads(out)
    assert record["id"] == 1 and record["status"] == "applied" and record["method"] == "ft"
    assert {"reliability", "generalization", "locality", "rel_tf", "rel_em", "loc_em"} <= set(record["metrics"])
    assert record["metrics"]["generalization"] is not None and record["metrics"]["locality"] is not None
    assert record["request"]["locality"] == [{"prompt": "The capital of Italy is", "answer": "Rome"}]
    assert record["request"]["subject"] == "France" and record["stats"]["seconds"] > 0
    settings = json.loads((ws / "workspace.json").read_text())
    assert settings["method_config"]["steps"] == 3 and settings["method_config"]["lr"] == 0.01

    # A second edit, workspace and model from the environment; the table names id and scores.
    env = {"EDITKIT_WORKSPACE": str(ws), "EDITKIT_MODEL": str(tiny_dirs_model(gpt2))}
    out = ok(run(app, "edit", "The largest planet is", "Paris", "--device", "cpu", env=env))
    assert "The largest planet is" in out and "Paris" in out and "reliability" in out

    (one, two) = history(app, ws)
    assert (one["id"], two["id"]) == (1, 2) and two["request"]["target_new"] == "Paris"
    table = ok(run(app, "history", env={"EDITKIT_WORKSPACE": str(ws)}))
    assert "The capital of France is" in table and "applied" in table and "rel" in table

    gen = json.loads(ok(run(app, "generate", "The capital of France is", "Hello", "--max-new-tokens", 3,
                            "--workspace", ws, "--device", "cpu", "--json")))
    assert [g["prompt"] for g in gen] == ["The capital of France is", "Hello"]
    assert all(isinstance(g["text"], str) for g in gen)
    assert "The capital of France is" in ok(run(app, "generate", "The capital of France is",
                                                 "--max-new-tokens", 2, "--workspace", ws, "--device", "cpu"))

    out = ok(run(app, "rollback", 1, "--workspace", ws, "--device", "cpu"))
    assert "rolled back edit 1" in out
    assert [r["id"] for r in history(app, ws)] == [2]
    everything = history(app, ws, "--all")
    assert [(r["id"], r["status"]) for r in everything] == [(1, "rolled_back"), (2, "applied")]
    assert "rolled back" in ok(run(app, "history", "--all", "--workspace", ws))


def tiny_dirs_model(model_args: list[str]) -> str:
    return model_args[model_args.index("--model") + 1]


def test_edit_file_applies_every_line(app, gpt2, tmp_path):
    ws = tmp_path / "ws"
    edits = write_jsonl(
        tmp_path / "edits.jsonl",
        {"prompt": "The capital of France is", "target_new": "Rome", "rephrases": ["France's capital is"]},
        "",
        {"prompt": "The largest planet is", "target_new": "Paris", "subject": "planet", "target_old": "Jupiter",
         "locality": [{"prompt": "The capital of Italy is", "answer": "Rome"}, {"prompt": "Who wrote Hamlet?"}]},
        {"prompt": "Who wrote Hamlet?", "target_new": "the lazy dog"},
    )
    records = json.loads(ok(run(app, "edit", "--file", edits, "--workspace", ws, *gpt2, *FAST, "--json")))
    assert [r["id"] for r in records] == [1, 2, 3]
    assert records[1]["request"]["target_old"] == "Jupiter" and records[1]["metrics"]["locality"] is not None
    assert [r["request"]["prompt"] for r in history(app, ws)] == [
        "The capital of France is", "The largest planet is", "Who wrote Hamlet?"]
    # `--file -` reads stdin; the table lists each edit
    out = ok(run(app, "edit", "-f", "-", "--workspace", ws, "--device", "cpu",
                 input=json.dumps({"prompt": "The largest planet is", "target_new": "Berlin"}) + "\n"))
    assert "Berlin" in out and len(history(app, ws)) == 4


# ---- bad input: exit 1, one line, nothing changed ---------------------------------------------
def test_bad_input_changes_nothing(app, gpt2, tiny_dirs, edited, tmp_path, monkeypatch):
    before = journal(edited)
    files = {
        "line3": write_jsonl(tmp_path / "edits.jsonl", {"prompt": "a b", "target_new": "c"},
                             {"prompt": "d e", "target_new": "f"}, {"prompt": "g h", "target_new": ""}),
        "json": write_jsonl(tmp_path / "broken.jsonl", {"prompt": "a b", "target_new": "c"}, '{"prompt": "d",'),
        "array": write_jsonl(tmp_path / "array.jsonl", [1, 2]),
        "extra": write_jsonl(tmp_path / "extra.jsonl", {"prompt": "a b", "target": "c"}),
        "empty": write_jsonl(tmp_path / "empty.jsonl", ""),
        "twice": write_jsonl(tmp_path / "twice.jsonl", {"prompt": "a b", "target_new": "c"},
                             '{"prompt": "a b", "target_new": "c", "target_new": "d"}'),
        "twice_nested": write_jsonl(tmp_path / "nested.jsonl",
                                    '{"prompt": "a b", "target_new": "c", "locality": [{"prompt": "x", "prompt": "y"}]}'),
        "surrogate": write_jsonl(tmp_path / "surrogate.jsonl", '{"prompt": "a b", "target_new": "\\ud800"}'),
        "digits": write_jsonl(tmp_path / "digits.jsonl", '{"prompt": "a b", "target_new": ' + "9" * 5000 + "}"),
        "long": write_jsonl(tmp_path / "long.jsonl", {"prompt": "p" * 4001, "target_new": "c"}),
    }
    ws = ["--workspace", edited]
    cases = [
        (("edit", "", "Rome", *ws, *gpt2), ["prompt must not be empty"]),
        (("edit", "The capital of France is", "  ", *ws, *gpt2), ["target_new must not be empty"]),
        (("edit", "p q", "r", "--rephrase", "", *ws, *gpt2), ["rephrase must not be empty"]),
        (("edit", "p q", "r", "--loc", "a", "--loc", "b", "--loc-answer", "x", *ws), ["--loc-answer"]),
        (("edit", "--file", files["line3"], *ws, *gpt2), ["edits.jsonl line 3", "target_new must not be empty"]),
        (("edit", "--file", files["json"], *ws, *gpt2), ["broken.jsonl line 2", "invalid JSON"]),
        (("edit", "--file", files["array"], *ws), ["array.jsonl line 1", "JSON object"]),
        (("edit", "--file", files["extra"], *ws), ["extra.jsonl line 1", "target_new", "target"]),
        (("edit", "--file", files["empty"], *ws), ["no edit requests"]),
        (("edit", "--file", files["twice"], *ws), ["twice.jsonl line 2", "key 'target_new' is given twice"]),
        (("edit", "--file", files["twice_nested"], *ws), ["nested.jsonl line 1", "key 'prompt' is given twice"]),
        (("edit", "--file", files["surrogate"], *ws), ["surrogate.jsonl line 1", "target_new", "not valid Unicode"]),
        (("edit", "--file", files["digits"], *ws), ["digits.jsonl line 1", "invalid JSON"]),
        (("edit", "--file", files["long"], *ws), ["long.jsonl line 1", "prompt: longer than 4000 characters"]),
        (("edit", "p" * 4001, "r", *ws, *gpt2), ["prompt: longer than 4000 characters"]),
        (("generate", "x" * 4001, *ws, *gpt2), ["PROMPT: longer than 4000 characters"]),
        (("edit", "--file", tmp_path / "missing.jsonl", *ws), ["cannot read", "missing.jsonl"]),
        (("edit", "p q", "r", "--config", "steps", *ws, *gpt2), ["--config expects KEY=VALUE"]),
        (("edit", "p q", "r", "--method", "nope", *ws, *gpt2), ["method 'ft', not 'nope'"]),
        (("edit", "p q", "r", "--config", "steps=7", *ws, *gpt2), ["different ft config"]),
        (("edit", "p q", "r", *ws, "--model", tiny_dirs["llama"]), ["was made with model", "llama"]),
        (("generate", "", *ws, *gpt2), ["prompt must not be empty"]),
        (("generate", "x", *ws, "--model", tiny_dirs["llama"]), ["was made with model"]),
        (("rollback", 99, *ws, *gpt2), ["no edit with id 99"]),
        (("edit", "p q", "r", *ws, *gpt2, "--device", "tpu"), ["unknown device 'tpu'"]),
    ]
    for args, reasons in cases:
        user_error(run(app, *args), *reasons)
        assert journal(edited) == before, args

    # One limit, set by EDITKIT_MAX_PROMPT_CHARS, for every text of a request.
    short = {"EDITKIT_MAX_PROMPT_CHARS": "8"}
    user_error(run(app, "edit", "p q", "r", "--rephrase", "r" * 9, *ws, *gpt2, env=short),
               "rephrases.0: longer than 8 characters")
    user_error(run(app, "generate", "x" * 9, *ws, *gpt2, env=short), "PROMPT: longer than 8 characters")
    user_error(run(app, "generate", "x", *ws, *gpt2, env={"EDITKIT_MAX_PROMPT_CHARS": "many"}),
               "EDITKIT_MAX_PROMPT_CHARS must be a whole number")
    assert journal(edited) == before

    # Bad input for a new workspace leaves no workspace behind.
    fresh = tmp_path / "fresh"
    empty_model = tmp_path / "empty-model"
    empty_model.mkdir()
    for args, reasons in [
        (("edit", "p q", "r", "--method", "nope", *gpt2), ["unknown editor 'nope'", "available: ft"]),
        (("edit", "p q", "r", "--method", "ft", "--config", "lr=-1", *gpt2), ["invalid ft config", "lr"]),
        (("edit", "p q", "r", "--model", empty_model, "--device", "cpu"), ["cannot load", "empty-model"]),
        (("generate", "x", *gpt2), ["no workspace at"]),
        (("history",), ["no workspace at"]),
        (("rollback", 1, *gpt2), ["no workspace at"]),
    ]:
        user_error(run(app, *args, "--workspace", fresh), *reasons)
        assert not fresh.exists(), args

    # The default workspace is ./editkit-workspace
    monkeypatch.chdir(tmp_path)
    user_error(run(app, "history"), "no workspace at editkit-workspace")

    # Usage errors (exit 2) in the same one-line form: unknown command or plugin group, PROMPT
    # with --file, no TARGET, an unknown option, a bad or missing argument, a file as workspace.
    a_file = write_jsonl(tmp_path / "a-file", "")
    for args, reason in [
        (("nosuchplugin", "x"), "No such command 'nosuchplugin'"),
        (("edit", "a", "b", "--file", files["line3"], *ws), "either PROMPT TARGET"),
        (("edit", "a", *ws), "give PROMPT and TARGET"),
        (("history", "--bogus"), "No such option: --bogus"),
        (("--bogus",), "No such option: --bogus"),
        (("rollback", "abc", *ws), "Invalid value for 'ID'"),
        (("rollback", *ws), "Missing argument 'ID'"),
        (("history", "--workspace", a_file), "is a file"),
        (("generate", "x", "--seed", "-1", *ws), "--seed"),
        (("generate", "x", "--seed", str(2**63), *ws), "--seed"),
    ]:
        result = run(app, *args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], (args, result.stderr)
    assert journal(edited) == before
    assert "Usage: editkit" in run(app).output  # no arguments: the help, as before


def test_tampered_or_unreadable_state_is_refused(app, gpt2, edited):
    before = journal(edited)
    # The largest chunk: a block of the editor's weight delta.
    tensors = max((p for p in (edited / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    original = tensors.read_bytes()
    tensors.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    for args in (("generate", "x"), ("edit", "p q", "r"), ("rollback", 1)):
        user_error(run(app, *args, "--workspace", edited, *gpt2), "fails its checksum")
        assert journal(edited) == before
    assert len(history(app, edited)) == 1  # the journal itself is still readable

    tensors.unlink()
    user_error(run(app, "generate", "x", "--workspace", edited, *gpt2), "is missing")
    tensors.write_bytes(original)
    ok(run(app, "generate", "x", "--max-new-tokens", 1, "--workspace", edited, *gpt2))
    assert journal(edited) == before

    # A corrupt journal: an error line, not a traceback, for commands with and without a model.
    for f in edited.glob("journal.sqlite*"):
        f.unlink()
    (edited / "journal.sqlite").write_bytes(b"this is not a database" * 100)
    user_error(run(app, "history", "--workspace", edited), "journal")
    user_error(run(app, "generate", "x", "--workspace", edited, *gpt2), "not a database")


# ---- plugins --------------------------------------------------------------------------------
def test_plugins_lists_registrations_and_failures():
    def broken():
        raise ImportError("no module named 'missing_dependency'")

    app = build_app(make_host(Candidate("broken", "1.0", "entry point (broken-dist)", broken)))
    data = json.loads(ok(run(app, "plugins", "--json")))
    plugins = {p["name"]: p for p in data["plugins"]}
    assert BUILTIN <= set(plugins)
    assert plugins["ft"]["registers"] == {"editors": ["ft"]}
    assert plugins["ft"]["source"] == "builtin" and plugins["ft"]["version"]
    assert {"gpt2", "llama", "gpt_neox"} <= set(plugins["adapters"]["registers"]["adapters"])
    assert "builtin" in plugins["evaluation"]["registers"]["suites"]
    assert data["failures"] == [{"name": "broken", "cause": "ImportError: no module named 'missing_dependency'"}]

    table = ok(run(app, "plugins"))
    for text in ("ft", "editors: ft", "adapters", "evaluation", "builtin", "broken", "missing_dependency"):
        assert text in table


class GreeterPlugin:
    """A third-party plugin adding `editkit hello ...`."""

    @hookimpl
    def register_commands(self, register):
        group = typer.Typer(help="Say hello.")

        @group.command()
        def greet(ctx: typer.Context, name: str):
            typer.echo(f"hello {name} from {type(ctx.obj).__name__}")

        @group.command()
        def boom():
            raise InvalidRequest("boom is not allowed\n(second line)")

        register("hello", group)
        clash = typer.Typer()
        clash.command()(greet)
        register("edit", clash)


def test_plugin_command_group_is_mounted(capsys):
    host = make_host()
    host.add_plugin(GreeterPlugin(), "greeter")
    app = build_app(host)
    assert "'edit', which is built in; not mounted" in capsys.readouterr().err
    assert ok(run(app, "hello", "greet", "Ada")).strip() == "hello Ada from PluginHost"
    assert "hello" in ok(run(app, "--help"))
    # a plugin command's EditkitError goes through the same formatter, on one line
    assert user_error(run(app, "hello", "boom")) == "error: boom is not allowed (second line)"
    assert "PROMPT" in ok(run(app, "edit", "--help"))  # the built-in `edit` was kept
    data = json.loads(ok(run(app, "plugins", "--json")))
    greeter = next(p for p in data["plugins"] if p["name"] == "greeter")
    assert greeter["registers"] == {"commands": ["hello", "edit"]} and greeter["source"] == "added"


def test_main_is_the_console_entry(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("editkit.host._host", make_host())
    monkeypatch.setattr(sys, "argv", ["editkit", "history", "--workspace", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: no workspace at {tmp_path / 'none'}"


# ---- demo ------------------------------------------------------------------------------------
def test_demo_on_a_tiny_model(app, tiny_dirs, tmp_path, capsys):
    from editkit.cli.demo import render
    from editkit.demo import DemoEdit, DemoResult
    from editkit.evaluation.suites import BuiltinSuite

    suite = BuiltinSuite().load()
    ws = tmp_path / "demo-ws"
    result = run(app, "demo", "--model", tiny_dirs["llama"], "--device", "cpu", "--max-new-tokens", 3, *FAST,
                 "--workspace", ws, "--json")
    data = json.loads(ok(result))
    assert "applying edit 3/3" in result.stderr  # progress goes to stderr, the result to stdout
    assert data["method"] == "ft" and data["workspace"] == str(ws)
    assert [e["prompt"] for e in data["edits"]] == [e.prompt for e in suite]
    for e in data["edits"]:
        assert set(e["metrics"]) == {"reliability", "generalization", "locality"}  # the demo's three
        assert all(isinstance(e[k], str) for k in ("before", "after", "rephrase_before", "rephrase_after"))
        assert e["seconds"] > 0
    assert len(history(app, ws)) == len(suite)  # --workspace keeps the demo's edits

    # The table (the command prints exactly this without --json).
    render(DemoResult(**{**data, "edits": [DemoEdit(**e) for e in data["edits"]]}))
    out = capsys.readouterr().out
    for i, edit in enumerate(suite, start=1):
        assert f"edit {i}: {edit.prompt} -> {edit.target_new}" in out
        assert edit.rephrases[0] in out
    for text in ("before", "after", "rephrase", "rel", "gen", "loc", "reliability"):
        assert text in out


def test_demo_prints_a_table_in_a_temporary_workspace(app, tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ok(run(app, "demo", "--model", tiny_dirs["llama"], "--device", "cpu", "--max-new-tokens", 2,
                 "--method", "ft", "--config", "steps=1"))
    assert "a temporary workspace" in out and "edit 3:" in out and "scores" in out
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_methods_lists_configs_from_the_plugins(app):
    listing = ok(run(app, "methods"))
    assert "ft (editor)" in listing and "wise (editor)" in listing
    detail = ok(run(app, "methods", "ft"))
    assert "norm_constraint" in detail and "Adam learning rate" in detail
    doc = json.loads(ok(run(app, "methods", "grace", "--json")))
    keys = {f["key"]: f for f in doc["config"]}
    assert doc["kind"] == "editor" and keys["steps"]["default"] == 100 and keys["steps"]["type"] == "int"
    assert doc["schema"]["properties"]["epsilon"]["description"].startswith("Initial deferral radius")
    user_error(run(app, "methods", "nope"), "no method or intervention 'nope'", "ft", "grace")


def test_config_files_dry_runs_and_completion(app, gpt2, tmp_path):
    settings = tmp_path / "ft.yaml"
    settings.write_text("steps: 2\nlr: 0.02\n")
    ws = tmp_path / "ws"
    plan = json.loads(ok(run(app, "edit", "The capital of France is", "Rome", "--workspace", ws, *gpt2,
                             "--method", "ft", "--config-file", settings, "--config", "lr=0.03", "--dry-run")))
    assert plan["exists"] is False and plan["method"] == "ft" and not ws.exists()  # nothing created
    assert plan["method_config"]["steps"] == 2 and plan["method_config"]["lr"] == 0.03  # --config wins
    assert plan["requests"] == [{"prompt": "The capital of France is", "target_new": "Rome"}]
    edits = write_jsonl(tmp_path / "e.jsonl", {"prompt": "a b", "target_new": "c"}, {"prompt": "d e", "target_new": "f"})
    ok(run(app, "edit", "--file", edits, "--workspace", ws, *gpt2, "--method", "ft", "--config-file", settings))
    assert [r["id"] for r in history(app, ws)] == [1, 2]
    plan = json.loads(ok(run(app, "edit", "g h", "i", "--workspace", ws, "--dry-run", "--config-file", settings)))
    assert plan["exists"] is True and plan["active_edits"] == 2
    user_error(run(app, "edit", "g h", "i", "--workspace", ws, "--dry-run", "--config", "steps=9"),
               "different ft config")
    settings.write_text("- just\n- a list\n")
    user_error(run(app, "edit", "g h", "i", "--workspace", ws, "--dry-run", "--config-file", settings),
               "must hold a mapping")
    assert "--install-completion" in run(app, "--help").output


def test_eval_config_file_and_dry_run(app, tiny_dirs, tmp_path):
    import yaml

    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump({"suite": "builtin", "method": ["grace"], "edits": 2, "at": [1],
                                    "configs": {"grace": {"steps": 3}}}))
    common = ["--config-file", spec, "--model", tiny_dirs["gpt2"], "--device", "cpu", "--out", tmp_path / "run"]
    plan = json.loads(ok(run(app, "eval", *common, "--edits", "3", "--dry-run")))
    assert plan["settings"]["edits"] == 3 and plan["plan"]["edits"] == 3  # the command line wins over the file
    assert plan["plan"]["methods"]["grace"]["steps"] == 3 and plan["plan"]["points"] == [1, 3]
    assert not (tmp_path / "run").exists()
    ok(run(app, "eval", *common, "--no-plots"))
    written = yaml.safe_load((tmp_path / "run" / "run-config.yaml").read_text())
    assert written["method"] == ["grace"] and written["configs"] == {"grace": {"steps": 3}} and written["edits"] == 2
    spec.write_text("suite: builtin\ncolour: red\n")
    user_error(run(app, "eval", *common, "--dry-run"), "unknown setting(s) colour")
