"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the AsyncEngine: completions, chat, tokenize, metrics."""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardserve.core.outputs import RequestOutput
from shardserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStoppingError
from shardserve.entrypoints.openai import responses as R
from shardserve.entrypoints.openai.errors import error_response
from shardserve.entrypoints.openai.limits import (MAX_BODY_BYTES, BodyLimit, declared_too_large, guarded_protocol,
                                                  too_large_response)
from shardserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                    TokenizeRequest)
from shardserve.model.tokenizer import apply_chat_template

logger = logging.getLogger("shardserve.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("shardserve_num_requests_running", "Sequences running in the engine", registry=r)
        self.waiting = Gauge("shardserve_num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("shardserve_kv_cache_usage_perc", "Fraction of KV-cache blocks in use", registry=r)
        self.prompt_tokens = Counter("shardserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("shardserve_generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("shardserve_request_success", "Finished requests", ["finished_reason"], registry=r)
        self.ttft = Histogram("shardserve_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("shardserve_time_per_output_token_seconds", "Inter-token latency", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def observe(self, out: RequestOutput) -> None:
        m = out.metrics
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        n = sum(len(c.token_ids) for c in out.outputs)
        self.generation_tokens.inc(n)
        for c in out.outputs:
            self.success.labels(c.finish_reason or "unknown").inc()
        if m.get("first_token_time"):
            self.ttft.observe(m["first_token_time"] - m["arrival_time"])
            per_seq = max(len(c.token_ids) for c in out.outputs)
            if per_seq > 1 and m.get("finished_time"):
                self.tpot.observe((m["finished_time"] - m["first_token_time"]) / (per_seq - 1))

    def render(self, stats: dict) -> bytes:
        self.running.set(stats.get("num_running", 0))
        self.waiting.set(stats.get("num_waiting", 0))
        self.kv_usage.set(stats.get("kv_cache_usage", 0.0))
        return generate_latest(self.registry)


def create_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
               max_model_len: int | None = None) -> FastAPI:
    metrics = Metrics()
    tokenizer = engine.tokenizer
    max_len = max_model_len or engine.engine.config.scheduler.max_model_len

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="shardserve", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    # ---- errors, auth, limits -----------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_response(400, f"{first.get('msg', 'invalid request')} (at {param or 'body'})",
                              "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError):
        return error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError):
        return error_response(503, str(exc), "service_unavailable")

    @app.exception_handler(OverflowError)
    async def _busy(request: Request, exc: OverflowError):
        return error_response(503, f"the server is at capacity ({exc}); retry later", "service_unavailable",
                              headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    # Added before the auth middleware, so inside it: the route reading the body gets the 413 as its own
    # exception (BaseHTTPMiddleware would wrap it in an ExceptionGroup on the way).
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if declared_too_large(request.headers.get("content-length"), MAX_BODY_BYTES):    # before auth, as ever
            return too_large_response(MAX_BODY_BYTES)
        path = request.url.path
        if api_key and (path.startswith("/v1") or path in ("/tokenize", "/detokenize")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                      "authentication_error")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                           "NotFoundError", "model")

    def prepare(prompt, max_tokens: int | None, param: str) -> tuple[str | None, list[int]]:
        """Tokenize and check one prompt; blocking (a long prompt takes seconds): call it off the event loop."""
        try:
            text, ids = engine.prepare(prompt if not isinstance(prompt, list) else {"prompt_token_ids": prompt})
        except ValueError as exc:
            raise ApiError(400, str(exc), param=param) from exc
        if max_tokens is not None and len(ids) + max_tokens > max_len:
            raise ApiError(400, f"this model's maximum context length is {max_len} tokens, but the request asks "
                                f"for {len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate); "
                                "shorten the prompt or lower max_tokens", param="max_tokens")
        return text, ids

    # ---- routes -------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        try:
            engine.check_accepting()
        except EngineDeadError as exc:                  # stopped, or draining (EngineStoppingError)
            return error_response(503, str(exc), "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(engine.stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "owned_by": "shardserve",
                                            "max_model_len": max_len, "created": 0}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if req.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = await asyncio.to_thread(apply_chat_template, tokenizer, messages)
        elif req.prompt is not None:
            ids = await asyncio.to_thread(tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise ApiError(400, "give 'prompt' or 'messages'", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        vocab = engine.engine.config.model.spec.vocab_size

        def decode() -> str:
            if any(not 0 <= t < vocab for t in req.tokens):
                raise ApiError(400, f"token ids must be in [0, {vocab})", param="tokens")
            return tokenizer.decode(req.tokens)
        return {"prompt": await asyncio.to_thread(decode)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        engine.check_accepting()
        try:
            prompts = req.prompts()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from exc
        prepared = await asyncio.to_thread(lambda: [prepare(p, req.max_tokens, "prompt") for p in prompts])
        params = [req.sampling_params(min(16, _default_max(ids, max_len)), req.logprobs) for _, ids in prepared]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = []
        try:
            for i, ((t, ids), p) in enumerate(zip(prepared, params)):
                streams.append(engine.generate(f"{request_id}-{i}", {"prompt": t, "prompt_token_ids": ids}, p))
        except Exception:                       # e.g. the queue filled up: none of this request runs
            for i in range(len(streams)):
                engine.abort(f"{request_id}-{i}")
            raise
        echo = ([t if t is not None else await asyncio.to_thread(tokenizer.decode, ids) for t, ids in prepared]
                if req.echo else [""] * len(prepared))
        n = req.n
        if req.stream:
            return _sse(_stream_completions(streams, request_id, served_model_name, n, echo, req, tokenizer,
                                            metrics))
        ids = [f"{request_id}-{i}" for i in range(len(streams))]
        finals = await _unless_disconnected(request, _collect(streams), lambda: [engine.abort(i) for i in ids])
        if finals is None:
            return _client_gone()
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                lp = R.completion_logprobs(tokenizer, c, 0, len(echo[i]))
                choices.append(R.completion_choice(i * n + c.index, echo[i] + c.text, lp, c.finish_reason))
                if req.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = _prompt_logprobs_json(out)
            metrics.observe(out)
        body = R.base("text_completion", request_id, served_model_name)
        body.update(choices=choices, usage=R.usage(*R.count_tokens(finals)))
        return body

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        engine.check_accepting()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        max_tokens = req.max_completion_tokens or req.max_tokens

        def template_and_prepare() -> list[int]:
            try:
                ids = apply_chat_template(tokenizer, messages, req.add_generation_prompt)
            except ValueError as exc:
                raise ApiError(400, str(exc), param="messages") from exc
            return prepare(ids, max_tokens, "messages")[1]
        ids = await asyncio.to_thread(template_and_prepare)
        top = req.top_logprobs or 0
        params = req.sampling_params(_default_max(ids, max_len), top if req.logprobs else None)
        if max_tokens is not None:
            params.max_tokens = max_tokens
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = engine.generate(request_id, {"prompt_token_ids": ids}, params)
        if req.stream:
            return _sse(_stream_chat(stream, request_id, served_model_name, req, top, tokenizer, metrics))
        finals = await _unless_disconnected(request, _collect([stream]), lambda: engine.abort(request_id))
        if finals is None:
            return _client_gone()
        (final,) = finals
        metrics.observe(final)
        choices = [R.chat_choice(c.index, c.text, R.chat_logprobs(tokenizer, c, 0, top), c.finish_reason, False)
                   for c in final.outputs]
        body = R.base("chat.completion", request_id, served_model_name)
        body.update(choices=choices, usage=R.usage(*R.count_tokens([final])))
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = _prompt_logprobs_json(final)
        return body

    return app


def _prompt_logprobs_json(out: RequestOutput) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in entry.items()} for entry in out.prompt_logprobs]


def _default_max(ids: list[int], max_len: int) -> int:
    return max(1, max_len - len(ids))


async def _collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Each stream's final output; if one fails (or this is cancelled) the others are cancelled, which aborts them."""
    async def last(stream):
        final = None
        async for out in stream:
            final = out
        return final
    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


async def _unless_disconnected(request: Request, work: Awaitable, abort: Callable[[], object]):
    """Await `work` (a non-streaming request's generation) while watching its connection: if the client hangs up
    first (a timeout, a disconnect), cancel the work, `abort()` its engine requests and return None, so abandoned
    work stops at once instead of running to max_tokens for no one. Streaming responses watch the connection in
    Starlette's StreamingResponse."""
    async def disconnected() -> bool:
        while True:                             # the body is read: what comes next is http.disconnect
            if (await request.receive())["type"] == "http.disconnect":
                return True

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and (watcher.cancelled() or watcher.exception() is not None):
            await asyncio.wait((task,))        # the watch failed, not the client: just wait for the work
        if task.done():
            return task.result()
        logger.info("the client hung up before its response: its requests are aborted")
        return None
    finally:
        watcher.cancel()
        if not task.done() or task.cancelled() or task.exception() is not None:
            task.cancel()
            abort()


def _client_gone() -> Response:
    """The answer to a client that is no longer there (nginx's 499); it is never seen."""
    return error_response(499, "the client closed the connection before the response", "client_closed_request")


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except (EngineDeadError, ValueError) as exc:
            err = {"error": {"message": str(exc), "type": "service_unavailable", "param": None, "code": 503}}
            yield f"data: {json.dumps(err)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as their outputs arrive; cancelling this cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _stream_completions(streams, request_id, model, n, echo, req, tokenizer, metrics):
    sent_text: dict[tuple[int, int], int] = {}
    sent_tok: dict[tuple[int, int], int] = {}
    finals = {}
    async for i, out in _merge(streams):
        for c in out.outputs:
            key = (i, c.index)
            if key not in sent_text and echo[i]:
                yield _chunk("text_completion", request_id, model,
                             R.completion_choice(i * n + c.index, echo[i], None, None))
            t0, k0 = sent_text.get(key, 0), sent_tok.get(key, 0)
            delta = c.text[t0:]
            if delta or c.finish_reason is not None and k0 <= len(c.token_ids):
                lp = R.completion_logprobs(tokenizer, c, k0, len(echo[i]) + t0)
                yield _chunk("text_completion", request_id, model,
                             R.completion_choice(i * n + c.index, delta, lp, c.finish_reason))
                sent_text[key], sent_tok[key] = len(c.text), len(c.token_ids) + (c.finish_reason is not None)
        if out.finished:
            finals[i] = out
            metrics.observe(out)
    if req.stream_options and req.stream_options.include_usage:
        body = R.base("text_completion", request_id, model)
        body.update(choices=[], usage=R.usage(*R.count_tokens(list(finals.values()))))
        yield body


async def _stream_chat(stream, request_id, model, req, top, tokenizer, metrics):
    sent_text: dict[int, int] = {}
    sent_tok: dict[int, int] = {}
    final = None
    for i in range(req.n):
        yield _chunk("chat.completion.chunk", request_id, model,
                     {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None})
    async for out in stream:
        for c in out.outputs:
            t0, k0 = sent_text.get(c.index, 0), sent_tok.get(c.index, 0)
            delta = c.text[t0:]
            if delta or (c.finish_reason is not None and k0 <= len(c.token_ids)):
                lp = R.chat_logprobs(tokenizer, c, k0, top)
                yield _chunk("chat.completion.chunk", request_id, model,
                             {"index": c.index, "delta": {"content": delta}, "logprobs": lp,
                              "finish_reason": c.finish_reason})
                sent_text[c.index], sent_tok[c.index] = len(c.text), len(c.token_ids) + (c.finish_reason is not None)
        if out.finished:
            final = out
            metrics.observe(out)
    if req.stream_options and req.stream_options.include_usage and final is not None:
        body = R.base("chat.completion.chunk", request_id, model)
        body.update(choices=[], usage=R.usage(*R.count_tokens([final])))
        yield body


def _chunk(kind: str, request_id: str, model: str, choice: dict) -> dict:
    body = R.base(kind, request_id, model)
    body["choices"] = [choice]
    return body


# ---- `shardserve serve` ------------------------------------------------------------------------------
class DrainingServer(uvicorn.Server):
    """uvicorn's server with a bounded shutdown (SIGINT/SIGTERM) that ends every request cleanly.

    uvicorn's own shutdown stops listening, closes idle connections and waits for the rest. On top of that the
    engine refuses new work at once (503, and 503 from /health) and, `drain_timeout` s after the signal, cuts every
    request still in progress: a stream gets an error event and `[DONE]`, a non-streaming request a 503 with an
    OpenAI error body. uvicorn's own deadline (`timeout_graceful_shutdown`, set a second later) then only has to
    drop connections whose client stopped reading. The lifespan's end stops the engine and its workers.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout

    async def shutdown(self, sockets=None) -> None:
        engine, drain = self.engine, self.drain_timeout
        engine.stop_accepting("the server is shutting down; send the request to another replica or retry later")
        logger.warning("shutting down: %d request(s) in progress get up to %g s to finish", len(engine.streams), drain)

        def cut() -> None:
            n = engine.abort_all(EngineStoppingError(
                f"the server is shutting down and this request did not finish within its {drain:g} s drain timeout "
                "(--shutdown-timeout); retry it"))
            if n:
                logger.warning("shutdown: cut %d request(s) still in progress after %g s", n, drain)

        timer = asyncio.get_running_loop().call_later(drain, cut)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def run_server(ns: argparse.Namespace) -> int:
    import os

    from shardserve.engine.engine_args import EngineArgs
    from shardserve.engine.llm_engine import LLMEngine

    keep_alive, header = ns.timeout_keep_alive, ns.timeout_request_header
    if not (keep_alive > 0 and header > 0):
        raise ValueError(f"--timeout-keep-alive and --timeout-request-header must be > 0, got {keep_alive}, {header}")
    drain = ns.shutdown_timeout
    if not drain >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {drain}")
    max_waiting = ns.max_waiting_requests
    if max_waiting is not None and max_waiting < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {max_waiting}")
    args = EngineArgs.from_cli_args(ns)
    args.model = ns.model_tag or args.model
    name = ns.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model
                                    else "SmolLM2-135M-Instruct")
    # The port is taken before the engine starts: a busy one fails at once, and the sockets the engine opens on
    # ephemeral ports (rendezvous, Gloo, TCP links) cannot take it meanwhile.
    try:
        listener = socket.create_server((ns.host, ns.port), family=socket.AF_INET6 if ":" in ns.host else
                                        socket.AF_INET)
    except OSError as exc:
        raise ValueError(f"cannot listen on {ns.host}:{ns.port} ({exc}); pass --port (and --host) for a free "
                         "address") from None
    try:
        async_engine = AsyncEngine(lambda: LLMEngine.from_engine_args(args), max_waiting)
    except BaseException:
        listener.close()
        raise
    app = create_app(async_engine, name, ns.api_key)
    # uvicorn's keep-alive timeout is an int in its signature but only ever handed to loop.call_later; its graceful
    # shutdown deadline only has to outlast the drain (cut requests end within a moment of it)
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.log_level,
                            timeout_graceful_shutdown=drain + 1,  # type: ignore[arg-type]
                            http=guarded_protocol(header), timeout_keep_alive=keep_alive)  # type: ignore[arg-type]
    server = DrainingServer(config, async_engine, drain)
    print(f"shardserve: serving {name!r} on http://{ns.host}:{ns.port}/v1 "
          f"(tp={args.tensor_parallel_size} pp={args.pipeline_parallel_size})", flush=True)
    # uvicorn shuts down on SIGINT/SIGTERM (draining, above), then re-raises the signal for the previous handler:
    # make that handler a no-op so the process exits 0 after stopping the engine and its workers.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[listener])
    finally:
        if async_engine.thread.is_alive() or not async_engine.stopping:
            async_engine.shutdown()
    return 0
