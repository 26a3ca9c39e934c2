"""The service's settings and the error type its routes raise."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from editkit.limits import max_prompt_chars


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str | None = Field(None, repr=False, description=(
        "Bearer token required by every request that changes state; none: open."))
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body accepted (413 above).")
    max_prompt_chars: int = Field(default_factory=max_prompt_chars, ge=1, description=(
        "Longest prompt or target accepted (422 above); default $EDITKIT_MAX_PROMPT_CHARS, else 4000."))
    max_new_tokens: int = Field(512, ge=1, description="Most tokens one generation may ask for.")
    max_batch: int = Field(64, ge=1, description="Most prompts or edits in one request.")
    data_dir: str | None = Field(None, description="Directory /v1/evaluate may read suite files from.")
    batch_rows: int = Field(32, ge=1, description=(
        "Most prompts decoded together: concurrent generation requests share batches up to this size."))
    batch_window_ms: float = Field(20.0, ge=0, description=(
        "How long the first request of a batch waits for others to join it (milliseconds)."))
    writer: str | None = Field(None, description=(
        "A read replica (a session that follows its workspace): the writer's address, named in the 409 "
        "that answers edits and rollbacks."))
    poll_interval: float = Field(1.0, gt=0, description="A read replica looks for new heads this often (seconds).")


class ApiError(Exception):
    def __init__(self, status: int, reason: str, fields: list[dict] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.fields = status, reason, fields or []
