"""Contextual memory reweaving: identity at init, bounded detached buffers, exact clearing,
train/serve agreement, state round trip through a session, training lowers the loss; and on
the default model, held-out cross-chunk recall above the frozen baseline."""

import pytest
import torch

from editkit.errors import InvalidRequest
from editkit.plugins.reweave import MemoryReweaving, passkeys, prepare, reweaving, train
from editkit.plugins.reweave.train import batch_loss, binding_loss, evaluate, score, woven_forward
from editkit.session import Session
from editkit.sites import Site

FAST = {"steps": 2, "lr": 0.05, "early_stop_loss": 0.0}
TEXT = "The capital of Italy is Rome and the code for the red door is 4821"


@torch.no_grad()
def logits(loaded, text=TEXT):
    return loaded.model(loaded.tokenizer(text, return_tensors="pt").input_ids).logits


@torch.no_grad()
def feed(loaded, texts):
    for text in texts:
        loaded.model(loaded.tokenizer(text, return_tensors="pt").input_ids)


def perturb(rw, seed=0):
    """Random reweaver weights (a stand-in for a trained one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rw.module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_identity_at_init_and_detach(tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    base = logits(loaded)
    flags = [p.requires_grad for p in loaded.model.parameters()]
    with reweaving(loaded) as rw:
        assert torch.equal(logits(loaded), base)  # no conversation: inert
        with rw.conversation("c1") as buf:
            feed(loaded, ["The code for the red door is 4821.", "Someone left a cup of tea."])
            assert len(buf) > 0
            assert torch.equal(logits(loaded), base)  # memory present, zero-initialised output
        assert float(rw.module.o.weight.abs().sum()) == 0.0 and float(rw.module.gate) != 0.0
    assert torch.equal(logits(loaded), base)
    assert [p.requires_grad for p in loaded.model.parameters()] == flags


def test_buffer_bounded_detached_and_clear_restores(tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    base = logits(loaded)
    cfg = {"capacity": 12, "keep_per_chunk": 5, "capture_layers": [1, 2], "reweave_layer": -1}
    with reweaving(loaded, cfg) as rw:
        perturb(rw)
        with rw.conversation("long") as buf:
            for i in range(40):
                feed(loaded, [f"Chunk {i}: the weather was mild and the code was {1000 + i}."])
            assert buf.chunks == 40
            assert set(buf.layers) == set(rw.capture_ids) == {1, 2}
            for layer in buf.layers.values():
                assert len(layer) == 12 and not layer.states.requires_grad and layer.states.grad_fn is None
            assert rw.memory_bytes() == buf.nbytes() > 0
            changed = logits(loaded)
            assert not torch.allclose(changed, base)
            rw.clear()
            assert torch.equal(logits(loaded), base)  # cleared: the query itself is not read by itself
        # fifo keeps the newest
    with reweaving(loaded, {**cfg, "eviction": "fifo"}) as rw:
        with rw.conversation("f") as buf:
            for i in range(6):
                feed(loaded, [f"Chunk {i}: the weather was mild and the code was {1000 + i}."])
            assert all(b.order.tolist() == list(range(b.added - 12, b.added)) for b in buf.layers.values())


def test_conversations_are_separate_and_lru_bounded(tiny_loaded):
    loaded = tiny_loaded["llama"]
    base = logits(loaded)
    with reweaving(loaded, {"max_conversations": 2}) as rw:
        perturb(rw)
        with rw.conversation("a"):
            feed(loaded, ["The code for the red door is 4821."])
            with_a = logits(loaded)
        rw.clear("a")
        with rw.conversation("a"):
            feed(loaded, ["The code for the red door is 4821."])
        with rw.conversation("b"):
            assert torch.equal(logits(loaded), base)  # b has no memory of a
        with rw.conversation("a"):
            assert torch.allclose(logits(loaded), with_a, atol=1e-5)
        with rw.conversation("c"):
            feed(loaded, ["hello"])
        assert len(rw.buffers) == 2
        with pytest.raises(InvalidRequest, match="no conversation"):
            rw.buffer()
        import threading

        seen = []
        with rw.conversation("a"):  # the selection is per thread
            thread = threading.Thread(target=lambda: seen.append((rw.current, logits(loaded))))
            thread.start()
            thread.join()
            assert rw.current == "a"
        assert seen[0][0] is None and torch.equal(seen[0][1], base)


def test_padding_is_never_captured(tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    tok = loaded.tokenizer
    with reweaving(loaded, {"keep_per_chunk": 64, "capacity": 64}) as rw, rw.conversation("p") as buf:
        enc = tok(["short", "a much longer sentence about the red door code"], return_tensors="pt", padding=True)
        with torch.no_grad():
            loaded.model(**enc)
        assert all(len(b) == int(enc.attention_mask.sum()) for b in buf.layers.values())


VARIANTS = {"default": {}, "next_token": {"value_from": "next_token"}, "key_window": {"key_window": 3},
            "query_layer": {"query_layer": 1}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_path_matches_serving_and_lowers_loss(tiny_loaded, tiny_family, variant):
    loaded = tiny_loaded[tiny_family]
    items = passkeys(12, seed=1, digits=2)
    config = {"capture_layers": [0, 1], "reweave_layer": 2, **VARIANTS[variant]}
    with reweaving(loaded, config) as rw:
        perturb(rw, seed=3)
        prepared = prepare(rw, items[:2])
        ep, p = items[0], prepared[0]
        with rw.conversation("x"):
            feed(loaded, ep.chunks)
            served = loaded.model(p.ids.unsqueeze(0)).logits[0, p.positions]
        with torch.no_grad():
            h = rw.module(p.hidden[None], p.memory[None], p.sources[None],
                          query=None if p.query is None else p.query[None])
            top = rw.adapter.run_blocks(h, rw.reweave_id + 1)
            functional = rw.adapter.unembed(top[0, p.positions])
        assert torch.allclose(served, functional, atol=1e-4)
        for use in (True, False):  # the batched scorer agrees with serving-path evaluation
            fast, slow = score(rw, prepared, use_memory=use), evaluate(rw, items[:2], use_memory=use)
            assert fast["token_accuracy"] == slow["token_accuracy"]
            assert fast["answer_logprob"] == pytest.approx(slow["answer_logprob"], abs=1e-4)
    flags = [p.requires_grad for p in loaded.model.parameters()]
    with reweaving(loaded, config) as rw:
        prepared = prepare(rw, items)
        with torch.no_grad():
            before = batch_loss(rw, prepared).item()
        stats = train(rw, prepared, steps=30, lr=1e-2, batch_size=6)
        with torch.no_grad():
            after = batch_loss(rw, prepared).item()
        assert after < before - 0.05, (before, after)
        assert stats["steps"] == 30 and rw.meta["trained_steps"] == 30
        assert [p.requires_grad for p in loaded.model.parameters()] == flags
        assert all(p.grad is None for p in loaded.model.parameters())


@pytest.mark.parametrize("scorer", ["norm", "learned"])
def test_cached_projections_serve_what_fresh_ones_do(tiny_loaded, scorer):
    """Serving projects each buffered state once (kept in step with the buffer through appends
    and evictions) and reprojects after a weight change: greedy decoding with a full buffer
    gives the logits that projecting every state at every step gives."""
    loaded = tiny_loaded["llama"]
    config = {"capture_layers": [0, 1], "reweave_layer": 2, "capacity": 6, "keep_per_chunk": 3, "scorer": scorer}
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids

    def run(cache: bool) -> list[torch.Tensor]:
        with reweaving(loaded, config) as rw, torch.no_grad():
            rw.cache_projections = cache
            perturb(rw, seed=4)
            out = []
            with rw.conversation("c") as buf:
                feed(loaded, ["The red door code is 4821", "and the blue one 1234"])
                step = ids[:, :4]
                for i in range(8):  # each step's token is captured; the full buffer evicts
                    if i == 4:
                        perturb(rw, seed=5)  # new weights: cached projections must not be reused
                    logits_i = loaded.model(step).logits[:, -1]
                    out.append(logits_i)
                    step = logits_i.argmax(-1, keepdim=True)
                assert all(len(b) == 6 for b in buf.layers.values())
                cached = [b.proj is not None for b in buf.layers.values()]
                assert cached == [cache, cache]
            return out

    fresh, cached = run(False), run(True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fresh, cached))


def test_training_is_reproducible_and_seeded(tiny_loaded):
    """Same config seed and train seed: bit-identical reweavers (training runs under torch's
    deterministic algorithms; with several CPU threads the attention backward otherwise sums in
    a varying order); another config seed: another initialisation. The caller's RNG and
    deterministic-algorithms flag are left as they were."""
    loaded = tiny_loaded["llama"]
    items = passkeys(12, seed=1, digits=2)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    rng = torch.get_rng_state()

    def run(seed):
        with reweaving(loaded, {"capture_layers": [1, 2], "reweave_layer": 2, "seed": seed}) as rw:
            init = {k: v.clone() for k, v in rw.module.state_dict().items()}
            train(rw, prepare(rw, items), steps=10, lr=1e-2, batch_size=4, seed=seed)
            return init, rw.module.state_dict()

    (a_init, a), (_, b), (c_init, _) = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["o.weight"], a_init["o.weight"])
    assert not torch.equal(a_init["q.weight"], c_init["q.weight"])
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_state_round_trip_through_session(tmp_path, tiny_loaded):
    loaded = tiny_loaded["gpt_neox"]
    base = logits(loaded)
    ws = tmp_path / "ws"
    cfg = {"capture_layers": [0.5], "reweave_layer": -1, "heads": 2, "head_dim": 8}
    with reweaving(loaded, cfg) as rw:
        perturb(rw, seed=5)
        state = rw.state_dict()
    with Session.open(ws, loaded=loaded, method="ft", method_config=FAST) as s:
        rw = s.add_intervention("reweave", cfg, state=state)
        assert torch.equal(logits(loaded), base)  # no conversation selected
        with rw.conversation("t"):
            feed(loaded, ["The code for the red door is 4821."])
            remembered = logits(loaded)
        assert not torch.allclose(remembered, base)
        with pytest.raises(InvalidRequest, match="shape"):
            bad = {k: (v[:1] if v.dim() else v) for k, v in state[0].items()}
            s.remove_intervention("reweave")
            s.add_intervention("reweave", cfg, state=(bad, state[1]))
        s.add_intervention("reweave", cfg, state=state)
    assert torch.equal(logits(loaded), base)
    with Session.open(ws, loaded=loaded) as s:
        rw = s.interventions["reweave"]
        saved = rw.state_dict()[0]
        assert all(torch.equal(saved[k], state[0][k]) for k in state[0])
        with rw.conversation("t"):
            feed(loaded, ["The code for the red door is 4821."])
            assert torch.equal(logits(loaded), remembered)
        s.remove_intervention("reweave")
    assert torch.equal(logits(loaded), base)


def test_long_input_is_read_chunk_by_chunk_in_a_conversation(tmp_path, tiny_loaded, tiny_family):
    """An input longer than chunk_tokens: its earlier chunks go into the conversation's memory
    one forward pass each and generation continues from the last chunk; the same as a client
    sending the chunks as separate calls. Without a conversation the input is read whole."""
    from editkit.generation import Row, decode

    loaded = tiny_loaded[tiny_family]
    tok = loaded.tokenizer
    cfg = {"capture_layers": [0.5], "reweave_layer": -1, "heads": 2, "head_dim": 8, "chunk_tokens": 8}
    with reweaving(loaded, cfg) as rw:
        perturb(rw, seed=3)
        state = rw.state_dict()
    text = " ".join(f"the code for door {i} is {1000 + 7 * i}." for i in range(12))
    ids = tok(text).input_ids
    bos = [ids[0]] if ids[0] in tok.all_special_ids else []
    body = ids[len(bos):]
    assert len(body) > 40  # several chunks
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=FAST) as s:
        rw = s.add_intervention("reweave", cfg, state=state)
        assert len(ids) > loaded.context_length  # too long for the model read whole...
        with pytest.raises(InvalidRequest, match="over the model's context"):
            s.generate(text, max_new_tokens=5)  # ...as it is without a conversation
        assert not rw.buffers
        got = s.generate(text, max_new_tokens=5, conversation="long")
        head = body[:-8]
        assert rw.buffers["long"].chunks == -(-len(head) // 8) + 5  # one pass per earlier chunk, one per token
        with rw.conversation("by-hand"):
            for lo in range(0, len(head), 8):
                loaded.model(torch.tensor([bos + head[lo:lo + 8]]))
            by_hand = decode(loaded, [Row("", 5, prompt_ids=bos + body[-8:])])[0].text
        assert got == [by_hand]
        assert torch.equal(rw.buffers["long"].layers[rw.capture_ids[0]].states,
                           rw.buffers["by-hand"].layers[rw.capture_ids[0]].states)
        s.remove_intervention("reweave")


def test_bad_config_is_refused(tiny_loaded):
    loaded = tiny_loaded["llama"]
    for bad in ({"gate_init": 0.0}, {"capacity": 0}, {"scorer": "magic"}, {"capture_layers": []}):
        with pytest.raises(InvalidRequest, match="reweave config"):
            MemoryReweaving(loaded, bad)
    with pytest.raises(InvalidRequest, match="exceeds capacity"):
        MemoryReweaving(loaded, {"capacity": 4, "keep_per_chunk": 8}).attach()


@pytest.mark.parametrize("value_from", ["next_token", "token"])
def test_token_values_are_input_embeddings(tiny_loaded, value_from):
    """'next_token' stores the next token's input embedding as an entry's value ('token': its
    own); the key half is the token's state at the capture layer; with key_window, the states
    before it (zeros before the pass)."""
    loaded = tiny_loaded["llama"]
    ids = loaded.tokenizer("The code for the red door is 4821.", return_tensors="pt").input_ids
    n, width = ids.shape[1], loaded.model.config.hidden_size
    embeds = loaded.model.get_input_embeddings()(ids)[0]
    config = {"capture_layers": [1], "reweave_layer": 2, "keep_per_chunk": 64, "capacity": 64,
              "value_from": value_from, "key_window": 2}
    with reweaving(loaded, config) as rw, rw.conversation("c") as buf, torch.no_grad():
        seen, _ = rw.adapter.capture({"input_ids": ids}, {"h": (Site("block", 1), "out")})
        loaded.model(ids)
        states = buf.layers[1].states
    assert states.shape == (n, 3 * width)
    assert torch.allclose(states[:, :width], seen["h"][0], atol=1e-6)  # own state
    assert torch.equal(states[0, width:2 * width], torch.zeros(width))  # nothing before the pass
    assert torch.allclose(states[1:, width:2 * width], seen["h"][0, :-1], atol=1e-6)
    values = embeds[1:] if value_from == "next_token" else embeds[:-1]
    assert torch.allclose(states[:-1, 2 * width:], values, atol=1e-6)


def test_config_written_before_query_layer_keeps_its_meaning():
    """A complete config written before query_layer and key_window existed (every workspace and
    trained file of that time) reads as it did then, whatever today's defaults are."""
    from editkit.plugins.reweave.config import FIELDS_BEFORE_QUERY_LAYER, ReweaveConfig

    old = {k: v for k, v in ReweaveConfig().model_dump().items() if k in FIELDS_BEFORE_QUERY_LAYER}
    read = ReweaveConfig(**old)
    assert read.query_layer is None and read.key_window == 1
    assert ReweaveConfig(**{**old, "key_window": 3}).query_layer == ReweaveConfig().query_layer


