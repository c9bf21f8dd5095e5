"""Serve any model a step exported over an OpenAI-compatible chat API, with a web chat page.

    python step1_pretrain_sft/serve.py --model OUT/step1_sft/final [--host 127.0.0.1 --port 8000]
        GET  /                     the chat page (streams replies, keeps the conversation, sampling settings)
        GET  /v1/models            the one model served
        POST /v1/chat/completions  OpenAI's request and response schema; "stream": true answers with
                                   server-sent events ending in `data: [DONE]`

Generation is utils.generation, the code chat.py uses (the tokenizer's chat template, stop at its end-of-turn
token or eos, seeded sampling).
Requests queue for one worker thread, so two CPU-heavy generations never run over each other and the event
loop stays free to accept, reject (429 once --max_queue requests wait) and stream. A generation stops at the
next token when its client goes away, and at a `stop` string, through one stopping criterion.

Simplifications: one completion per request (n=1), text content only, no tool calls or logprobs, no
authentication (so it binds 127.0.0.1 unless --host says otherwise); max_tokens is cut to the context left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from utils.chat import prompt_ids
from utils.config import option, parse_config, require
from utils.errors import main_guard
from utils.generation import CallbackStreamer, SamplingConfig, generate_ids
from utils.log import setup_logging
from utils.model import load_for_inference

log = logging.getLogger("serve")
PAGE = Path(__file__).with_name("chat_page.html")


@dataclass
class ServeConfig:
    """Serve an exported model over an OpenAI-compatible chat API and a web chat page."""

    model: str = option("", "Model dir exported by any step (its final/ dir).")
    host: str = option("127.0.0.1", "Address to bind; anything but loopback exposes an unauthenticated API.")
    port: int = option(8000, "Port to listen on.")
    served_model_name: str = option("", "Model id clients must use; default: the dir's last two path parts.")
    max_queue: int = option(8, "Requests that may wait while one generates; more get 429 (0 = none).")
    max_body_bytes: int = option(1 << 20, "Largest request body accepted; bigger ones are answered 413.")
    temperature: float = option(0.7, "Sampling temperature for requests that give none (0 = greedy).")
    top_k: int = option(50, "Sample from the k most likely tokens (0 = no limit; not in OpenAI's API).")
    top_p: float = option(0.9, "Nucleus sampling threshold for requests that give none.")
    max_new_tokens: int = option(256, "Longest reply for requests that give no max_tokens.")
    repetition_penalty: float = option(1.1, "Penalty > 1 discourages repeating tokens (not in OpenAI's API).")
    seed: int = option(0, "Sampling seed for requests that give none.")

    def validate(self) -> None:
        require(bool(self.model), "model", self.model, "give an exported model dir (OUT/step1_sft/final)")
        require(0 <= self.port <= 65535, "port", self.port, "must be in [0, 65535]")
        require(self.max_queue >= 0, "max_queue", self.max_queue, "must be >= 0")
        require(self.max_body_bytes >= 1024, "max_body_bytes", self.max_body_bytes, "must be >= 1024")
        require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0")

    def model_id(self) -> str:
        return self.served_model_name or "/".join(Path(self.model).resolve().parts[-2:])


# ----------------------------------------------------------------------------------------------------
# Errors: OpenAI's error object, raised anywhere in a request and turned into a response by one handler


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ----------------------------------------------------------------------------------------------------
# Request schema (strict types: "0.5" is not a temperature; unknown OpenAI fields are ignored)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]  # the roles the ChatML template renders (utils.chat.ROLES)
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "'stop' takes at most 4 non-empty strings", param="stop")
        return stops


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it (or its declared length) passes `limit` bytes."""
    too_large = ApiError(413, f"request body is larger than {limit} bytes (--max_body_bytes)",
                         code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_request(body: bytes) -> ChatRequest:
    """Body -> ChatRequest, or a 400 naming the first bad field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}", param=param) from None


# ----------------------------------------------------------------------------------------------------
# Generation: one job at a time on a worker thread


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class StopText:
    """Passes streamed text on, ending it before the first stop string. The last len(longest stop) - 1
    characters are held back until more text arrives, so a client never sees the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.hold = stops, max((len(s) for s in stops), default=1) - 1
        self.text, self.sent, self.found = "", 0, False

    def feed(self, piece: str) -> str:
        if self.found:
            return ""
        self.text += piece
        cut = first_stop(self.text, self.stops)
        self.found = cut is not None
        end = cut if cut is not None else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        """The held-back tail, once the text is complete (nothing after a stop string)."""
        if self.found:
            return ""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class Halt(StoppingCriteria):
    """Stops generate at the next token once `event` is set (client gone, or a stop string seen)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        halted = self.event.is_set()
        return torch.full((input_ids.shape[0],), halted, dtype=torch.bool, device=input_ids.device)


@dataclass
class HaltableSampling(SamplingConfig):
    """SamplingConfig plus a halt event, passed to generate as a stopping criterion."""

    halt: threading.Event = field(default_factory=threading.Event)

    def generate_kwargs(self) -> dict:
        return {**super().generate_kwargs(), "stopping_criteria": StoppingCriteriaList([Halt(self.halt)])}


@dataclass
class Job:
    """One request's generation; `on_text` (called on the worker thread) receives streamed pieces."""

    prompt: list[int]
    sampling: HaltableSampling
    stops: list[str]
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        self.sampling.halt.set()


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "cancelled"

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def run_job(model, tokenizer, job: Job) -> Completion:
    """Generate one reply (on the worker thread). The text is decoded from all reply tokens, as
    generate_replies does, then cut at the first stop string; streamed pieces add up to the same text."""
    if job.cancelled:  # the client left while the request waited
        return Completion("", len(job.prompt), 0, "cancelled")
    emit = job.on_text or (lambda piece: None)
    stop = StopText(job.stops)

    def on_text(piece: str) -> None:
        emit(stop.feed(piece))
        if stop.found:
            job.sampling.halt.set()

    streamer = CallbackStreamer(tokenizer, on_text)
    ids = generate_ids(model, tokenizer, [job.prompt], job.sampling, streamer=streamer)[0]
    emit(stop.flush())
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = first_stop(text, job.stops)
    if job.cancelled:
        log.info("generation cancelled after %d tokens (client disconnected)", len(ids))
        reason = "cancelled"
    else:
        reason = "length" if cut is None and len(ids) >= job.sampling.max_new_tokens else "stop"
    return Completion(text[:cut], len(job.prompt), len(ids), reason)


class Worker:
    """Runs jobs one at a time on a single thread; admits at most 1 + max_queue at once (else 429)."""

    def __init__(self, model, tokenizer, max_queue: int):
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.lock = threading.Lock()
        self.admitted = 0  # running + waiting

    def submit(self, job: Job) -> Future:
        with self.lock:
            if self.admitted > self.max_queue:
                raise ApiError(429, f"server busy: a generation is running and {self.admitted - 1} wait "
                               f"(--max_queue {self.max_queue}); retry later", code="queue_full",
                               kind="rate_limit_error")
            self.admitted += 1
        future = self.executor.submit(run_job, self.model, self.tokenizer, job)
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Future) -> None:
        with self.lock:
            self.admitted -= 1


