"""Suites: each format parsed from small files written here, malformed records named by index
and field (or skipped and counted), plugin registration, and the real ../shared files."""

from __future__ import annotations

import json

import pytest

from editkit.errors import InvalidRequest
from editkit.evaluation.suites import CounterFactSuite, EditCase, JsonlSuite, Suite, ZsreSuite
from editkit.hookspecs import hookimpl
from editkit.host import PluginHost, get_host

from conftest import shared_path

ZSRE = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What does UniFirst make?",
     "alt": "unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who wrote hamlet",
     "loc_ans": "William Shakespeare",
     "portability": {"New Question": "What does UniFirst's product fly on?", "New Answer": "air"}},
    {"subject": "Ontario", "src": "Which country is Ontario in?", "rephrase": "Ontario is in which country?",
     "alt": "France", "answers": ["Canada"], "loc": "nq question: capital of japan", "loc_ans": "Tokyo"},
]
CF_MEND = [{"case_id": 1, "prompt": "David Robinson professionally plays the sport", "target_new": "baseball",
            "subject": "David Robinson", "ground_truth": "basketball",
            "rephrase_prompt": "David Robinson's sport is", "locality_prompt": "Shaquille O'Neal plays",
            "locality_ground_truth": "basketball"}]
CF_ROME = [{"case_id": 0, "requested_rewrite": {
    "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Danielle Darrieux",
    "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Danielle Darrieux's first language is", "Darrieux spoke natively"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Montesquieu's native language is"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"], "generation_prompts": ["x"]}]


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_builtin_suites_are_registered_through_the_host():
    suites = get_host().registry["suites"]
    assert {"builtin", "zsre", "counterfact", "jsonl"} <= set(suites)
    assert suites["zsre"][1] == "evaluation"


def test_a_third_party_suite_registers():
    class Mine(Suite):
        name = "mine"

        def records(self, path):
            return [{"q": "2+2 is", "a": "5"}]

        def convert(self, record):
            from editkit.evaluation.suites import build_request, text
            return EditCase(build_request(prompt=text(record, "q"), target_new=text(record, "a")))

    class Plugin:
        @hookimpl
        def register_suites(self, register):
            register(Mine)

    host = PluginHost(candidates=[], env={})
    host.add_plugin(Plugin(), "mine-plugin")
    assert host.suite("mine")().load("x")[0].target_new == "5"


def test_zsre(tmp_path):
    data = ZsreSuite().read(write_json(tmp_path / "z.json", ZSRE))
    assert data.total == 2 and not data.skipped
    case = data.cases[0]
    req = case.request
    assert req.prompt == ZSRE[0]["src"] and req.target_new == "unmanned aircraft" and req.target_old == "uniform"
    assert req.rephrases == ["What does UniFirst make?"] and req.subject == "UniFirst"
    assert req.locality[0].prompt == "nq question: who wrote hamlet"
    assert req.locality[0].answer == "William Shakespeare"
    assert case.portability[0].answer == "air"
    assert data.cases[1].portability == () and data.cases[1].index == 1
    assert ZsreSuite().load(tmp_path / "z.json", limit=1)[0] == req


def test_counterfact_mend_format(tmp_path):
    req = CounterFactSuite().load(write_json(tmp_path / "cf.json", CF_MEND))[0]
    assert req.prompt == "David Robinson professionally plays the sport"
    assert (req.target_new, req.target_old) == ("baseball", "basketball")
    assert req.rephrases == ["David Robinson's sport is"]
    assert [(p.prompt, p.answer) for p in req.locality] == [("Shaquille O'Neal plays", "basketball")]


def test_counterfact_rome_format(tmp_path):
    req = CounterFactSuite().load(write_json(tmp_path / "cf.json", CF_ROME))[0]
    assert req.prompt == "The mother tongue of Danielle Darrieux is"
    assert (req.target_new, req.target_old, req.subject) == ("English", "French", "Danielle Darrieux")
    assert req.rephrases == CF_ROME[0]["paraphrase_prompts"]
    assert [p.answer for p in req.locality] == ["French", "French"]
    assert req.locality[1].prompt == "Montesquieu's native language is"


def test_generic_jsonl(tmp_path):
    rows = [{"prompt": "The Eiffel Tower is in", "target_new": "Rome", "rephrases": ["The Eiffel Tower stands in"],
             "locality": [{"prompt": "The capital of Germany is", "answer": "Berlin"}, {"prompt": "Hello"}],
             "portability": [{"prompt": "The Eiffel Tower's country is", "answer": "Italy"}]},
            {"prompt": "2 + 2 =", "target_new": "5"}]
    data = JsonlSuite().read(write_jsonl(tmp_path / "e.jsonl", rows))
    first, second = data.cases
    assert first.request.locality[1].answer is None and first.portability[0].answer == "Italy"
    assert second.request.rephrases == [] and second.request.locality == []


@pytest.mark.parametrize("suite, records, index, field", [
    (ZsreSuite, ZSRE + [{"src": "Who?", "rephrase": "Who is?"}], 2, "alt"),
    (ZsreSuite, [ZSRE[0], {**ZSRE[1], "src": 7}], 1, "src"),
    (ZsreSuite, [{**ZSRE[1], "alt": "   "}], 0, "alt"),
    (CounterFactSuite, CF_MEND + [{**CF_MEND[0], "target_new": None}], 1, "target_new"),
    (CounterFactSuite, [{**CF_ROME[0], "requested_rewrite": {**CF_ROME[0]["requested_rewrite"], "target_new": {}}}],
     0, "requested_rewrite.target_new.str"),
    (JsonlSuite, [{"prompt": "a", "target_new": "b"}, {"prompt": "a", "target": "b"}], 1, "target"),
    (JsonlSuite, [{"prompt": "a", "target_new": "b", "locality": [{"answer": "x"}]}], 0, "locality[0].prompt"),
])
def test_malformed_record_names_index_and_field(tmp_path, suite, records, index, field):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(InvalidRequest) as err:
        suite().read(path)
    message = str(err.value)
    assert f"record {index}:" in message and f"'{field}'" in message
    data = suite().read(path, skip_invalid=True)
    assert len(data.skipped) == 1 and data.skipped[0][0] == index
    assert len(data.cases) == len(records) - 1 and data.total == len(records)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target_new": "b"}\n{not json\n', encoding="utf-8")
    with pytest.raises(InvalidRequest, match="line 2"):
        JsonlSuite().read(bad)
    with pytest.raises(InvalidRequest, match="not found"):
        JsonlSuite().read(tmp_path / "absent.jsonl")
    with pytest.raises(InvalidRequest, match="needs a data file"):
        ZsreSuite().read(None)


@pytest.mark.shared
def test_shared_zsre_loads():
    data = ZsreSuite().read(shared_path("zsre"))
    assert len(data.cases) == 500 and not data.skipped
    assert all(c.request.rephrases and c.request.locality for c in data.cases)


@pytest.mark.shared
def test_shared_counterfact_loads():
    data = CounterFactSuite().read(shared_path("counterfact"))
    assert len(data.cases) == 1000 and not data.skipped
    assert data.cases[0].request.target_old == "basketball"