def test_reconstruction_objective(tiny_loaded):
    """prepare(teacher=True) keeps the reweave block's output at the answer positions with the
    episode read whole (earlier chunks in the context); training with a reconstruction weight
    brings the woven states closer to it."""
    loaded = tiny_loaded["llama"]
    items = passkeys(8, seed=3, digits=2)
    with reweaving(loaded, {"capture_layers": [0, 1], "reweave_layer": 2}) as rw:
        prepared = prepare(rw, items, teacher=True)
        ep, p = items[0], prepared[0]
        before = [t for chunk in ep.chunks for t in loaded.tokenizer(chunk).input_ids]
        whole = torch.tensor([before + p.ids.tolist()])
        seen, _ = rw.adapter.capture({"input_ids": whole}, {"h": (Site("block", rw.reweave_id), "out")})
        assert torch.allclose(p.teacher, seen["h"][0, len(before) + p.positions], atol=1e-5)

        def error():
            with torch.no_grad():
                return batch_loss(rw, prepared, reconstruction=1.0).item() - batch_loss(rw, prepared).item()

        start = error()
        train(rw, prepared, steps=30, lr=1e-2, batch_size=4, reconstruction=10.0)
        assert error() < start - 1e-3, (start, error())


def test_fact_episodes_state_the_fact_and_ask_for_it():
    """Fact episodes from the shared data: the earlier chunk states the counterfactual fact,
    the query asks for it without it; CounterFact's training and dev files give other facts
    (training reads the first, measurement may read the second)."""
    from conftest import shared_path
    from editkit.plugins.reweave.data import fact_episodes

    shared_path("counterfact"), shared_path("counterfact-train")
    train, dev = fact_episodes("counterfact", 20, seed=1), fact_episodes("counterfact-dev", 20, seed=1)
    for ep in train + dev:
        prompt = ep.query.split(". ", 1)[1]
        assert f"{prompt}{ep.answer}." in ep.chunks[0] and ep.answer.strip() not in ep.query
    assert not {ep.query.split(". ", 1)[1] for ep in train} & {ep.query.split(". ", 1)[1] for ep in dev}
    with pytest.raises(InvalidRequest, match="unknown fact source"):
        fact_episodes("wikipedia", 2)


