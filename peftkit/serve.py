"""`peftkit serve`: an AdapterBank behind an OpenAI-style HTTP API (FastAPI + uvicorn).

    POST   /v1/completions        {"model": ADAPTER | BASE, "prompt": str | [str], "max_tokens": n, ...}
    POST   /v1/chat/completions   {"model": ADAPTER | BASE, "messages": [{"role", "content"}], ...}
    POST   /v1/classify           {"model": ADAPTER, "input": str | [str]}
    POST   /v1/answer             {"model": ADAPTER, "question": str | [str], "context": str | [str]}
    GET    /v1/models             the base model and the loaded adapters
    POST   /v1/admin/adapters     {"name": NAME, "path": DIR under --adapter-dir}    } Authorization: Bearer TOKEN;
    DELETE /v1/admin/adapters/NAME                                                    } off without a token

`model` names an adapter; the base model's name selects none. The completion endpoints take
OpenAI's `stream` (server-sent events, with `stream_options.include_usage`), `temperature`,
`top_p`, `seed`, `n`, `stop` and `max_tokens`; without a temperature they decode greedily (OpenAI's
default is 1). Parameters the server cannot honour (`logprobs`, `tools`, `response_format`,
penalties, ...) get a 400 that names them, never silent neglect.

Concurrent requests share the model fairly (batcher.py): requests of one kind are batched
whatever adapters they name, and batches take turns on the model step by step, so a new small
request runs as soon as the step under way ends and none waits for a whole long one. A client
that disconnects (or stops reading a stream) has its rows end at the next step; their
batch-mates go on.
Bad requests get a 4xx with {"error": {"message", "type", "code", "param"}}. A body over
max_body_bytes gets 413 before it is read whole. A 500 says only its request id (also in the
x-request-id header); the traceback goes to the server's log.

This module only wires HTTP: what each endpoint does is in routes.py (plain functions over the
bank), the batching in batcher.py, the OpenAI-shaped bodies and events in openai_api.py.
"""
import asyncio
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import ValidationError

from . import routes
from .batcher import Job
from .errors import PeftkitError
from .openai_api import (AnswerBody, ApiError, ChatBody, Chunks, ClassifyBody, CompletionBody, LoadBody, Sampling,
                         chat_response, completion_response, error_body, event, listing)
from .routes import Service

__all__ = ["create_app", "serve", "BackgroundServer", "BodyLimit", "ApiError", "Service", "MAX_BODY_BYTES"]

log = logging.getLogger("peftkit.serve")
MAX_BODY_BYTES = 4 * 2**20  # 64 QA contexts of 50 KB fit; a 20 MB upload does not


