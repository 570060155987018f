"""`peftkit serve`: an AdapterBank behind an OpenAI-style HTTP API (FastAPI + uvicorn).

    POST   /v1/completions        {"model": ADAPTER | BASE, "prompt": str | [str], "max_tokens": n}
    POST   /v1/chat/completions   {"model": ADAPTER | BASE, "messages": [{"role", "content"}], "max_tokens": n}
    POST   /v1/classify           {"model": ADAPTER, "input": str | [str]}
    POST   /v1/answer             {"model": ADAPTER, "question": str | [str], "context": str | [str]}
    GET    /v1/models             the base model and the loaded adapters
    POST   /v1/admin/adapters     {"name": NAME, "path": DIR under --adapter-dir}    } Authorization: Bearer TOKEN;
    DELETE /v1/admin/adapters/NAME                                                    } off without a token

`model` names an adapter; the base model's name selects none. Decoding is greedy. Requests from
concurrent clients wait in one queue: a worker thread takes up to max_batch rows of one kind at a
time, whatever adapters they name, runs them as one batch and hands each request its own rows.
Bad requests get a 4xx with {"error": {"message", "type", "code", "param"}}; the server goes on.
A body over max_body_bytes is refused with 413 before it is read whole. A 500 says only its
request id (also in the x-request-id header); the traceback goes to the server's log.
"""
import asyncio
import concurrent.futures
import hmac
import logging
import queue
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import PeftkitError


log = logging.getLogger("peftkit.serve")
MAX_BODY_BYTES = 4 * 2**20  # 64 QA contexts of 50 KB fit; a 20 MB upload does not


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


# ---------------------------------------------------------------------------- request bodies

class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send more (user, top_p, ...)
    model: str


class Sampling(Body):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None


class CompletionBody(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    role: str
    content: str | list[dict]


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ClassifyBody(Body):
    input: str | list[str]


class AnswerBody(Body):
    question: str | list[str]
    context: str | list[str]


class LoadBody(BaseModel):
    name: str
    path: str


# ---------------------------------------------------------------------------- batching

@dataclass
class Job:
    kind: str  # complete | chat | classify | answer
    adapter: str | None
    rows: list  # per row: a prompt, a conversation, a text, or (question, context)
    max_tokens: int = 0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """One worker thread runs the bank. It takes the oldest waiting job, then for up to `wait_s`
    more jobs of the same kind (complete and chat batch together), up to `max_batch` rows."""

    def __init__(self, bank, max_batch: int, wait_s: float, max_prompt_tokens: int, max_input_tokens: int):
        self.bank, self.max_batch, self.wait_s, self.max_prompt_tokens = bank, max_batch, wait_s, max_prompt_tokens
        self.max_input_tokens = max_input_tokens
        self.queue = queue.Queue()
        self.history = deque(maxlen=1000)  # (kind, rows, adapters) of recent batches
        self.thread = threading.Thread(target=self._loop, name="peftkit-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        self.queue.put(job)
        return job.future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        waiting = deque()
        while True:
            first = waiting.popleft() if waiting else self.queue.get()
            if first is None:
                return
            jobs, rows = [first], len(first.rows)
            deadline = time.monotonic() + self.wait_s
            while rows < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(deadline - time.monotonic(), 0.0001))
                except queue.Empty:
                    break
                if job is not None and _family(job) == _family(first) and rows + len(job.rows) <= self.max_batch:
                    jobs.append(job)
                    rows += len(job.rows)
                else:
                    waiting.append(job)
                    if job is None:
                        break
            try:
                self._run(jobs)
            except Exception as err:  # never let the worker die: fail what is left of this batch
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)

    def _run(self, jobs: list[Job]) -> None:
        bank = self.bank
        with bank.lock:  # nothing loads or unloads between these checks and the batch
            live = []
            for job in jobs:
                if job.adapter is not None and job.adapter not in bank:
                    job.future.set_exception(ApiError(404, f"adapter {job.adapter!r} was unloaded", "model_not_found",
                                                      "model"))
                elif _family(job) == "generate" and not self._tokenize(job):
                    continue
                elif _family(job) != "generate" and not self._within_input_limit(job):
                    continue
                else:
                    live.append(job)
            if not live:
                return
            adapters = [job.adapter for job in live for _ in job.rows]
            self.history.append((_family(live[0]), len(adapters), sorted(set(map(str, adapters)))))
            try:
                if _family(live[0]) == "generate":
                    results = bank.complete([ids for job in live for ids in job.ids], adapters,
                                            [job.max_tokens for job in live for _ in job.rows])
                elif live[0].kind == "classify":
                    results = bank.classify([text for job in live for text in job.rows], adapters)
                else:
                    results = bank.answer([q for job in live for q, _ in job.rows],
                                          [c for job in live for _, c in job.rows], adapters)
            except Exception as err:
                if len(live) > 1:  # run each request alone: only the one that breaks fails
                    for job in live:
                        self._run([job])
                else:
                    live[0].future.set_exception(err)
                return
        start = 0
        for job in live:
            job.future.set_result(results[start:start + len(job.rows)])
            start += len(job.rows)

    def _tokenize(self, job: Job) -> bool:
        """Token ids of a generation job's rows (in this thread: the tokenizer is not thread-safe),
        or False after failing the job when a prompt is too long."""
        try:
            if job.kind == "chat":
                job.ids = [self.bank.chat_ids(messages) for messages in job.rows]
            else:
                job.ids = [self.bank.prompt_ids(prompt, job.adapter, template=False) for prompt in job.rows]
        except Exception as err:  # e.g. a chat template that rejects the roles given
            job.future.set_exception(ApiError(400, f"could not build the prompt: {err}", "invalid_prompt"))
            return False
        context = getattr(self.bank.model.config, "max_position_embeddings", None) or 10 ** 9
        for i, ids in enumerate(job.ids):
            limit = min(self.max_prompt_tokens, context - job.max_tokens)
            if len(ids) > limit:
                job.future.set_exception(ApiError(
                    400, f"prompt {i} has {len(ids)} tokens; with max_tokens {job.max_tokens} this server takes at "
                    f"most {limit} prompt tokens (max prompt {self.max_prompt_tokens}, context {context})",
                    "context_length_exceeded", "prompt" if job.kind == "complete" else "messages"))
                return False
        return True


    def _within_input_limit(self, job: Job) -> bool:
        """A classify or answer request's texts (questions and contexts) hold at most max_input_tokens
        tokens in all: one request's 50 long contexts would hold the model while others wait.
        False after failing the job."""
        texts = [part for row in job.rows for part in (row if isinstance(row, tuple) else (row,))]
        counts = self.bank.tokenizer(texts, add_special_tokens=False)["input_ids"]
        total = sum(map(len, counts))
        if total > self.max_input_tokens:
            job.future.set_exception(ApiError(
                400, f"the request's texts hold {total} tokens; this server takes at most {self.max_input_tokens} "
                "per request (split it into several requests)", "too_many_tokens",
                "context" if job.kind == "answer" else "input"))
            return False
        return True