def test_passkeys_name_the_code_and_echo_only_rewords_the_answer():
    """A passkey chunk states the asked code and a distractor's; the echo control (issue 22's
    binding analysis) changes only the question's answer lead, so both draw the same episodes."""
    plain, echo = passkeys(20, seed=3, digits=2), passkeys(20, seed=3, digits=2, echo=True)
    for a, b in zip(plain, echo):
        name = a.query.split("code for the ", 1)[1].split("?")[0]
        assert f"The code for the {name} is{a.answer}." in a.chunks[0]
        assert a.chunks[0].count("The code for the") == 2 and a.query.endswith("Answer: it is")
        assert (b.chunks, b.answer) == (a.chunks, a.answer) and b.query.endswith(f"Answer: the code for the {name} is")


def test_learned_scorer_trains(tiny_loaded):
    loaded = tiny_loaded["llama"]
    items = passkeys(8, seed=2, digits=2)
    with reweaving(loaded, {"scorer": "learned", "capture_layers": [1, 2], "reweave_layer": 2}) as rw:
        prepared = prepare(rw, items)
        train(rw, prepared, steps=5, lr=1e-2, batch_size=4)
        assert float(rw.module.scorer.weight.abs().sum()) > 0


@pytest.mark.model
def test_default_model_recalls_across_chunks(trained_reweave):
    """Held-out passkeys one chunk back, served through conversations: recall with the trained
    reweaver far above the frozen model, which cannot see the earlier chunk (chance: 10% per
    digit). The benchmark's recipe at half the episodes (benchmarks/reweave.py: 512 episodes,
    100% for seeds 0-2); trained once per run (conftest.trained_reweave)."""
    stats, base, woven = trained_reweave["stats"], trained_reweave["base"], trained_reweave["woven"]
    print(f"\nreweave default model: train {stats}, baseline {base}, reweave {woven}, "
          f"{trained_reweave['seconds']:.1f}s")
    assert stats["last5_loss"] < stats["first_loss"] - 2.0
    assert base["token_accuracy"] < 0.3
    assert woven["token_accuracy"] > base["token_accuracy"] + 0.5
    assert woven["exact"] > 0.5 and woven["answer_logprob"] > base["answer_logprob"] + 1.5


