"""`fxscale serve`'s HTTP front end: the OpenAI API (models, completions, chat completions,
streamed as server-sent events), liveness, readiness and Prometheus metrics, over a
`fxscale.serve` Server, with FastAPI.

The model loads in a background thread once the socket is open: /health answers at once,
/ready and the API answer 503 with Retry-After until the model is loaded and warmed up. Each
request's tokens travel from the engine's thread to the event loop through a sink of its
own; its text is decoded as it comes (serving/detokenize.py, where stop strings end it). A
full engine answers 429 with Retry-After at once (back-pressure, never a hang); a client that
disconnects cancels its request, whose KV blocks are freed before the next step. Every error
is the OpenAI API's JSON; a fault is a 500 whose body names no internals (the traceback goes
to the server's log).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from fxscale.contracts.sampling import Sampling
from fxscale.runtime.engine.engine import STREAM_END
from fxscale.serving.detokenize import TextStream
from fxscale.serving.prometheus import exposition, registry_for
from fxscale.serving.protocol import ApiError, ChatRequest, CompletionRequest
from fxscale.serving.server import OverloadError, Server, ServerClosedError

log = logging.getLogger("fxscale.serve")
MAX_BODY_BYTES = 8 << 20
POLL_DISCONNECT_S = 0.25  # how often a non-streaming request checks that its client is there


@dataclass
class ServedModel:
    """A model ready to serve: the module, its tokenizer, the name clients ask for."""

    model: Any
    tokenizer: Any
    name: str
    source: str  # where it came from: a directory, or "zoo"


@dataclass
class ServeSettings:
    """What `fxscale serve` was asked to serve, and how."""

    load: Callable[[], ServedModel]              # loads the model (fxscale/models/loading.py)
    api_key: str | None = None                   # Bearer token of /v1 and /metrics
    options: dict[str, Any] = field(default_factory=dict)  # fxscale.serve's
    retry_after_s: int = 1
    on_failure: Callable[[BaseException], None] | None = None  # the model failed to load


class LoopSink:
    """Hands a request's tokens from the engine's thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads any more
            pass


@dataclass
class Delta:
    """New text of one choice (and the token that made it)."""

    index: int
    text: str
    token: int | None = None
    logprob: dict | None = None
    finish_reason: str | None = None  # on a choice's last delta
    tokens: int = 0                   # tokens generated (on the last delta)


@dataclass
class Live:
    """A choice in the engine."""

    index: int
    record: Any
    sink: LoopSink
    sampling: Sampling
    stops: tuple[str, ...]


