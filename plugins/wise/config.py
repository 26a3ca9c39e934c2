from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class WISEConfig(BaseModel):
    """WISE (arXiv 2405.14768). Defaults follow the paper and its LLaMA-2 settings except where
    they failed or cost more on the default model: the margin unit (fitted to the model's
    activation scale), beta, protected input directions, lr, unrelated prompts per edit, replay,
    early stop, target checks every few steps once learnt, 5 context prefixes instead of 10, a
    higher routing threshold, Retrieve with small shards, and a memory answering only sequences
    worded like one of its edits (key_gate) that hold its subject (subject_gate). docs/wise.md
    lists each departure, why, and what was measured.
    `preset="paper"` starts from the paper's settings instead (PAPER_PRESET; fields given
    explicitly still win)."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["tuned", "paper", "paper-retrieve"] = Field("tuned", description="Starting point of every field not given: 'tuned' (the defaults below, fitted to small models), 'paper' (WISE-Merge with the paper's and EasyEdit's LLaMA-2 hparams) or 'paper-retrieve' (WISE-Retrieve as the paper defines it: shards of 500 merged into one retrievable memory per 1,000 edits, activation-only replay, top-1 over every memory); docs/wise.md.")

    # where the side memory lives and how it is used
    layer: int | float = Field(0.85, description="Layer whose MLP down-projection is copied as side memory: index, negative index, or fraction of depth.")
    mode: Literal["merge", "retrieve"] = Field("retrieve", description="WISE-Retrieve (one memory per shard, top-1 by activation score at inference) or WISE-Merge (shards TIES-merged into one side memory; the paper's default, but one memory of a small model forgets: see docs/wise.md).")
    act_ratio: float = Field(0.95, gt=0, le=1, description="Routing threshold as a fraction of the smallest activation score of the memory's own edits (EasyEdit: 0.88; 0.95 chosen on a 1,000-edit CounterFact training stream, held out on CounterFact dev and zsRE: fewer neighbours routed at the same Rel, docs/wise.md).")
    score_reduce: Literal["mean", "max"] = Field("mean", description="How per-token activation distances make one sequence score.")

    # optimisation
    steps: int = Field(70, ge=1, le=10_000, description="Most optimisation steps per edit.")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Optimiser of the side memory (paper: SGD).")
    lr: float = Field(10.0, gt=0, description="Learning rate on the side memory (paper: 1.0 on the plain copy; the side memory here sees inputs with protect_energy of their generic energy removed, so its gradients are about 10x smaller).")
    norm_constraint: float = Field(1.0, gt=0, description="Bound on every entry of side memory minus main memory (L-infinity).")
    early_stop: bool = Field(True, description="Stop an edit once its targets are learnt (early_stop_loss or early_stop_lead) and all three margins are met.")
    early_stop_loss: float = Field(0.01, ge=0, description="Targets count as learnt once the target cross-entropy is below this.")
    early_stop_lead: float = Field(1.0, description="Targets also count as learnt once every target token of the edit's rows (its prompt, with and without context prefixes) is the greedy prediction by at least this many nats of log-probability, and every replayed edit's targets are still the greedy prediction (or no worse than when this edit began).")
    target_check_every: int = Field(4, ge=1, le=1000, description="Once an edit's targets are learnt, run the layers above the edited one (the cross-entropy) only every this many steps, and before stopping; the steps between train the activation margins alone, which need none of them (fast path only; 1 = every step, as the paper; most steps of an edit push unrelated prompts below alpha).")
    margin_tolerance: float = Field(0.25, ge=0, description="For early stopping, a margin counts as met within this many margin units of it (an unrelated prompt at alpha + 0.1 routes no differently, thresholds sit near beta; without it an edit could spend its remaining steps on a hinge violated by a hundredth of a unit).")
    early_stop_flat: bool = Field(False, description="Stop instead when the total loss is at most 0.02 and moved at most 1e-4 since the previous step (EasyEdit's meter; the paper preset).")

    # margin (routing) loss
    alpha: float = Field(5.0, ge=0, description="Unrelated prompts' activation score must stay below alpha (margin units).")
    beta: float = Field(30.0, ge=0, description="In-scope activation score must exceed beta (margin units; paper 20: with 20 the thresholds fell below unrelated probes' scores).")
    gamma: float = Field(10.0, ge=0, description="In-scope scores must exceed unrelated scores by gamma (margin units).")
    margin_unit: float | Literal["auto"] = Field("auto", description="Activation-norm size of one margin unit: 'auto' = 1% of the median per-token norm of the main memory's output on unrelated prompts; 1.0 = the paper's absolute margins.")
    protect_energy: float = Field(0.9, ge=0, lt=1, description="The side memory ignores the input directions holding this share of the unrelated pool's activation energy, so generic text scores low; 0 = the paper's plain copy.")
    margin_weight: float = Field(1.0, ge=0, description="Weight of the margin loss against the target cross-entropy.")
    margin_mean: Literal["all", "violated"] = Field("all", description="Each margin term is averaged over all (in-scope, unrelated) pairs, or over the violated ones only (EasyEdit; the paper preset).")

    # training data around each edit
    n_contexts: int = Field(5, ge=0, le=100, description="Random context prefixes added to each edit, plus the bare prompt (the paper: 10; 5 measured equal within a record or two on held-out CounterFact and zsRE streams at 1.5-1.6x fewer seconds per edit, docs/wise.md).")
    context_lengths: list[int] = Field(default_factory=lambda: [5, 10], description="Token lengths of the generated prefixes, used in turn.")
    cache_contexts: bool = Field(True, description="Generate the context prefixes once per session (False: regenerate them every edit; an ablation, EasyEdit caches them too).")
    unrelated_per_edit: int = Field(32, ge=1, le=128, description="Unrelated prompts drawn from the pool for each edit's margin loss (paper: 1 per edit, over 1000s of edits; cheap on the fast path, which scores them at the edited layer only).")
    unrelated_prompts: list[str] | None = Field(None, description="Pool of unrelated prompt texts (prompt plus answer); None uses the built-in pool.")
    subject_negatives: int = Field(0, ge=0, le=64, description="Out-of-scope prompts made from the edit's own prompt with its subject swapped for other entities (a built-in list), pushed below the unrelated margin like the unrelated prompts: CounterFact's neighbourhood prompts share the edit's relation with another subject. Needs the request's subject in its prompt; 0 = off (measured, docs/wise.md: CounterFact Loc 0.74 -> 0.96 at 8, but zsRE Rel 0.95 -> 0.86).")
    subject_negatives_below: Literal["alpha", "edit"] = Field("alpha", description="How far below the edit the subject-swapped prompts of subject_negatives are pushed: 'alpha', like unrelated prompts; 'edit', only gamma below the edit's own scores (its routing threshold sits there), an easier target for prompts worded like the edit (measured, docs/wise.md, 30 held-out records each: with subject_negatives=8, CounterFact dev Loc 0.86 -> 0.91 and Rel 0.95 -> 1.00 over the default, zsRE unchanged record for record, at twice the steps per CounterFact edit).")
    replay: int = Field(8, ge=0, le=64, description="Earlier edits (at most this many of each kind, drawn at random) replayed with each new edit; 0 = off.")
    replay_mode: Literal["train", "activation"] = Field("train", description="'train': the memory's earlier edits are trained again (cross-entropy and in-scope margins). 'activation' (paper appendix B.3): no cross-entropy; the memory's earlier edits are only kept above the in-scope margin.")
    stream_negatives: int = Field(0, ge=0, le=64, description="WISE-Retrieve: earlier edits of other memories (at most this many, drawn at random) pushed below the unrelated margin in the memory being trained, so top-1 routing tells memories apart (the paper's appendix B.3 replay does this; 0 = off).")

    # knowledge sharding
    mask_ratio: float = Field(0.2, gt=0, le=1, description="Fraction of side-memory entries each shard may change (rho); a fresh random mask per shard.")
    shard_size: int = Field(8, ge=1, description="Edits per shard: a new gradient mask (merge) or a new memory (retrieve) after this many (8: every edit replays all its shard-mates at replay=8).")
    merge_every: int = Field(2, ge=1, description="WISE-Merge: TIES-merge the shards into the side memory every this many shards.")
    ties_density: float = Field(0.53, gt=0, le=1, description="TIES: fraction of each shard's change kept (largest magnitudes) before sign election.")
    retrieve_merge_every: int = Field(0, ge=0, description="WISE-Retrieve: TIES-merge every this many finished shards into one retrievable memory (the paper: merge_freq / save_freq = 2), so memories grow as T / (shard_size x this); 0 = never, one memory per shard.")
    faiss_min_memories: int | None = Field(16, ge=1, description="WISE-Retrieve with key_gate None: from this many memories on, a faiss index over the memories' mean inputs proposes faiss_candidates memories and exact activation scores pick among them; None = top-1 by activation score over every memory (the paper). Measured at 1,000 CounterFact edits (126 memories; docs/wise.md): the prefilter picks another memory than the exact scan for a quarter of in-scope prompts, yet gives better Rel (0.845 vs 0.768) and Loc (0.522 vs 0.468) at 2.7 vs 43 ms per prompt.")
    key_gate: float | None = Field(0.6, ge=-1, le=1, description="A memory may answer a sequence only if it holds an edit one of whose keys (the mean input at the edited layer, protected directions removed, unit length, of its prompt and of its prompt with its target) has at least this cosine with the sequence's; the nearest such memories (at most faiss_candidates) are the candidates exact activation scores pick among, in place of the faiss prefilter. None = activation scores alone (the paper). 0.6 chosen on 100 CounterFact training edits and 30 zsRE dev edits; held out on 100 CounterFact dev edits: Loc unchanged 0.80 -> 0.975 and Rel 0.94 -> 1.00 at equal Gen (docs/wise.md).")
    subject_gate: float | None = Field(0.8, ge=-1, le=1, description="With key_gate: an edit whose request names a subject found in its prompt passes the gate only for sequences with a token whose state has at least this cosine with the edit's subject key (its subject's last token in its prompt, at block subject_layer; attention sinks, such as each sequence's first token, are never compared and give no key): CounterFact's neighbourhood prompts are worded like the edit, about another subject. Edits without a subject are gated by key_gate alone. None = off. 0.8 chosen on 1,000 CounterFact training edits and 30 zsRE dev edits; held out on 100 CounterFact dev edits: Loc unchanged 0.975 -> 0.995 at equal Rel and Gen; on 1,000 CounterFact dev edits Loc unchanged 0.970, Rel 0.990 (docs/wise.md).")
    subject_layer: int | float = Field(0.2, description="Block whose output states subject_gate compares (index, negative index or fraction of depth; must lie below the edited layer). Early blocks hold which entity a token belongs to before context blurs it.")
    faiss_candidates: int = Field(4, ge=1, description="WISE-Retrieve: candidate memories the faiss index returns per sequence.")

    # implementation
    packed_dtype: Literal["float32", "float16"] = Field("float16", description="WISE-Retrieve: finished memories are kept packed (a bitmap of their nonzero entries plus those entries' values) in this dtype. float16: 126 memories of a 1,000-edit CounterFact stream in 59 MiB instead of 101 (float32, exact; 446 MB dense), with the same Rel/Gen/Loc on its 100 measured records (docs/wise.md); the memory being trained stays float32.")
    fast_path: bool = Field(True, description="Cache the edited layer's inputs per edit and run only the layers above it at each step (False: whole model every step).")
    seed: int = Field(0, description="Seed of the context-prefix generation (edits themselves use the session's per-request seed).")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("context_lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 or n > 64 for n in v):
            raise ValueError("context_lengths needs at least one length, each between 1 and 64")
        return v

    @field_validator("unrelated_prompts")
    @classmethod
    def _pool(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not p or not p.strip() for p in v)):
            raise ValueError("unrelated_prompts must be None or a non-empty list of non-blank texts")
        return v

    @field_validator("margin_unit")
    @classmethod
    def _unit(cls, v):
        if not isinstance(v, str) and v <= 0:
            raise ValueError("margin_unit must be 'auto' or a positive number")
        return v


# The paper's settings (arXiv 2405.14768; EasyEdit's hparams/WISE/llama-7b.yaml). Still
# different from the paper in merge mode (docs/wise.md): shards start from the previous shard's
# end state, not independently from the main memory.
PAPER_PRESET = {"lr": 1.0, "beta": 20.0, "margin_unit": 1.0, "protect_energy": 0.0, "unrelated_per_edit": 1,
                "replay": 0, "n_contexts": 10, "act_ratio": 0.88, "margin_mean": "violated", "early_stop_flat": True, "target_check_every": 1, "margin_tolerance": 0.0, "mode": "merge",
                "shard_size": 500, "merge_every": 2, "key_gate": None,
                "subject_gate": None}
# WISE-Retrieve as the paper defines it: a shard per save_freq (500) edits, the shards TIES-merged
# into one retrievable memory per merge_freq (1,000), activation-only replay (appendix B.3; the
# paper gives no count: 8 of each kind here), top-1 by activation score over every memory.
PAPER_RETRIEVE_PRESET = {**PAPER_PRESET, "mode": "retrieve", "retrieve_merge_every": 2, "replay": 8,
                         "replay_mode": "activation", "stream_negatives": 8, "faiss_min_memories": None}
PRESETS = {"paper": PAPER_PRESET, "paper-retrieve": PAPER_RETRIEVE_PRESET}
