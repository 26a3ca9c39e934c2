"""Validated inputs: edit requests and the probes that measure them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from editkit.limits import NonBlank, Text


def _not_blank(value: str, what: str) -> str:
    if not value or not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


class LocalityProbe(BaseModel):
    """An unrelated prompt whose output the edit must leave unchanged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: NonBlank = Field(description="Prompt unrelated to the edit.")
    answer: Text | None = Field(default=None, description="Expected answer, if known.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _not_blank(v, "locality prompt")


class EditRequest(BaseModel):
    """One fact to change: `prompt` should now be completed by `target_new`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: NonBlank = Field(description="The prompt whose completion changes.")
    target_new: NonBlank = Field(description="The new completion.")
    subject: NonBlank | None = Field(default=None, description="Entity the fact is about, if known.")
    target_old: Text | None = Field(default=None, description="The completion before the edit, if known.")
    rephrases: list[NonBlank] = Field(default_factory=list, description="Paraphrases that should follow the edit.")
    locality: list[LocalityProbe] = Field(default_factory=list, description="Unrelated probes that must not change.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _not_blank(v, "prompt")

    @field_validator("target_new")
    @classmethod
    def _target(cls, v: str) -> str:
        return _not_blank(v, "target_new")

    @field_validator("rephrases")
    @classmethod
    def _rephrases(cls, v: list[str]) -> list[str]:
        return [_not_blank(r, "rephrase") for r in v]

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        return None if v is None else _not_blank(v, "subject")

    def texts(self) -> list[tuple[str, str | None]]:
        """(field, text) for every text of the request, named as in its JSON form."""
        return [("prompt", self.prompt), ("target_new", self.target_new), ("subject", self.subject),
                ("target_old", self.target_old),
                *[(f"rephrases.{i}", r) for i, r in enumerate(self.rephrases)],
                *[item for i, p in enumerate(self.locality)
                  for item in ((f"locality.{i}.prompt", p.prompt), (f"locality.{i}.answer", p.answer))]]
