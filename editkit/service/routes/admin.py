"""Health, Prometheus metrics, the model list (OpenAI's /v1/models) and evaluation."""

# No `from __future__ import annotations`: FastAPI reads route signatures.
import time

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from editkit.access import reads_server_files, reads_state

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
        from editkit.evaluation.metrics import teacher_forced_accuracy

        session = state.session
        path = state.data_file(body.data) if body.data is not None else None
        requests = session.host.suite(body.suite)().load(str(path) if path else None, limit=body.limit)
        with state.lock.read():
            items = []
            for req in requests:
                rel = teacher_forced_accuracy(session.loaded, [req.prompt], [req.target_new])[0]
                gen = teacher_forced_accuracy(session.loaded, req.rephrases, [req.target_new] * len(req.rephrases))
                probes = [p for p in req.locality if p.answer]
                loc = teacher_forced_accuracy(session.loaded, [p.prompt for p in probes], [p.answer for p in probes])
                items.append({"prompt": req.prompt, "reliability": rel,
                              "generalization": sum(gen) / len(gen) if gen else None,
                              "locality_accuracy": sum(loc) / len(loc) if loc else None})

        def mean(key):
            values = [i[key] for i in items if i[key] is not None]
            return sum(values) / len(values) if values else None

        return {"suite": body.suite, "definition": "teacher-forced token accuracy on the current model",
                "count": len(items), "reliability": mean("reliability"),
                "generalization": mean("generalization"), "locality_accuracy": mean("locality_accuracy"),
                "items": items}

    return api
