from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PH3Config(BaseModel):
    """PH3 head pruning (Jin et al. 2024, "Cutting Off the Head Ends the Conflict", arXiv 2402.18154)."""

    model_config = ConfigDict(extra="forbid")

    favour: Literal["memory", "context"] = Field(
        "memory", description="Which knowledge source the pruning favours: 'memory' (the pruned heads are "
        "context heads, so the model keeps its own answer against a conflicting context) or 'context' "
        "(the pruned heads are memory heads, so the model follows the context). Recorded with the heads; "
        "the heads themselves are the intervention's state.")
    source: str = Field(
        "", description="Where the heads came from (e.g. the heads.json file and k), for the record only.")
