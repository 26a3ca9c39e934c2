"""editkit's own generation endpoint and conversations."""

# No `from __future__ import annotations`: FastAPI reads route signatures.
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Path as PathParam

from editkit.access import changes_state, changes_state_when
from editkit.generation import Row
from editkit.limits import check_texts

from ..bodies import CONVERSATION, Bodies
from ..state import State


def router(bodies: Bodies) -> APIRouter:
    api = APIRouter()
    Generate = bodies.generate

    @api.post("/v1/generate")
    def post_generate(body: Annotated[Generate, Depends(changes_state_when(Generate, "conversation"))],
                      state: State) -> dict:
        check_texts(((f"prompts.{i}", p) for i, p in enumerate(body.prompts)), state.config.max_prompt_chars)
        started = time.perf_counter()
        rows = [Row(p, body.max_new_tokens, body.temperature, body.top_p, seed=body.seed) for p in body.prompts]
        out = state.scheduler.submit(rows, body.conversation).wait()
        state.telemetry.generations.inc()
        state.telemetry.generation_latency.observe(time.perf_counter() - started)
        return {"completions": [d.text for d in out]}

    @api.delete("/v1/conversations/{conversation}", dependencies=[Depends(changes_state)])
    def clear_conversation(conversation: Annotated[str, PathParam(pattern=CONVERSATION)], state: State) -> dict:
        with state.lock.read():  # runtime memory only: no edit state changes
            state.session.clear_conversation(conversation)
        return {"conversation": conversation, "cleared": True}

    return api