def test_cli_train_apply_remove(tiny_dirs, tmp_path):
    import json

    from typer.testing import CliRunner

    from editkit.cli.main import build_app
    from editkit.host import get_host
    from editkit.plugins.reweave import load_file

    app, runner = build_app(get_host()), CliRunner()
    model = ["--model", str(tiny_dirs["llama"]), "--device", "cpu"]
    small = ["--steps", "3", "--examples", "6", "--held-out", "2", "--config", "capture_layers=[1,2]", "--data", "passkey"]
    out = tmp_path / "rw.safetensors"
    result = runner.invoke(app, ["reweave", "train", "--out", str(out), *small, "--config", "value_from=next", *model])
    assert result.exit_code == 1 and "--binding 0" in result.output and not out.exists()
    result = runner.invoke(app, ["reweave", "train", "--out", str(out), "--json", *small, *model])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["train"]["steps"] == 3 and set(report["held_out"]) == {"baseline", "reweave"}
    tensors, doc = load_file(out)
    assert doc["config"]["capture_layers"] == [1, 2] and doc["state"]["trained_steps"] == 3 and "o.weight" in tensors
    ws = tmp_path / "ws"
    add = ["intervention", "add", "reweave", "--from", str(out), "--workspace", str(ws), *model]
    result = runner.invoke(app, [*add, "--config", "heads=2"])  # what it learnt comes from the file
    assert result.exit_code == 1 and "heads" in result.output and not ws.exists()
    result = runner.invoke(app, [*add, "--config", "chunk_tokens=8"])  # how it serves may change
    assert result.exit_code == 0, result.output
    with Session.open(ws, create=False) as s:
        rw = s.interventions["reweave"]
        assert rw.config.chunk_tokens == 8 and rw.capture_ids == [1, 2]
    long_prompt = " ".join(["the code for the red door is 4821."] * 40)  # over the tiny model's context
    result = runner.invoke(app, ["generate", long_prompt, "--max-new-tokens", "3", "--workspace", str(ws), *model])
    assert result.exit_code == 1 and "context" in result.output  # read whole without a conversation
    result = runner.invoke(app, ["generate", long_prompt, "--max-new-tokens", "3", "--conversation", "c",
                                 "--workspace", str(ws), "--json", *model])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["reweave", "train", "--workspace", str(ws), "--json", *small[:6], *small[8:]])
    assert result.exit_code == 0, result.output  # continues training the workspace's reweaver
    with Session.open(ws, create=False) as s:
        assert s.interventions["reweave"].meta["trained_steps"] == 6
    assert runner.invoke(app, ["intervention", "remove", "reweave", "--workspace", str(ws)]).exit_code == 0
    result = runner.invoke(app, ["intervention", "remove", "reweave", "--workspace", str(ws)])
    assert result.exit_code == 1 and "not attached" in result.output
    result = runner.invoke(app, ["reweave", "train", "--out", str(out), "--workspace", str(ws)])
    assert result.exit_code == 1 and "exactly one" in result.output


