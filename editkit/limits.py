"""Limits on input, in one place for the CLI, the Python API and the service: text must be
valid Unicode (JSON can spell a lone UTF-16 surrogate such as "\\ud800", which no tokenizer
or journal can store) and at most `max_prompt_chars()` characters per prompt or target; a
sampling seed is a whole number from 0 to MAX_SEED; a sampling temperature is 0 (greedy) or
at least MIN_TEMPERATURE (below it, logits / temperature overflow to inf and sampling fails)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Annotated

from pydantic import AfterValidator, Field

from editkit.errors import InvalidRequest

DEFAULT_MAX_PROMPT_CHARS = 4000
MAX_PROMPT_CHARS_ENV = "EDITKIT_MAX_PROMPT_CHARS"
MAX_SEED = 2**63 - 1  # a signed 64-bit integer, OpenAPI's int64
MIN_TEMPERATURE = 1e-3


def max_prompt_chars() -> int:
    """The longest prompt or target accepted: $EDITKIT_MAX_PROMPT_CHARS, else 4000."""
    raw = os.environ.get(MAX_PROMPT_CHARS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PROMPT_CHARS
    if not raw.isdecimal() or int(raw) < 1:
        raise InvalidRequest(f"{MAX_PROMPT_CHARS_ENV} must be a whole number of characters >= 1, got '{raw}'")
    return int(raw)


def valid_unicode(text: str) -> str:
    """`text` itself, or ValueError where it holds a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode (lone surrogate U+{ord(text[exc.start]):04X} "
                         f"at character {exc.start})") from None
    return text


# A string field of a request: pydantic refuses lone surrogates with a 422 / InvalidRequest.
Text = Annotated[str, AfterValidator(valid_unicode)]
# One that must hold more than whitespace: the model's validator says so in its own words;
# the schema states it as a pattern (some non-space character), for clients and the fuzzer.
NOT_BLANK_SCHEMA = {"pattern": r"\S"}
NonBlank = Annotated[Text, Field(json_schema_extra=NOT_BLANK_SCHEMA)]


class TextError(InvalidRequest):
    """A text that is not valid Unicode or is over the limit; `field` names it."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def check_texts(items: Iterable[tuple[str, str | None]], limit: int) -> None:
    """Raise TextError for the first (field, text) that is not valid Unicode or is longer
    than `limit` characters (None: absent, accepted)."""
    for field, text in items:
        if text is None:
            continue
        try:
            valid_unicode(text)
        except ValueError as exc:
            raise TextError(field, str(exc)) from None
        if len(text) > limit:
            raise TextError(field, f"longer than {limit} characters")


def check_seed(seed: int | None) -> None:
    """InvalidRequest unless `seed` is None or a whole number from 0 to MAX_SEED."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise InvalidRequest(f"seed must be a whole number from 0 to 2^63-1, got {str(seed)[:40]}")


def check_sampling(temperature: float, top_p: float) -> None:
    """InvalidRequest unless temperature is 0 or finite and >= MIN_TEMPERATURE, and top_p is in (0, 1]."""
    if not (temperature == 0 or (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE)):
        raise InvalidRequest(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature}")
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be above 0 and at most 1, got {top_p}")