class Frontend:
    """What the routes share: the served model and its server, once loaded."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.served: ServedModel | None = None
        self.server: Server | None = None
        self.registry = None
        self.draining = False
        self.created = int(time.time())

    def load(self) -> None:
        """Load the model, compile and warm it up (the background thread's work)."""
        try:
            served = self.settings.load()
            self.server = Server(served.model, **self.settings.options)
            self.registry = registry_for(self.server.stats, served.name)
            self.served = served  # last: it marks the front end ready
            log.info("fxscale serve: %s is ready", served.name)
        except BaseException as err:  # noqa: BLE001 - reported, then the process stops
            log.error("fxscale serve: could not load the model: %s", err)
            if self.settings.on_failure is not None:
                self.settings.on_failure(err)

    def ready(self) -> ServedModel:
        """The served model, or a 503 while it loads or the server drains."""
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica",
                           retry_after_s=self.settings.retry_after_s)
        if self.served is None:
            raise ApiError(503, "the model is loading; retry shortly",
                           retry_after_s=self.settings.retry_after_s)
        return self.served

    def check_model(self, name: str) -> ServedModel:
        """The served model if `name` is it, else a 404."""
        served = self.ready()
        if name != served.name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{served.name}`", "model", "model_not_found")
        return served

    def start(self, index: int, prompt: list[int], max_tokens: int | None, sampling: Sampling,
              stops: tuple[str, ...], ignore_eos: bool) -> Live:
        """Put one choice in the engine (400 beyond the context, 429 when full)."""
        server = self.server
        room = server.max_len - len(prompt)
        if max_tokens is None:
            max_tokens = room
        if room < 1 or max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {server.max_len} "
                                f"tokens. However, you requested {len(prompt) + max_tokens} "
                                f"tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                                "completion). Please reduce the prompt or max_tokens.",
                           "max_tokens", "context_length_exceeded")
        sink = LoopSink(asyncio.get_running_loop())
        try:
            record = server.start_generation(torch.tensor([prompt]), max_tokens, stream=sink,
                                             timeout_s=0, ignore_eos=ignore_eos,
                                             sampling=sampling)
        except OverloadError:
            raise ApiError(429, f"the engine is full ({server.max_pending} requests in "
                                "flight); retry after a moment", code="engine_full",
                           retry_after_s=self.settings.retry_after_s) from None
        except ServerClosedError:
            raise ApiError(503, "the server is shutting down",
                           retry_after_s=self.settings.retry_after_s) from None
        except ValueError as err:
            raise ApiError(400, str(err), "prompt") from None
        return Live(index, record, sink, sampling, stops)


async def choice_deltas(live: Live, tokenizer: Any) -> AsyncIterator[Delta]:
    """One choice's text as it is generated; ends it at a stop string; cancels it if the
    reader goes away first."""
    text = TextStream(tokenizer, live.stops)
    record, count, ended = live.record, 0, False
    try:
        while True:
            token = await live.sink.queue.get()
            if token is STREAM_END:
                break
            count += 1
            report = record.logprobs[count - 1] if live.sampling.logprobs is not None else None
            delta = text.push(token)
            if text.stopped:  # finished as it stands: the stop text is not sent
                ended = True
                record.engine.cancel(record.id, finish=True)
                yield Delta(live.index, delta, token, report, "stop", count)
                return
            yield Delta(live.index, delta, token, report)
        await asyncio.wrap_future(record.future)  # the request's error, if it failed
        ended = True
        yield Delta(live.index, text.finish(), None, None, record.finish_reason, count)
    finally:
        if not ended:
            record.future.cancel()


async def merged(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """The deltas of several choices, as they come."""
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                yield delta
        finally:
            await streams[0].aclose()  # at once: a choice left behind cancels its request
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put(delta)
            await queue.put(None)
        except Exception as err:  # noqa: BLE001 - handed to the reader
            await queue.put(err)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


def completion_logprobs(tokenizer: Any, deltas: list[Delta], offset: int) -> dict | None:
    """The completions API's logprobs of these deltas (None when not asked)."""
    reports = [d for d in deltas if d.logprob is not None]
    if not reports:
        return None
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    for delta in reports:
        out["tokens"].append(_token_text(tokenizer, delta.token))
        out["token_logprobs"].append(delta.logprob["logprob"])
        out["top_logprobs"].append({_token_text(tokenizer, i): v for i, v in
                                    delta.logprob["top"]})
        out["text_offset"].append(offset)
        offset += len(delta.text)
    return out


def chat_logprobs(tokenizer: Any, deltas: list[Delta]) -> dict | None:
    """The chat API's logprobs of these deltas (None when not asked)."""
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    reports = [d for d in deltas if d.logprob is not None]
    if not reports:
        return None
    return {"content": [{**entry(d.token, d.logprob["logprob"]),
                         "top_logprobs": [entry(i, v) for i, v in d.logprob["top"]]}
                        for d in reports]}


def _prompts(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """A completion request's prompts as token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    out = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]
    if any(not ids for ids in out):
        raise ApiError(400, "a prompt has no tokens", "prompt")
    return out


def _chat_prompt(request: ChatRequest, tokenizer: Any) -> list[int]:
    """The conversation through the tokenizer's chat template, as token ids."""
    if tokenizer.chat_template is None:
        raise ApiError(400, "the served model's tokenizer has no chat template; use "
                            "/v1/completions", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - the template rejected the conversation
        raise ApiError(400, f"the chat template could not render the messages: {err}",
                       "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Generation:
    """One API request's choices, their answer in one body or as server-sent events."""

    def __init__(self, front: Frontend, chat: bool, request: CompletionRequest | ChatRequest,
                 prompts: list[list[int]], max_tokens: int | None, logprobs: int | None
                 ) -> None:
        self.front, self.chat, self.request = front, chat, request
        self.tokenizer = front.served.tokenizer
        self.prompts = prompts
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        stops = request.stops()
        self.live: list[Live] = []
        try:  # every choice starts before the answer does: a 429 comes as a status
            for p, prompt in enumerate(prompts):
                for k in range(request.n):
                    index = p * request.n + k
                    self.live.append(front.start(index, prompt, max_tokens,
                                                 request.sampling(logprobs, k), stops,
                                                 request.ignore_eos))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for live in self.live:
            live.record.future.cancel()

    def deltas(self) -> AsyncIterator[Delta]:
        return merged([choice_deltas(live, self.tokenizer) for live in self.live])

    def usage(self, finals: dict[int, Delta]) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)  # each prompt once, however many choices
        completion = sum(d.tokens for d in finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.front.served.name}

    async def body(self, request: Request) -> dict[str, Any]:
        """The whole answer (the request is cancelled if its client goes away first)."""
        collected: dict[int, list[Delta]] = {live.index: [] for live in self.live}

        async def collect() -> None:
            async for delta in self.deltas():
                collected[delta.index].append(delta)

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=POLL_DISCONNECT_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                self.cancel()
                raise ApiError(499, "the client closed the request")
        task.result()
        finals = {index: deltas[-1] for index, deltas in collected.items()}
        choices = []
        for index, deltas in sorted(collected.items()):
            text = "".join(d.text for d in deltas)
            choice: dict[str, Any] = {"index": index, "finish_reason": finals[index].finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = chat_logprobs(self.tokenizer, deltas)
            else:
                choice["text"] = text
                choice["logprobs"] = completion_logprobs(self.tokenizer, deltas, 0)
            choices.append(choice)
        return {**self._head(chunk=False), "choices": choices, "usage": self.usage(finals)}

    async def events(self) -> AsyncIterator[str]:
        """The answer as server-sent events, ending with `data: [DONE]`."""
        usage = self.request.include_usage()
        extra = {"usage": None} if usage else {}
        finals: dict[int, Delta] = {}
        offsets = {live.index: 0 for live in self.live}

        def event(choices: list[dict], **more: Any) -> str:
            return f"data: {json.dumps({**self._head(chunk=True), 'choices': choices, **more})}\n\n"

        try:
            if self.chat:
                for live in self.live:
                    yield event([{"index": live.index, "delta": {"role": "assistant",
                                                                 "content": ""},
                                  "logprobs": None, "finish_reason": None}], **extra)
            async for delta in self.deltas():
                if delta.finish_reason is not None:
                    finals[delta.index] = delta
                elif not delta.text and delta.logprob is None:
                    continue
                choice: dict[str, Any] = {"index": delta.index,
                                          "finish_reason": delta.finish_reason}
                if self.chat:
                    choice["delta"] = {"content": delta.text} if delta.text else {}
                    choice["logprobs"] = chat_logprobs(self.tokenizer, [delta])
                else:
                    choice["text"] = delta.text
                    choice["logprobs"] = completion_logprobs(self.tokenizer, [delta],
                                                             offsets[delta.index])
                    offsets[delta.index] += len(delta.text)
                yield event([choice], **extra)
            if usage:
                yield event([], usage=self.usage(finals))
        except Exception as err:  # noqa: BLE001 - the status is sent: the error is an event
            fault = err if isinstance(err, ApiError) else _fault(err)
            yield f"data: {json.dumps(fault.body())}\n\n"
        yield "data: [DONE]\n\n"


def _fault(err: BaseException) -> ApiError:
    """A 500 that names no internals; the details go to the log."""
    log.error("fxscale serve: request failed", exc_info=err)
    return ApiError(500, f"the request failed inside the server ({type(err).__name__}); "
                         "see the server's log")


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class Guard:
    """Body size and the API key (of /v1 and /metrics), checked before a body is read (plain
    ASGI: a streamed answer and its cancellation pass through untouched)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refused = self._refusal(scope)
            if refused is not None:
                await _error_response(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> ApiError | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
        path = scope["path"]
        if self.expected and (path.startswith("/v1") or path == "/metrics") and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                 "<key>'", code="invalid_api_key")
        return None


def build_app(settings: ServeSettings) -> FastAPI:
    """The ASGI application: load the model in the background, answer the OpenAI API."""
    front = Frontend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=front.load, name="fxscale-serve-load", daemon=True).start()
        yield
        front.draining = True
        if front.server is not None:  # what is still in flight finishes (or was cancelled)
            await asyncio.to_thread(front.server.close)

    app = FastAPI(title="fxscale", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.front = front

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        return _error_response(ApiError(400, f"{'.'.join(where) or 'body'}: {first['msg']}",
                                        where[0] if where else None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error_response(ApiError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def fault(request: Request, err: Exception) -> JSONResponse:
        return _error_response(_fault(err))

    app.add_middleware(Guard, api_key=settings.api_key)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        served = front.ready()
        return {"status": "ready", "model": served.name}

    @app.get("/metrics")
    def metrics() -> Response:
        front.ready()
        return Response(exposition(front.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(served: ServedModel) -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": front.created,
                "owned_by": "fxscale", "root": served.source,
                "max_model_len": front.server.max_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(front.ready())]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return model_card(front.check_model(name))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request
                          ) -> dict[str, Any] | StreamingResponse:
        served = front.check_model(body.model)
        if body.echo or body.suffix:
            raise ApiError(400, "echo and suffix are not supported",
                           "echo" if body.echo else "suffix")
        prompts = _prompts(body.prompt, served.tokenizer)
        return await _answer(Generation(front, False, body, prompts, body.max_tokens,
                                        body.logprobs), body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        served = front.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt = _chat_prompt(body, served.tokenizer)
        return await _answer(Generation(front, True, body, [prompt],
                                        body.max_completion_tokens or body.max_tokens,
                                        logprobs), body, request)

    return app


async def _answer(generation: Generation, body: Any, request: Request
                  ) -> dict[str, Any] | StreamingResponse:
    """Stream the generation's events, or answer with its whole body."""
    if body.stream:
        return StreamingResponse(generation.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await generation.body(request)