def test_conversations_through_session_and_http(tmp_path, tiny_loaded):
    from fastapi.testclient import TestClient

    from editkit.service import create_app

    loaded = tiny_loaded["llama"]
    cfg = {"capture_layers": [0.5], "reweave_layer": -1, "heads": 2, "head_dim": 8}
    with reweaving(loaded, cfg) as rw:
        perturb(rw, seed=3)
        state = rw.state_dict()
    prompt, fact = "The code for the red door is", "Remember: the code for the red door is 4821."
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=FAST) as s:
        s.add_intervention("reweave", cfg, state=state)
        rw = s.interventions["reweave"]
        plain = s.generate(prompt, max_new_tokens=4)
        fresh = s.generate(prompt, max_new_tokens=4, conversation="u1")  # the prompt itself is now in u1
        s.generate(fact, max_new_tokens=1, conversation="u1")
        assert rw.current is None and set(rw.buffers) == {"u1"}  # selection ends with the call
        logits_plain = logits(loaded, prompt)  # no conversation selected: the plugin is inert
        with rw.conversation("u1"):
            remembered = logits(loaded, prompt)
        assert not torch.allclose(remembered, logits_plain)
        s.clear_conversation("u1")
        assert "u1" not in rw.buffers
        assert s.generate(prompt, max_new_tokens=4, conversation="u1") == fresh  # cleared: starts over
        assert s.generate(prompt, max_new_tokens=4) == plain
        with pytest.raises(InvalidRequest, match="conversation"):
            s.generate(prompt, conversation="bad id with spaces")

        client = TestClient(create_app(s))
        r = client.post("/v1/generate", json={"prompts": [fact], "max_new_tokens": 1, "conversation": "web-7"})
        assert r.status_code == 200, r.text
        assert len(rw.buffers["web-7"]) > 0
        assert client.delete("/v1/conversations/web-7").json() == {"conversation": "web-7", "cleared": True}
        assert "web-7" not in rw.buffers
        r = client.post("/v1/generate", json={"prompts": [fact], "conversation": "no spaces allowed"})
        assert r.status_code == 422 and "conversation" in r.text


