"""Request bodies of the service. Unknown fields are refused (422 for editkit's own bodies;
400 naming the field for the OpenAI-compatible ones, where a client may send a field editkit
does not support and must hear so rather than have it dropped)."""

# No `from __future__ import annotations`: FastAPI reads the bodies' fields from annotations.
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from editkit.limits import MAX_SEED, NOT_BLANK_SCHEMA, NonBlank, Text
from editkit.schemas import EditRequest
from editkit.session import CONVERSATION_ID

from .config import ServiceConfig

CONVERSATION = f"^{CONVERSATION_ID.pattern}$"  # JSON Schema patterns search; this one must match whole
NOT_BLANK = Field(json_schema_extra=NOT_BLANK_SCHEMA)
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Seed for sampling (0 to 2^63-1).")]
Stop = Annotated[str | list[str] | None, Field(description=(
    "Up to 4 strings; the text ends before the first of them (compared with the output, never tokenized)."))]


class EditBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    edits: list[EditRequest] = Field(min_length=1, description="Edit requests, applied in order.")


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[NonBlank] = Field(min_length=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed = None
    conversation: str | None = Field(None, pattern=CONVERSATION, description=(
        "Conversation id: components with per-conversation memory (reweave) read and extend it; "
        "such a request changes state, so it needs the token."))


class OpenAIBody(BaseModel):
    """Fields every OpenAI-compatible body shares; any other field is answered 400."""
    model_config = ConfigDict(extra="allow")
    model: Text | None = None
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per prompt is supported.")
    stop: Stop = None
    seed: Seed = None
    stream: bool = Field(False, description="Send the text as server-sent events as it is decoded.")
    user: str | None = Field(None, description="Accepted and ignored (an end-user id for the client's own records).")


class CompletionBody(OpenAIBody):
    """The OpenAI /v1/completions fields editkit honours."""
    # Plain strings (the handler checks each): a union of validated types would name its members in errors.
    prompt: Annotated[str, NOT_BLANK] | list[Annotated[str, NOT_BLANK]] = Field(
        description="One prompt or a list of them.")
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatBody(OpenAIBody):
    """The OpenAI /v1/chat/completions fields editkit honours: the messages go through the
    tokenizer's chat template, then as one prompt through the edited model."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)


class EvaluateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    suite: Text = "builtin"
    data: Text | None = Field(None, description="Suite file, relative to the server's data directory.")
    limit: int | None = Field(None, ge=1)


class Bodies:
    """The request bodies with this server's caps (batch size, new tokens) in their schema,
    so pydantic enforces them and the OpenAPI document states them."""

    def __init__(self, config: ServiceConfig):
        tokens = config.max_new_tokens
        self.edits = create_model("EditBatch", __base__=EditBatch, edits=(list[EditRequest], Field(
            min_length=1, max_length=config.max_batch, description="Edit requests, applied in order.")))
        self.generate = create_model(
            "GenerateBody", __base__=GenerateBody,
            prompts=(list[NonBlank], Field(min_length=1, max_length=config.max_batch)),
            max_new_tokens=(int, Field(min(32, tokens), ge=1, le=tokens)))
        self.completion = create_model("CompletionBody", __base__=CompletionBody,
                                       max_tokens=(int, Field(min(16, tokens), ge=1, le=tokens)))
        self.chat = create_model("ChatBody", __base__=ChatBody,
                                 max_tokens=(int | None, Field(None, ge=1, le=tokens)),
                                 max_completion_tokens=(int | None, Field(None, ge=1, le=tokens)))
