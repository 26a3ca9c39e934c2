"""editkit on Ray Serve: one writer and N read replicas of one workspace on shared storage,
behind one ingress that sends edits and rollbacks to the writer and everything else to the
replicas (Ray Serve balances them).

    pip install -e ".[ray]" "ray[serve]"
    EDITKIT_WORKSPACE=/shared/ws EDITKIT_REPLICAS=2 serve run examples/ray-serve/deployment.py:app

Consistency (docs/deploy.md): read-your-writes only on the writer; a replica serves a head at
most one poll interval (plus the time to read the changed chunks) behind it, and /health on
each says which head it serves.
"""

from __future__ import annotations

import os

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

WORKSPACE = os.environ.get("EDITKIT_WORKSPACE", "editkit-workspace")
REPLICAS = int(os.environ.get("EDITKIT_REPLICAS", "2"))
POLL = float(os.environ.get("EDITKIT_POLL_INTERVAL", "1.0"))
WRITES = {("POST", "/v1/edits")}


class _Served:
    """An editkit app in this actor, called in process (ASGI), its background loops started."""

    def __init__(self, follow: bool):
        from editkit.service import ServiceConfig, create_app
        from editkit.session import Session

        self.session = Session.open(WORKSPACE, follow=follow, create=not follow, device="cpu")
        self.app = create_app(self.session, ServiceConfig(token=os.environ.get("EDITKIT_TOKEN"), poll_interval=POLL,
                                                          writer="the writer deployment" if follow else None))
        follower = self.app.state.service.follower
        if follower is not None:
            follower.start()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://editkit")

    async def forward(self, method: str, path: str, query: str, headers: dict, body: bytes) -> tuple:
        r = await self.client.request(method, path, params=query, headers=headers, content=body, timeout=None)
        return r.status_code, r.content, r.headers.get("content-type", "application/json")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1})
class Writer(_Served):
    def __init__(self):
        super().__init__(follow=False)


@serve.deployment(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 1})
class Replica(_Served):
    def __init__(self):
        super().__init__(follow=True)


@serve.deployment
class Ingress:
    def __init__(self, writer, replica):
        self.writer, self.replica = writer, replica

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        to_writer = (request.method, path) in WRITES or (request.method == "DELETE" and path.startswith("/v1/edits/"))
        target = self.writer if to_writer else self.replica
        status, content, kind = await target.forward.remote(
            request.method, path, request.url.query, {k: v for k, v in request.headers.items() if k != "host"},
            await request.body())
        return Response(content, status_code=status, media_type=kind)


app = Ingress.bind(Writer.bind(), Replica.bind())
