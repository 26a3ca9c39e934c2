"""Edits: apply (journaled before acknowledged), list by page, roll back."""

# No `from __future__ import annotations`: FastAPI reads route signatures.
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path as PathParam, Query

from editkit.access import changes_state, reads_state
from editkit.limits import check_texts

from ..bodies import Bodies
from ..config import ApiError
from ..state import State

MAX_ID = 2**63 - 1  # journal ids are SQLite integers


def router(bodies: Bodies) -> APIRouter:
    api = APIRouter()
    Edits = bodies.edits

    @api.post("/v1/edits", dependencies=[Depends(changes_state)])
    def post_edits(body: Edits, state: State) -> dict:
        state.check_writer()
        for i, e in enumerate(body.edits):
            check_texts(((f"edits.{i}.{field}", text) for field, text in e.texts()), state.config.max_prompt_chars)
        with state.telemetry.edit(state.lock):
            records = state.session.edit(body.edits)
        state.telemetry.edits_applied.inc(len(records))
        return {"edits": [{"id": r.id, "status": r.status, **r.metrics,
                           "seconds": r.stats.get("seconds")} for r in records]}

    @api.get("/v1/edits", dependencies=[Depends(reads_state)])
    def list_edits(state: State, offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                   status: Literal["applied", "rolled_back"] | None = None) -> dict:
        journal = state.read_journal()
        try:
            total = journal.count(status)
            records = journal.records(status=status, offset=offset, limit=limit)
        finally:
            journal.close()
        return {"total": total, "offset": offset, "limit": limit, "edits": [r.to_dict() for r in records]}

    @api.delete("/v1/edits/{edit_id}", dependencies=[Depends(changes_state)])
    def rollback(edit_id: Annotated[int, PathParam(ge=1, le=MAX_ID)], state: State) -> dict:
        state.check_writer()
        journal = state.read_journal()
        try:
            known = journal.record(edit_id) is not None
        finally:
            journal.close()
        if not known:
            raise ApiError(404, f"no edit with id {edit_id}")
        with state.telemetry.edit(state.lock):
            record = state.session.rollback(edit_id)
        state.telemetry.edits_rolled_back.inc()
        return record.to_dict()

    return api
