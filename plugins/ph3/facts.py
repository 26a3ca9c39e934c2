"""PH3's built-in fact set: simple facts the default model (SmolLM2-135M-Instruct) completes
greedily (checked: all 48 below, float32 on CPU), grouped by relation so that a conflicting
answer can come from another fact of the same relation. Used for the demo and for tests on a
machine without ../shared; build_items() still keeps only the facts the loaded model knows.

Each row: (relation, subject, prompt, answer)."""

from __future__ import annotations

_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("England", "London"),
    ("Greece", "Athens"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Denmark", "Copenhagen"),
    ("the Netherlands", "Amsterdam"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("Mexico", "Mexico"),
    ("Chile", "Santiago"), ("Scotland", "Edinburgh"),
]
_LANGUAGES = [
    ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
    ("Russia", "Russian"), ("the Netherlands", "Dutch"), ("Poland", "Polish"), ("Turkey", "Turkish"),
    ("Israel", "Hebrew"),
]
_MAKERS = [
    ("the iPhone", "Apple"), ("the PlayStation", "Sony"), ("the Galaxy phone", "Samsung"),
    ("the Xbox", "Microsoft"), ("the Boeing 747", "Boeing"),
]
_AUTHORS = [
    ("Pride and Prejudice", "Jane Austen"), ("Romeo and Juliet", "William Shakespeare"),
    ("Adventures of Huckleberry Finn", "Mark Twain"),
]
_CONTINENTS = [
    ("France", "Europe"), ("Kenya", "Africa"), ("Germany", "Europe"), ("Nigeria", "Africa"),
    ("Argentina", "South America"), ("Italy", "Europe"),
]

FACTS: list[tuple[str, str, str, str]] = (
    [("capital", c, f"The capital of {c} is", a) for c, a in _CAPITALS]
    + [("language", c, f"The official language of {c} is", a) for c, a in _LANGUAGES]
    + [("maker", p, f"{p[0].upper() + p[1:]} is made by", a) for p, a in _MAKERS]
    + [("author", b, f"{b} was written by", a) for b, a in _AUTHORS]
    + [("continent", c, f"{c} is located in the continent of", a) for c, a in _CONTINENTS]
)
