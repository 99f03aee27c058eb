"""The OpenAI-compatible server: Starlette routes over one Engine (see docs/serve.md).

With one slot (``parallel=1``) each request runs in a worker thread of its own over the
Engine's speculative decoding loop; with ``parallel`` > 1 the requests join one
:class:`edgert.runtime.batch.BatchWorker`, which decodes up to ``parallel`` sequences
together, one forward per step over the shared cache. Either way streamed pieces reach the
response through an asyncio queue. Requests beyond the slots wait, up to ``max_queue`` of
them; more get 429. A client that disconnects closes its generation, which frees its slot at
once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edgert.errors import EdgertError
from edgert.runtime.batch import BatchSequence, BatchWorker, supports_batching
from edgert.runtime.sampling import SamplingParams
from edgert.runtime.tokenizer import StreamDecoder
from edgert.serve.api_requests import APIError, GenerationRequest, parse_chat, parse_completion
from edgert.serve.stop import StopMatcher

log = logging.getLogger("edgert.serve")


@dataclass(frozen=True)
class ServeOptions:
    model: str  # the name /v1/models lists and responses carry
    api_key: str | None = None
    max_queue: int = 16  # requests waiting for the slot beyond the one generating
    parallel: int = 1
    prefix_reuse: bool = True  # prefill only what a prompt adds to a cached prefix


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=dict)  # endpoint -> count
    errors: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens taken from the cache (prefix reuse)
    completion_tokens: int = 0
    speculative_accepted: int = 0
    decode_tokens_per_s: float = 0.0

    def text(self, waiting: int, busy: int, slots: int) -> str:
        lines = ["# TYPE edgert_requests_total counter"]
        lines += [f'edgert_requests_total{{endpoint="{k}"}} {v}' for k, v in
                  sorted(self.requests.items())]
        for name, kind, value in (
                ("request_errors_total", "counter", self.errors),
                ("prompt_tokens_total", "counter", self.prompt_tokens),
                ("prompt_tokens_reused_total", "counter", self.reused_tokens),
                ("completion_tokens_total", "counter", self.completion_tokens),
                ("speculative_accepted_tokens_total", "counter", self.speculative_accepted),
                ("decode_tokens_per_second", "gauge", round(self.decode_tokens_per_s, 3)),
                ("queue_depth", "gauge", waiting), ("slots_busy", "gauge", busy),
                ("slots_total", "gauge", slots)):
            lines += [f"# TYPE edgert_{name} {kind}", f"edgert_{name} {value}"]
        return "\n".join(lines) + "\n"


class Service:
    """The server's state: the engine (loaded in the background), the queue, the metrics."""

    def __init__(self, load: Callable[[], Any], options: ServeOptions) -> None:
        self.options = options
        self.engine = None
        self.worker: BatchWorker | None = None  # parallel > 1: the batched decode loop
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.in_flight = 0  # generating + waiting
        self._lock = threading.Lock()
        threading.Thread(target=self._load, args=(load,), daemon=True).start()

    def _load(self, load: Callable[[], Any]) -> None:
        try:
            engine = load()
            if self.options.parallel > 1:
                reason = supports_batching(engine)
                if reason is not None:
                    raise EdgertError(f"--parallel {self.options.parallel}: {reason}")
                self.worker = BatchWorker(engine, self.options.parallel,
                                          prefix_reuse=self.options.prefix_reuse)
            self.engine = engine
        except EdgertError as exc:
            self.load_error = str(exc)
            log.error("loading failed: %s", exc)

    # -- admission ---------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}",
                           kind="server_error", code="model_load_failed")
        if self.engine is None:
            raise APIError(503, "the model is loading; retry shortly", kind="server_error",
                           code="model_loading")

    def check_key(self, request: Request) -> None:
        if self.options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.options.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    def admit(self) -> None:
        with self._lock:
            if self.in_flight >= self.options.parallel + self.options.max_queue:
                raise APIError(429, f"the server is busy ({self.in_flight} requests in "
                                    "flight, queue full); retry later",
                               kind="rate_limit_error", code="queue_full")
            self.in_flight += 1

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    @property
    def busy(self) -> int:
        if self.worker is not None:
            return self.worker.busy
        return int(self.engine.slot.busy) if self.engine is not None else 0

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.busy)