def _family(job) -> str:
    return "generate" if job.kind in ("complete", "chat") else job.kind


# ---------------------------------------------------------------------------- the app

def create_app(bank, *, adapter_dir=None, admin_token: str | None = None, max_batch: int = 8,
               max_tokens: int = 256, max_prompt_tokens: int = 1024, max_inputs: int = 64,
               batch_wait_ms: float = 5.0, max_body_bytes: int = MAX_BODY_BYTES,
               max_input_tokens: int = 8192) -> FastAPI:
    """The HTTP app over `bank`. Runtime loading reads only folders under `adapter_dir`, and the
    admin endpoints are off unless `admin_token` is set."""
    base_id = Path(bank.base_name).name
    root = Path(adapter_dir).resolve() if adapter_dir else None
    created = int(time.time())
    batcher = Batcher(bank, max_batch, batch_wait_ms / 1000, max_prompt_tokens, max_input_tokens)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="peftkit", lifespan=lifespan)
    app.state.bank, app.state.batcher = bank, batcher
    app.add_middleware(BodyLimit, limit=max_body_bytes)

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

    def adapter_for(model: str, task: str, endpoint: str) -> str | None:
        if bank.task != task:
            raise ApiError(400, f"{endpoint} needs a {task} model; this server's base {base_id!r} is a "
                           f"{bank.task} model", "wrong_task", "model")
        if model in (base_id, bank.base_name):
            if task != "causal-lm":
                raise ApiError(400, f"{endpoint} needs an adapter: the base model {base_id!r} has no trained "
                               f"{task} head", "wrong_task", "model")
            return None
        entry = bank.entries.get(model)
        if entry is None:
            raise ApiError(404, f"unknown model {model!r}; this server has {', '.join(_ids(bank, base_id))}",
                           "model_not_found", "model")
        if entry.task != task:
            raise ApiError(400, f"adapter {model!r} is a {entry.task} adapter; {endpoint} needs a {task} one",
                           "wrong_task", "model")
        return model

    def limit_tokens(body: Sampling, requested: int | None, default: int) -> int:
        if body.stream:
            raise ApiError(400, "stream=true is not supported; ask without streaming", "unsupported", "stream")
        if body.n != 1:
            raise ApiError(400, f"n={body.n}: this server returns one choice per prompt", "unsupported", "n")
        if body.temperature not in (None, 0):
            raise ApiError(400, f"temperature {body.temperature}: this server decodes greedily; leave temperature "
                           "out or set it to 0", "unsupported", "temperature")
        requested = requested or default
        if requested > max_tokens:
            raise ApiError(400, f"max_tokens {requested} is above this server's limit of {max_tokens}",
                           "context_length_exceeded", "max_tokens")
        return requested

    async def run(job: Job) -> list:
        if not 1 <= len(job.rows) <= max_inputs:
            raise ApiError(400, f"got {len(job.rows)} inputs; send 1 to {max_inputs} per request", "invalid_body")
        return await asyncio.wrap_future(batcher.submit(job))

    @app.get("/v1/models")
    async def models():
        data = [{"id": base_id, "object": "model", "created": created, "owned_by": "peftkit",
                 "peftkit": {"adapter": False, "task": bank.task}}]
        for info in bank.adapters():
            data.append({"id": info["name"], "object": "model", "created": created, "owned_by": "peftkit",
                         "parent": base_id, "peftkit": {"adapter": True, **{k: v for k, v in info.items()
                                                                            if k not in ("name", "path")}}})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        adapter = adapter_for(body.model, "causal-lm", "/v1/completions")
        n_tokens = limit_tokens(body, body.max_tokens, default=min(16, max_tokens))  # OpenAI's default
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        results = await run(Job("complete", adapter, prompts, n_tokens))
        choices = [{"index": i, "text": _stop(r, body.stop)["text"], "finish_reason": r["finish_reason"],
                    "logprobs": None} for i, r in enumerate(results)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        adapter = adapter_for(body.model, "causal-lm", "/v1/chat/completions")
        n_tokens = limit_tokens(body, body.max_completion_tokens or body.max_tokens, default=max_tokens)
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        [result] = await run(Job("chat", adapter, [messages], n_tokens))
        result = _stop(result, body.stop)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "usage": _usage([result]),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}]}

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody):
        adapter = adapter_for(body.model, "classification", "/v1/classify")
        texts = [body.input] if isinstance(body.input, str) else body.input
        results = await run(Job("classify", adapter, texts))
        return {"object": "list", "model": body.model, "data": [{"index": i, **r} for i, r in enumerate(results)]}

    @app.post("/v1/answer")
    async def answer(body: AnswerBody):
        adapter = adapter_for(body.model, "qa", "/v1/answer")
        questions = [body.question] if isinstance(body.question, str) else body.question
        contexts = [body.context] if isinstance(body.context, str) else body.context
        if len(questions) != len(contexts):
            raise ApiError(400, f"{len(questions)} questions but {len(contexts)} contexts", "invalid_body", "context")
        results = await run(Job("answer", adapter, list(zip(questions, contexts))))
        return {"object": "list", "model": body.model, "data": [{"index": i, **r} for i, r in enumerate(results)]}

    def check_admin(request: Request) -> None:
        """A dependency of the admin routes, run before their body is read: a client without the
        token learns nothing about what a valid body looks like."""
        if not admin_token:
            raise ApiError(403, "the admin endpoints are off; start the server with an admin token "
                           "(--admin-token or PEFTKIT_ADMIN_TOKEN)", "admin_disabled")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), admin_token.encode()):
            raise ApiError(401, "missing or wrong admin token; send Authorization: Bearer TOKEN", "unauthorized")

    @app.post("/v1/admin/adapters", status_code=201, dependencies=[Depends(check_admin)])
    async def load_adapter(request: Request):
        try:  # read here, after the token check: FastAPI would parse a declared body first
            body = LoadBody.model_validate_json(await request.body())
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from None
        if root is None:
            raise ApiError(403, "loading adapters at run time needs an adapter directory (--adapter-dir)",
                           "no_adapter_dir", "path")
        path = (root / body.path).resolve()
        if not path.is_relative_to(root):
            raise ApiError(403, f"adapter path {body.path!r} is outside the adapter directory", "path_not_allowed",
                           "path")
        if body.name in bank:
            raise ApiError(409, f"an adapter named {body.name!r} is already loaded; unload it first", "name_taken",
                           "name")
        try:
            info = await run_in_threadpool(bank.load, body.name, path)
        except PeftkitError as err:
            raise ApiError(400, str(err), "adapter_refused", "path") from None
        return {"loaded": {k: v for k, v in info.items() if k != "path"}}

    @app.delete("/v1/admin/adapters/{name}", dependencies=[Depends(check_admin)])
    async def unload_adapter(name: str):
        if name not in bank:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "model_not_found", "name")
        await run_in_threadpool(bank.unload, name)
        return {"unloaded": name}

    return app


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
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind or "invalid_request_error", "code": code, "param": param}})


def _ids(bank, base_id: str) -> list[str]:
    return [base_id] + [a["name"] for a in bank.adapters()]


def _text(content) -> str:
    if isinstance(content, str):
        return content
    parts = [p.get("text") for p in content if p.get("type") == "text"]
    if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
        raise ApiError(400, "message content parts must all be {'type': 'text', 'text': ...}", "invalid_body",
                       "messages")
    return "".join(parts)


def _stop(result: dict, stop) -> dict:
    """Cut the text at the first stop string (the model still generated past it)."""
    stops = [stop] if isinstance(stop, str) else stop or []
    cuts = [result["text"].find(s) for s in stops if s and s in result["text"]]
    return {**result, "text": result["text"][:min(cuts)], "finish_reason": "stop"} if cuts else result


def _usage(results: list[dict]) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
