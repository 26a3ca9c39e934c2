"""OpenAI-compatible endpoints: /v1/completions and /v1/chat/completions, with `stream: true`
as server-sent events (each token as it is decoded). A field editkit does not support is
answered 400 naming it, never dropped. Chat messages go through the tokenizer's chat
template into one prompt; edits are made on prompt texts, so an edit meant for chat should
be made on the chat-formatted prompt (Session.chat_prompt)."""

# No `from __future__ import annotations`: FastAPI reads route signatures.
import asyncio
import json
import threading
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from editkit.access import reads_state
from editkit.generation import Decoded, Row
from editkit.limits import check_texts

from ..bodies import Bodies, OpenAIBody
from ..config import ApiError
from ..state import ServiceState, State

_DONE = object()
FINISH = {"end": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


def _refuse_unknown(body: OpenAIBody) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        supported = ", ".join(sorted(type(body).model_fields))
        raise ApiError(400, f"{', '.join(extra)}: not supported by editkit (it honours: {supported})",
                       [{"field": name, "reason": "not supported"} for name in extra])


def _stops(body: OpenAIBody) -> tuple[str, ...]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise ApiError(422, "stop: at most 4 strings", [{"field": "stop", "reason": "too many"}])
    return tuple(s for s in stops if s)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` are not sent yet: an unfinished character (a
    token that ends inside a UTF-8 sequence decodes to U+FFFD until the next one completes it)
    and what could still become a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


def _usage(state: ServiceState, prompts: list[str], out: list[Decoded]) -> dict[str, int]:
    tok = state.session.loaded.tokenizer
    prompt_tokens = sum(len(tok(p).input_ids) for p in prompts)
    completion_tokens = sum(len(d.ids) for d in out)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(state: ServiceState, rows: list[Row], chunk, final) -> StreamingResponse:
    """Server-sent events of a request's tokens: `chunk(row, text)` makes the event of new text,
    `final(row, decoded)` the last one of a row; then [DONE]. A client that goes away cancels
    its rows (the batch stops decoding them)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    stops = rows[0].stop
    job = state.scheduler.submit(rows, on_token=lambda j, _tok, text: loop.call_soon_threadsafe(
        events.put_nowait, (j, text)))
    threading.Thread(target=lambda: (job.done.wait(), loop.call_soon_threadsafe(events.put_nowait, _DONE)),
                     daemon=True).start()
    started = time.perf_counter()

    async def body():
        sent = [""] * len(rows)
        try:
            while True:
                item = await events.get()
                if item is _DONE:
                    break
                j, text = item
                ready = text[: len(text) - _held_back(text, stops)]
                if len(ready) > len(sent[j]) and ready.startswith(sent[j]):
                    yield _sse(chunk(j, ready[len(sent[j]):]))
                    sent[j] = ready
            if job.error is not None:
                yield _sse({"error": {"status": 500, "reason": "generation failed; see the server log"}})
            else:
                for j, decoded in enumerate(job.result):
                    if decoded.text.startswith(sent[j]) and len(decoded.text) > len(sent[j]):
                        yield _sse(chunk(j, decoded.text[len(sent[j]):]))
                    yield _sse(final(j, decoded))
                state.telemetry.generations.inc()
                state.telemetry.generation_latency.observe(time.perf_counter() - started)
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = not job.done.is_set()  # the client went away mid-stream: stop its rows

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def router(bodies: Bodies) -> APIRouter:
    api = APIRouter()
    Completion, Chat = bodies.completion, bodies.chat

    @api.post("/v1/completions", dependencies=[Depends(reads_state)])
    async def completions(body: Completion, state: State):
        _refuse_unknown(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(422, "prompt: give at least one prompt", [{"field": "prompt", "reason": "empty list"}])
        if len(prompts) > state.config.max_batch:
            raise ApiError(422, f"prompt: at most {state.config.max_batch} prompts",
                           [{"field": "prompt", "reason": "too many"}])
        check_texts(((f"prompt.{i}", p) for i, p in enumerate(prompts)), state.config.max_prompt_chars)
        stops = _stops(body)
        rows = [Row(p, body.max_tokens, body.temperature, body.top_p, seed=body.seed, stop=stops) for p in prompts]
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model
        head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        if body.stream:
            return _stream(state, rows,
                           lambda j, text: {**head, "choices": [{"text": text, "index": j, "logprobs": None,
                                                                 "finish_reason": None}]},
                           lambda j, d: {**head, "choices": [{"text": "", "index": j, "logprobs": None,
                                                              "finish_reason": FINISH[d.finish]}]})
        out = await _complete(state, rows)
        return {**head, "choices": [{"text": d.text, "index": j, "logprobs": None, "finish_reason": FINISH[d.finish]}
                                    for j, d in enumerate(out)], "usage": _usage(state, prompts, out)}

    @api.post("/v1/chat/completions", dependencies=[Depends(reads_state)])
    async def chat(body: Chat, state: State):
        _refuse_unknown(body)
        prompt = state.session.chat_prompt([m.model_dump() for m in body.messages])
        check_texts([("messages", prompt)], state.config.max_prompt_chars)
        tokens = body.max_completion_tokens or body.max_tokens or min(256, state.config.max_new_tokens)
        rows = [Row(prompt, tokens, body.temperature, body.top_p, seed=body.seed, stop=_stops(body))]
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        if body.stream:
            first = {"started": False}

            def chunk(j, text):
                delta = {"content": text}
                if not first["started"]:
                    first["started"] = True
                    delta = {"role": "assistant", **delta}
                return {**head, "choices": [{"index": j, "delta": delta, "finish_reason": None}]}

            return _stream(state, rows, chunk,
                           lambda j, d: {**head, "choices": [{"index": j, "delta": {},
                                                              "finish_reason": FINISH[d.finish]}]})
        out = await _complete(state, rows)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out[0].text},
                             "finish_reason": FINISH[out[0].finish]}],
                "usage": _usage(state, [prompt], out)}

    return api


async def _complete(state: ServiceState, rows: list[Row]) -> list[Decoded]:
    """A whole request through the scheduler, awaited without holding the event loop."""
    started = time.perf_counter()
    job = state.scheduler.submit(rows)
    out = await asyncio.to_thread(job.wait)
    state.telemetry.generations.inc()
    state.telemetry.generation_latency.observe(time.perf_counter() - started)
    return out