class Generation:
    """One request's generation: tokens -> text pieces -> stop sequences -> an asyncio queue
    of ("text", piece) items, then ("end", finish_reason) or ("error", APIError). Runs on a
    thread of its own over ``Engine.stream`` (one slot), or as a sequence of the service's
    batch worker (parallel slots)."""

    def __init__(self, service: Service, req: GenerationRequest, max_tokens: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.service, self.req, self.max_tokens, self.loop = service, req, max_tokens, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.stats: dict[str, Any] = {}
        self._sequence: BatchSequence | None = None
        if service.worker is not None:
            self._submit()
        else:
            threading.Thread(target=self._run, daemon=True).start()

    def close(self) -> None:
        """The response is over (sent, or the client left): stop generating for it."""
        self.cancel.set()
        if self._sequence is not None and not self._sequence.done:
            self.service.worker.cancel(self._sequence)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody listens
            self.close()

    def _run(self) -> None:
        engine, req = self.service.engine, self.req
        stop = StopMatcher(req.stop)
        finish = "length"
        pieces = engine.stream(req.prompt, max_new_tokens=self.max_tokens,
                               temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                               chat=req.chat, stats=self.stats, json_schema=req.json_schema)
        try:
            for piece in pieces:
                if self.cancel.is_set():
                    finish = "cancelled"
                    break
                out = stop.push(piece)
                if out:
                    self._put(("text", out))
                if stop.stopped:
                    finish = "stop"
                    break
            else:
                tail = stop.flush()
                if tail:
                    self._put(("text", tail))
                finish = self.stats.get("finish_reason", "length")
        except EdgertError as exc:
            self._put(("error", APIError(400, str(exc))))
            return
        finally:
            pieces.close()  # frees the engine's slot now, also on a stop or a disconnect
        self._put(("end", finish))

    def _submit(self) -> None:
        """Join the batch worker: its thread calls back per token and at the end."""
        engine, req = self.service.engine, self.req
        stop, detok = StopMatcher(req.stop), StreamDecoder(engine.tokenizer)
        started = time.perf_counter()

        def on_token(token: int) -> None:
            self.stats["new_tokens"] = len(seq.output)
            if stop.stopped:
                return
            out = stop.push(detok.push(token))
            if out:
                self._put(("text", out))
            if stop.stopped:
                self.service.worker.cancel(seq)

        def on_end(reason: str) -> None:
            if reason.startswith("error"):
                self._put(("error", APIError(500, f"generation failed ({reason})",
                                             kind="server_error")))
                return
            if not stop.stopped:
                out = stop.push(detok.flush())
                tail = out + ("" if stop.stopped else stop.flush())
                if tail:
                    self._put(("text", tail))
            elapsed = time.perf_counter() - started
            self.stats["reused_tokens"] = seq.reused
            self.stats["decode_tokens_per_s"] = len(seq.output) / elapsed if elapsed else 0.0
            self._put(("end", "stop" if stop.stopped else reason))

        params = SamplingParams(req.temperature, req.top_p, 0, req.seed)
        policy = engine.json_policy(req.json_schema) if req.json_schema is not None else None
        seq = BatchSequence(engine.encode(req.prompt, req.chat), self.max_tokens, params,
                            policy=policy, on_token=on_token, on_end=on_end)
        self._sequence = seq
        self.service.worker.submit(seq)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def build_app(service: Service) -> Starlette:
    """The Starlette application of ``service``."""

    async def health(request: Request) -> Response:
        if service.load_error is not None:
            return JSONResponse({"status": "error", "error": service.load_error}, 503)
        if service.engine is None:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        try:
            service.check_key(request)
        except APIError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": [
            {"id": service.options.model, "object": "model", "created": 0,
             "owned_by": "edgert"}]})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.text(service.waiting, service.busy,
                                                      service.options.parallel))

    async def chat(request: Request) -> Response:
        return await _complete(request, "chat", parse_chat)

    async def completions(request: Request) -> Response:
        return await _complete(request, "completions", parse_completion)

    async def _complete(request: Request, endpoint: str, parse) -> Response:
        started = time.perf_counter()
        service.metrics.requests[endpoint] = service.metrics.requests.get(endpoint, 0) + 1
        try:
            service.check_key(request)
            service.check_ready()
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIError(400, "the request body is not valid JSON") from None
            req = parse(body)
            prompt_tokens, max_tokens = _budget(service.engine, req)
            service.admit()
        except APIError as exc:
            service.metrics.errors += 1
            log.info("%s %s %d %s", request.method, request.url.path, exc.status, exc.code or "")
            return _error(exc)
        gen = Generation(service, req, max_tokens, asyncio.get_running_loop())
        ident = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = _Shape(endpoint, ident, service.options.model)

        def finish(reason: str) -> dict:
            completion = int(gen.stats.get("new_tokens", 0))
            reused = int(gen.stats.get("reused_tokens", 0))
            service.metrics.prompt_tokens += prompt_tokens
            service.metrics.reused_tokens += reused
            service.metrics.completion_tokens += completion
            service.metrics.speculative_accepted += sum(
                gen.stats.get("accepted_by", {}).values())
            service.metrics.decode_tokens_per_s = gen.stats.get("decode_tokens_per_s", 0.0)
            log.info("%s %s 200 prompt=%d (reused %d) completion=%d %s %.0f ms",
                     request.method, request.url.path, prompt_tokens, reused, completion,
                     reason, (time.perf_counter() - started) * 1e3)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                    "prompt_tokens_details": {"cached_tokens": reused}}

        if req.stream:
            return StreamingResponse(_sse(request, gen, shape, req, finish),
                                     media_type="text/event-stream")
        text = []
        try:
            while True:
                kind, value = await gen.queue.get()
                if kind == "text":
                    text.append(value)
                elif kind == "error":
                    return _error(value)
                else:
                    return JSONResponse(shape.whole("".join(text), value, finish(value)))
        finally:
            gen.close()
            service.release()

    async def _sse(request: Request, gen: Generation, shape, req: GenerationRequest, finish):
        try:
            yield _event(shape.chunk(None, first=True))
            while True:
                try:
                    kind, value = await asyncio.wait_for(gen.queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "text":
                    yield _event(shape.chunk(value))
                elif kind == "error":
                    yield _event(value.body())
                    return
                else:
                    usage = finish(value)
                    yield _event(shape.chunk(None, finish=value))
                    if req.include_usage:
                        yield _event(shape.usage_chunk(usage))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            gen.close()
            service.release()

    async def not_found(request: Request) -> Response:
        return _error(APIError(404, f"no route {request.method} {request.url.path}"))

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/metrics", metrics),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found})


def _budget(engine, req: GenerationRequest) -> tuple[int, int]:
    """(prompt tokens, max new tokens) of a request; 400 context_length_exceeded when the
    prompt and max_tokens do not fit the KV capacity."""
    try:
        prompt_tokens = len(engine.encode(req.prompt, req.chat))
    except EdgertError as exc:
        raise APIError(400, str(exc), param="messages" if req.chat else "prompt") from None
    room = engine.capacity - prompt_tokens
    max_tokens = req.max_tokens if req.max_tokens is not None else room
    if room < 1 or max_tokens > room:
        raise APIError(400, f"this model's context is {engine.capacity} tokens; the prompt "
                            f"has {prompt_tokens} and max_tokens asks for {max_tokens} more",
                       param="max_tokens" if req.max_tokens else "messages",
                       code="context_length_exceeded")
    return prompt_tokens, max_tokens


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@dataclass(frozen=True)
class _Shape:
    """OpenAI's response objects for one request."""

    endpoint: str
    ident: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str) -> dict:
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish, "logprobs": None}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, first: bool = False, finish: str | None = None) -> dict:
        if self.endpoint == "chat":
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}