# ----------------------------------------------------------------------------------------------------
# Responses in OpenAI's shapes


def completion_body(meta: dict, done: Completion) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
              "finish_reason": done.finish_reason}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": done.usage()}


def chunk_event(meta: dict, delta: dict | None, finish_reason: str | None = None,
                usage: dict | None = None) -> str:
    """One streamed chunk; without a delta it is OpenAI's closing usage chunk (no choices)."""
    body: dict = {**meta, "object": "chat.completion.chunk", "choices": []}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if usage is not None:
        body["usage"] = usage
    return sse(body)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def stream_events(job: Job, future: Future, pieces: asyncio.Queue, meta: dict,
                        include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a streamed completion. Leaving early (client gone) cancels the generation."""
    try:
        yield chunk_event(meta, {"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not None:
            if piece:
                yield chunk_event(meta, {"content": piece})
        if future.exception() is not None:
            log.error("generation failed", exc_info=future.exception())
            yield sse(ApiError(500, f"generation failed: {future.exception()}", kind="server_error").body())
        else:
            done = future.result()
            yield chunk_event(meta, {}, done.finish_reason)
            if include_usage:
                yield chunk_event(meta, None, usage=done.usage())
        yield sse("[DONE]")
    finally:
        job.cancel()  # no effect once the generation has finished


# ----------------------------------------------------------------------------------------------------
# The app


class ChatService:
    """Turns validated requests into jobs for the worker, and their results into OpenAI responses."""

    def __init__(self, model, tokenizer, cfg: ServeConfig):
        self.tokenizer, self.cfg, self.model_id = tokenizer, cfg, cfg.model_id()
        self.context = model.config.max_position_embeddings
        self.worker = Worker(model, tokenizer, cfg.max_queue)

    def job(self, req: ChatRequest) -> Job:
        """The request's prompt and sampling, with 404 for another model and 400 for a prompt that fills
        the context; max_tokens is cut to the room the context leaves."""
        if req.model is not None and req.model != self.model_id:
            raise ApiError(404, f"model {req.model!r} does not exist: this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        stops = req.stops()
        prompt = prompt_ids(self.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        room = self.context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens but the model's context is "
                           f"{self.context} tokens, leaving no room for a reply: shorten the conversation",
                           param="messages", code="context_length_exceeded")
        cfg = self.cfg
        wanted = req.max_completion_tokens or req.max_tokens or cfg.max_new_tokens
        sampling = HaltableSampling(
            max_new_tokens=min(wanted, room), top_k=cfg.top_k, top_p=req.top_p or cfg.top_p,
            temperature=cfg.temperature if req.temperature is None else req.temperature,
            repetition_penalty=cfg.repetition_penalty, seed=cfg.seed if req.seed is None else req.seed)
        return Job(prompt, sampling, stops)

    def meta(self) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id}

    async def complete(self, req: ChatRequest) -> dict:
        job = self.job(req)
        try:
            done = await asyncio.wrap_future(self.worker.submit(job))
        except asyncio.CancelledError:
            job.cancel()
            raise
        return completion_body(self.meta(), done)

    def stream(self, req: ChatRequest) -> StreamingResponse:
        job = self.job(req)
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        job.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        future = self.worker.submit(job)  # before the response starts, so a full queue is a plain 429
        # queued after every piece (same thread, FIFO), so None marks the end
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_events(job, future, pieces, self.meta(), include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(model, tokenizer, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app serving `model`; every error response is an OpenAI error object."""
    service = ChatService(model, tokenizer, cfg)
    page = PAGE.read_text(encoding="utf-8")
    app = FastAPI(title="zhchat-rlhf", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return ApiError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, f"internal error: {err}", kind="server_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return page

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0,
                                            "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await read_body(request, cfg.max_body_bytes))
        return service.stream(req) if req.stream else await service.complete(req)

    return app


@main_guard
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ServeConfig, argv, prog="step1_pretrain_sft/serve.py")
    model, tokenizer = load_for_inference(cfg.model)
    setup_logging()
    app = create_app(model, tokenizer, cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API has no authentication; anyone reaching it can use it", cfg.host)
    log.info("serving %s: chat page http://%s:%d/ , API base_url http://%s:%d/v1", cfg.model_id(), cfg.host,
             cfg.port, cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None)


if __name__ == "__main__":
    main()
