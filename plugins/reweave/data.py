"""Cross-chunk recall episodes: earlier chunks state something, a later chunk asks for it, and
the earlier chunks are not in the later chunk's context.

Sources: built-in passkeys ("the code for the red locker is 4821", with a distractor code in
the same chunk and filler chunks between), and facts from CounterFact / zsRE in the shared
data (editkit.data; the counterfactual target is stated, so the frozen model cannot know it)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from editkit.errors import InvalidRequest

ADJECTIVES = ["red", "blue", "green", "black", "white", "silver", "golden", "old", "small", "large", "north",
              "south", "east", "west", "wooden", "iron", "glass", "yellow", "purple", "brown"]
OBJECTS = ["door", "locker", "safe", "vault", "gate", "box", "cabinet", "garage", "shed", "office", "drawer",
           "chest", "room", "case", "bike lock", "mailbox", "server", "laptop", "phone", "account"]
FILLER = [
    "The weather was mild and the meeting ran a little late.",
    "Someone left a cup of tea on the table by the window.",
    "The train to the city leaves every twenty minutes.",
    "We talked about the garden, the roof and the new paint.",
    "The report is due at the end of the month.",
    "A dog barked twice somewhere down the street.",
    "The library closes early on Sundays.",
    "She prefers to walk when the sun is out.",
    "The printer on the second floor is out of paper again.",
    "Lunch was soup and bread, as it is most days.",
    "The children played football until it got dark.",
    "He forgot his umbrella on the bus this morning.",
]


@dataclass
class Episode:
    """Memory chunks (read in order, oldest first), then a query whose continuation is `answer`."""

    chunks: list[str]
    query: str
    answer: str  # begins with a space; scored teacher-forced
    kind: str = "passkey"


def _code(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def passkey_episode(rng: random.Random, distance: int = 1, digits: int = 4, distractors: int = 1,
                    echo: bool = False) -> Episode:
    """The code is stated `distance` chunks before the query; later chunks hold filler and
    other codes (distractors), so recall needs the key's name, not just the latest number.
    `echo`: the answer restates the chunk's sentence up to the code ("Answer: the code for the
    red locker is"), so the asking token follows the name as the code does in the chunk."""
    names = rng.sample([(a, o) for a in ADJECTIVES for o in OBJECTS], 1 + distractors * distance)
    target, others = names[0], names[1:]
    code = _code(rng, digits)

    def fact(name, value):
        return f"The code for the {name[0]} {name[1]} is {value}."

    chunks = []
    for i in range(distance):
        facts = [fact(n, _code(rng, digits)) for n in others[i * distractors:(i + 1) * distractors]]
        if i == 0:
            facts.append(fact(target, code))
        rng.shuffle(facts)
        chunks.append(" ".join([rng.choice(FILLER), *facts]))
    lead = f"the code for the {target[0]} {target[1]} is" if echo else "it is"
    query = f"Question: what is the code for the {target[0]} {target[1]}? Answer: {lead}"
    return Episode(chunks, query, " " + code, "passkey")


def passkeys(n: int, seed: int = 0, distance: int = 1, digits: int = 4, distractors: int = 1,
             echo: bool = False) -> list[Episode]:
    rng = random.Random(seed)
    return [passkey_episode(rng, distance, digits, distractors, echo) for _ in range(n)]


def load_facts(source: str) -> list[tuple[str, str]]:
    """(prompt, counterfactual answer) pairs of the shared data ('counterfact': its training
    file; 'counterfact-dev': its dev file, for measuring only; or 'zsre'), read through the
    suite of that name."""
    from editkit.data import shared_file
    from editkit.host import get_host

    sources = {"counterfact": ("counterfact", "counterfact-train"), "counterfact-dev": ("counterfact", "counterfact"),
               "zsre": ("zsre", "zsre")}  # source: (suite, shared data set)
    if source not in sources:
        raise InvalidRequest(f"unknown fact source '{source}' (known: {', '.join(sources)})")
    suite, name = sources[source]
    data = get_host().suite(suite)().read(str(shared_file(name)), None, skip_invalid=True)
    return [(r.prompt.strip(), r.target_new.strip()) for r in data.requests]


def fact_episodes(source: str, n: int, seed: int = 0, distance: int = 1) -> list[Episode]:
    """Each episode states a counterfactual fact `distance` chunks back and asks for it."""
    facts = load_facts(source)
    rng = random.Random(seed)
    picked = rng.sample(facts, min(n, len(facts)))
    out = []
    for prompt, answer in picked:
        chunks = [f"{rng.choice(FILLER)} Remember this: {prompt} {answer}. {rng.choice(FILLER)}"]
        chunks += [f"{rng.choice(FILLER)} {rng.choice(FILLER)}" for _ in range(distance - 1)]
        out.append(Episode(chunks, f"{rng.choice(FILLER)} {prompt}", " " + answer, source))
    return out


def episodes(data: str, n: int, seed: int = 0, distance: int = 1, digits: int = 4) -> list[Episode]:
    """`data`: passkey | counterfact | zsre | mixed (half passkeys, half CounterFact facts)."""
    if data == "passkey":
        return passkeys(n, seed, distance, digits)
    if data in ("counterfact", "zsre"):
        return fact_episodes(data, n, seed, distance)
    if data == "mixed":
        items = passkeys(n - n // 2, seed, distance, digits) + fact_episodes("counterfact", n // 2, seed, distance)
        random.Random(seed).shuffle(items)
        return items
    raise InvalidRequest(f"unknown data '{data}' (known: passkey, counterfact, zsre, mixed)")