def test_binding_content_scan_runs_on_every_family(tiny_loaded, tiny_family):
    """benchmarks/reweave_recipe.py --binding-content reads chunk and question in separate
    passes through the adapter (heads' query/key slices of separate, fused and interleaved
    projections); a token's mention matches its own earlier mention by content at the first
    block, whatever the weights."""
    from conftest import benchmark_module

    recipe = benchmark_module("reweave_recipe")
    loaded = tiny_loaded[tiny_family]
    found = recipe.binding_content(loaded, 8)
    assert found["episodes"] >= 4
    assert len(found["layers"]) == loaded.adapter.num_layers
    for row in found["layers"]:
        assert 0 <= row["head"] < loaded.adapter.num_heads
        assert all(0.0 <= row[k] <= 1.0 for k in ("head_right", "last->name", "name->name", "last->code", "is->is"))
    assert found["layers"][0]["name->name"] >= 0.75


def test_binding_objective_pulls_attention_onto_the_entries_holding_the_answer(tiny_loaded, tiny_family):
    """train() adds, by default, -log(attention mass on the memory entries whose stored value is
    the token to predict): training with it lowers that term (the entries are found, the gradient
    reaches the attention); where values are not token embeddings the default is refused with a
    clear error and binding=0 trains."""
    loaded = tiny_loaded[tiny_family]
    items = passkeys(12, seed=1, digits=2)
    with reweaving(loaded, {"capture_layers": [1], "reweave_layer": 2, "query_layer": 1}) as rw:
        prepared = prepare(rw, items)

        def term() -> float:
            attention: list = []
            with torch.no_grad():
                woven_forward(rw, prepared, attention)
                return float(binding_loss(rw, prepared, attention[0]))

        before = term()
        assert before > 0.5  # entries holding the digits exist, and attention starts spread out
        train(rw, prepared, steps=30, lr=1e-2, batch_size=6)
        assert term() < before - 0.3, (before, term())
    with reweaving(loaded, {"capture_layers": [1], "reweave_layer": 2, "query_layer": 1, "value_from": "self"}) as rw:
        prepared = prepare(rw, items[:2])
        with pytest.raises(InvalidRequest, match="binding=0"):
            train(rw, prepared, steps=1)
        assert rw.meta.get("trained_steps", 0) == 0
        assert train(rw, prepared, steps=1, binding=0.0)["steps"] == 1