def create_app(bank, *, max_body_bytes: int = MAX_BODY_BYTES, **options) -> FastAPI:
    """The HTTP app over `bank`. `options` are Service.open's: adapter_dir (runtime loading reads
    only folders under it), admin_token (the admin endpoints are off without one), max_batch,
    max_tokens, max_prompt_tokens, max_inputs, batch_wait_ms, max_input_tokens."""
    service = Service.open(bank, **options)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="peftkit", lifespan=lifespan)
    app.state.service, app.state.bank, app.state.batcher = service, bank, service.batcher
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    _error_handlers(app)

    async def run(request: Request, job: Job) -> list:
        """The job's results; a client that disconnects while it waits has its job cancelled."""
        await run_in_threadpool(routes.admit, service, job)
        future = asyncio.wrap_future(service.batcher.submit(job))
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits for it now
                    raise ApiError(499, "the client closed the request", "client_closed") from None

    async def stream(job: Job, body: Sampling) -> StreamingResponse:
        """Server-sent events as OpenAI streams them: text pieces as they are decoded, then each
        choice's finish_reason, usage when stream_options.include_usage asks for it, then [DONE]."""
        await run_in_threadpool(routes.admit, service, job)  # a bad prompt still gets its 4xx, before the stream
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for index, seq in enumerate(job.rows):
            seq.on_text = lambda text, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, text))
        chunks = Chunks(job.kind == "chat", body.model)

        async def events_out():
            future = service.batcher.submit(job)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
            try:
                if chunks.chat:  # the role first, as OpenAI sends it
                    for index in range(len(job.rows)):
                        yield chunks.opening(index)
                while (item := await events.get()) is not None:
                    yield chunks.piece(*item)
                if future.exception() is not None:
                    yield event(_stream_error(future.exception()))
                else:
                    for index, seq in enumerate(job.rows):
                        yield chunks.piece(index, None, seq.finish_reason)
                    if (body.stream_options or {}).get("include_usage"):
                        yield chunks.usage([s.result() for s in job.rows])
                yield Chunks.DONE
            finally:
                job.cancelled = True  # a client gone mid-stream: its rows end at the next step

        return StreamingResponse(events_out(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return routes.list_models(service)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        job = routes.completion_job(service, body)
        return await stream(job, body) if body.stream else completion_response(body, await run(request, job))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        job = routes.chat_job(service, body)
        return await stream(job, body) if body.stream else chat_response(body, await run(request, job))

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, request: Request):
        return listing(body, await run(request, routes.classify_job(service, body)))

    @app.post("/v1/answer")
    async def answer(body: AnswerBody, request: Request):
        return listing(body, await run(request, routes.answer_job(service, body)))

    def check_admin(request: Request) -> None:
        """A dependency of the admin routes, run before their body is read: a client without the
        token learns nothing about what a valid body looks like."""
        routes.check_admin(service, request.headers.get("authorization", ""))

    @app.post("/v1/admin/adapters", status_code=201, dependencies=[Depends(check_admin)])
    async def load_adapter(request: Request):
        try:  # read here, after the token check: FastAPI would parse a declared body first
            body = LoadBody.model_validate_json(await request.body())
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from None
        return await run_in_threadpool(routes.load_adapter, service, body)

    @app.delete("/v1/admin/adapters/{name}", dependencies=[Depends(check_admin)])
    async def unload_adapter(name: str):
        return await run_in_threadpool(routes.unload_adapter, service, name)

    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's {"error": ...} body; a crash as a request id, its traceback in the log."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(err.status_code)
        return _error(err.status_code, str(err.detail), code)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return _error(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in err.errors()[:5])
        first = next((str(p) for p in err.errors()[0]["loc"] if p != "body"), None) if err.errors() else None
        return _error(400, f"malformed request body: {problems}", "invalid_body", first)

    @app.exception_handler(PeftkitError)
    async def peftkit_error(request, err: PeftkitError):
        return _error(400, str(err), "invalid_request")

    @app.exception_handler(Exception)
    async def crash(request, err: Exception):
        request_id = uuid.uuid4().hex[:16]  # the client quotes it; the log has the rest
        log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=err)
        response = _error(500, f"internal error; request id {request_id}", "internal_error", kind="server_error")
        response.headers["x-request-id"] = request_id
        return response


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before it is read whole, by its
    Content-Length, or for a chunked body as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            message = f"request body over this server's limit of {self.limit} bytes"
            return await _error(413, message, "body_too_large")(scope, receive, send)
        read = 0

        async def limited():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:  # FastAPI passes an HTTPException from reading the body through as is
                raise HTTPException(413, f"request body over this server's limit of {self.limit} bytes")
            return message
        await self.app(scope, limited, send)


def _error(status: int, message: str, code: str | None, param: str | None = None, kind: str | None = None):
    return JSONResponse(status_code=status, content=error_body(message, code, param, kind))


def _stream_error(err: Exception) -> dict:
    """The error a stream ends with: an ApiError as it is, anything else as a logged internal error."""
    if isinstance(err, ApiError):
        return error_body(err.message, err.code, err.param)
    request_id = uuid.uuid4().hex[:16]
    log.error("stream %s failed", request_id, exc_info=err)
    return error_body(f"internal error; request id {request_id}", "internal_error", kind="server_error")


# ---------------------------------------------------------------------------- running it

def open_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted; prints the address first (port 0 picks a free one)."""
    sock = open_socket(host, port)
    print(f"peftkit: serving on http://{host}:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


class BackgroundServer:
    """The app on a uvicorn server in a thread (tests, notebooks):

        with BackgroundServer(app) as server:   # port 0: any free port
            httpx.get(server.url + "/v1/models")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.sock = open_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
