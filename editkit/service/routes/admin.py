"""Health, Prometheus metrics, the model list (OpenAI's /v1/models) and evaluation."""

# No `from __future__ import annotations`: FastAPI reads route signatures.
import time

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from editkit.access import reads_server_files, reads_state
from editkit.scoring import DEFINITIONS, item_baselines, measure_items, summarise

from ..bodies import Bodies, EvaluateBody
from ..state import State
from ..telemetry import CONTENT_TYPE


def router(bodies: Bodies) -> APIRouter:
    api = APIRouter()
    started = int(time.time())

    @api.get("/health", dependencies=[Depends(reads_state)])
    def health(state: State) -> dict:
        journal = state.read_journal()
        try:
            active = journal.count("applied")
            latest = journal.head_state()[0] if not journal.legacy else 0
        finally:
            journal.close()
        out = {"status": "ok", "model": state.model, "method": state.session.method, "active_edits": active,
               "queue_depth": int(state.telemetry.value("editkit_queue_depth")),
               "generation_queue_depth": int(state.telemetry.value("editkit_generation_queue_depth")),
               "role": "replica" if state.session.following else "writer",
               "head": state.session.head_id if state.session.following else latest, "journal_head": latest}
        if state.follower is not None:
            out.update(state.follower.describe())
        return out

    @api.get("/metrics", dependencies=[Depends(reads_state)], response_class=Response)
    def metrics(state: State) -> Response:
        return Response(state.telemetry.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/models", dependencies=[Depends(reads_state)])
    def models(state: State) -> dict:
        """OpenAI's model list: the one edited model this server serves."""
        return {"object": "list", "data": [{"id": state.model, "object": "model", "created": started,
                                            "owned_by": "editkit"}]}

    @api.post("/v1/evaluate", dependencies=[Depends(reads_server_files)])
    def evaluate(body: EvaluateBody, state: State) -> dict:
        """Every figure of each suite item on the current model (editkit.scoring); locality
        "unchanged" compares the model with itself here, so only its accuracy is reported."""
        session = state.session
        path = state.data_file(body.data) if body.data is not None else None
        requests = session.host.suite(body.suite)().load(str(path) if path else None, limit=body.limit)
        with state.lock.read():
            figures = measure_items(session.loaded, requests, item_baselines(session.loaded, requests))
        items = [{"prompt": req.prompt, "reliability": f["rel_tf"], "generalization": f["gen_tf"],
                  "locality_accuracy": f["loc_acc_tf"],
                  "figures": {k: v for k, v in f.items() if not k.startswith("loc_") or k.startswith("loc_acc")}}
                 for req, f in zip(requests, figures)]
        summary = summarise(figures)
        return {"suite": body.suite, "definitions": DEFINITIONS, "count": len(items),
                "reliability": summary["rel_tf"], "generalization": summary["gen_tf"],
                "locality_accuracy": summary["loc_acc_tf"],
                "summary": {k: v for k, v in summary.items() if not k.startswith("loc_") or k.startswith("loc_acc")},
                "items": items}

    return api
