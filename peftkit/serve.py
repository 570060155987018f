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

Concurrent requests share the model fairly. A dispatcher thread groups waiting requests of one
kind (up to max_batch rows, whatever adapters they name) into batches, and worker threads run
the batches in turns: a generating batch offers the bank's lock after every token (and after
every chunk of its prompts, bank.PREFILL_TOKENS tokens), a classify or answer batch after every
chunk of rows, and the lock goes to the waiting batch that has had the fewest turns
(peftkit.turns). A new small request runs as soon as the step under way ends; long ones
alternate step by step; none waits for a whole long one. A client that
disconnects (or stops reading a stream) has its rows end at the next step; their batch-mates go on.
Bad requests get a 4xx with {"error": {"message", "type", "code", "param"}}. A body over
max_body_bytes gets 413 before it is read whole. A 500 says only its request id (also in the
x-request-id header); the traceback goes to the server's log.
"""
import asyncio
import concurrent.futures
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import Counter, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .decoding import Sequence
from .errors import PeftkitError


log = logging.getLogger("peftkit.serve")
MAX_BODY_BYTES = 4 * 2**20  # 64 QA contexts of 50 KB fit; a 20 MB upload does not
WORKERS = 4  # batches that may be under way at once, taking turns on the model
CHUNK_TOKENS = 4096  # text tokens a classify or answer turn takes at most (a dozen 384-token QA windows)
# OpenAI parameters this server does not implement: a request that sets one (to anything but its
# do-nothing value) is refused, naming it, rather than answered as if it had not asked
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty",
               "repetition_penalty", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
               "response_format", "best_of", "echo", "suffix", "modalities", "audio", "prediction",
               "reasoning_effort", "web_search_options", "min_p", "top_k")
DO_NOTHING = (None, False, 0, [], {}, "none", {"type": "text"})
HARMLESS = ("user", "metadata", "store", "service_tier")  # bookkeeping for OpenAI's side; nothing to do here


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


# ---------------------------------------------------------------------------- request bodies

class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str


class Sampling(Body):
    model_config = ConfigDict(extra="allow")  # checked by check_parameters: unsupported ones are refused
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None


class CompletionBody(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
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
    rows: list  # per row: a Sequence (generation), a text, or (question, context)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False  # the client went away: rows not yet run are skipped, generation ends
    sizes: list = field(default_factory=list)  # classify and answer: tokens of text per row (prepare counts them)


class Batcher:
    """A dispatcher thread takes the oldest waiting job, then for up to `wait_s` more jobs of the
    same family (complete and chat batch together), up to `max_batch` rows, and hands the batch
    to a worker; workers take turns on the model through the bank's lock."""

    def __init__(self, bank, max_batch: int, wait_s: float, max_prompt_tokens: int, max_input_tokens: int,
                 workers: int = WORKERS):
        self.bank, self.max_batch, self.wait_s, self.max_prompt_tokens = bank, max_batch, wait_s, max_prompt_tokens
        self.max_input_tokens = max_input_tokens
        self.queue = queue.Queue()
        self.history = deque(maxlen=1000)  # (family, rows, adapters) of recent batches
        self.in_use = Counter()  # adapter -> batches under way that use it (unload refuses while any)
        self.counting = threading.Lock()
        self.workers = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="peftkit-batch")
        self.thread = threading.Thread(target=self._loop, name="peftkit-dispatcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        self.queue.put(job)
        return job.future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)
        self.workers.shutdown(wait=True, cancel_futures=True)

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
            used = {job.adapter for job in jobs}
            with self.counting:
                self.in_use.update(used)
            self.workers.submit(self._run_safely, jobs, used)

    def _run_safely(self, jobs: list[Job], used: set) -> None:
        try:
            self._run(jobs)
        except Exception as err:  # never leave a client hanging: fail what is left of this batch
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
        finally:
            with self.counting:
                self.in_use.subtract(used)
            for job in jobs:  # cancelled before their turn came
                if not job.future.done():
                    job.future.set_exception(ApiError(499, "the client closed the request", "client_closed"))

    def _run(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.cancelled and self._still_loaded(job)]
        if not live:
            return
        adapters = [job.adapter for job in live for _ in job.rows]
        self.history.append((_family(live[0]), len(adapters), sorted(set(map(str, adapters)))))
        try:
            if _family(live[0]) == "generate":  # each job answered as soon as its own rows are done
                self.bank.decode([seq for job in live for seq in job.rows], between_steps=lambda: _settle(live))
                _settle(live)
                return
            else:
                results = self._in_chunks(live)
        except Exception as err:
            unsent = [job for job in live if not job.future.done()]
            again = [job for job in unsent if len(live) > 1 and _can_restart(job)]
            for job in unsent:
                if job not in again:
                    job.future.set_exception(err)
            for job in again:  # run each request alone: only the one that breaks fails
                for row in job.rows if _family(job) == "generate" else ():
                    row.restart()
                self._run([job])
            return
        start = 0
        for job in live:
            if not job.future.done():
                job.future.set_result(results[start:start + len(job.rows)])
            start += len(job.rows)

    def _in_chunks(self, jobs: list[Job]) -> list:
        """Classify or answer the jobs' rows a chunk at a time, each chunk in its own turn on the model,
        skipping the rows of jobs cancelled meanwhile. A chunk is at most the bank's batch size in rows
        and CHUNK_TOKENS tokens of text (a row over that is a chunk of its own, bounded by
        max_input_tokens): a row's QA windows all run inside its chunk's turn."""
        rows = [(job, row, size) for job in jobs for row, size in zip(job.rows, job.sizes)]
        results = []
        for turns, part in enumerate(_chunks(rows, self.bank.batch_size, CHUNK_TOKENS)):
            todo = [i for i, (job, _, _) in enumerate(part) if not job.cancelled]
            out = []
            if todo:
                with self.bank.lock.turn(had=turns):  # the tokenizer is not thread-safe: it runs in the turn too
                    texts, names = [part[i][1] for i in todo], [part[i][0].adapter for i in todo]
                    out = (self.bank.classify(texts, names) if jobs[0].kind == "classify" else
                           self.bank.answer([q for q, _ in texts], [c for _, c in texts], names))
            done = dict(zip(todo, out))
            results += [done.get(i) for i in range(len(part))]
        return results

    def _still_loaded(self, job: Job) -> bool:
        if job.adapter is None or job.adapter in self.bank:
            return True
        job.future.set_exception(ApiError(404, f"adapter {job.adapter!r} was unloaded", "model_not_found", "model"))
        return False

    def prepare(self, job: Job) -> None:
        """Check a job before it is queued (in a worker thread, inside a turn: the tokenizer is not
        thread-safe): generation prompts tokenized and within the context, classify and answer
        texts within max_input_tokens. Raises ApiError."""
        with self.bank.lock:
            if _family(job) == "generate":
                self._tokenize(job)
            else:
                self._check_input_tokens(job)

    def _tokenize(self, job: Job) -> None:
        try:
            for seq in job.rows:
                if job.kind == "chat":
                    seq.prompt = self.bank.chat_ids(seq.prompt)
                else:
                    seq.prompt = self.bank.prompt_ids(seq.prompt, job.adapter, template=False)
        except Exception as err:  # e.g. a chat template that rejects the roles given
            raise ApiError(400, f"could not build the prompt: {err}", "invalid_prompt") from None
        context = getattr(self.bank.model.config, "max_position_embeddings", None) or 10 ** 9
        for i, seq in enumerate(job.rows):
            limit = min(self.max_prompt_tokens, context - seq.max_tokens)
            if len(seq.prompt) > limit:
                raise ApiError(
                    400, f"prompt {i} has {len(seq.prompt)} tokens; with max_tokens {seq.max_tokens} this server "
                    f"takes at most {limit} prompt tokens (max prompt {self.max_prompt_tokens}, context {context})",
                    "context_length_exceeded", "prompt" if job.kind == "complete" else "messages")

    def _check_input_tokens(self, job: Job) -> None:
        """A classify or answer request's texts (questions and contexts) hold at most max_input_tokens
        tokens in all, so that one request's turns on the model are bounded too."""
        texts = [part for row in job.rows for part in (row if isinstance(row, tuple) else (row,))]
        counts = list(map(len, self.bank.tokenizer(texts, add_special_tokens=False)["input_ids"]))
        per_row = 2 if job.kind == "answer" else 1  # a question and its context
        job.sizes = [sum(counts[i:i + per_row]) for i in range(0, len(counts), per_row)]
        total = sum(counts)
        if total > self.max_input_tokens:
            raise ApiError(
                400, f"the request's texts hold {total} tokens; this server takes at most {self.max_input_tokens} "
                "per request (split it into several requests)", "too_many_tokens",
                "context" if job.kind == "answer" else "input")


def _can_restart(job: Job) -> bool:
    """Whether a job can run again from the start: nothing of it has been streamed to its client yet."""
    return _family(job) != "generate" or not any(seq.streamed for seq in job.rows)


def _chunks(rows: list, max_rows: int, max_tokens: int):
    """Consecutive runs of (job, row, size) with at most max_rows rows and max_tokens tokens (a
    bigger row alone)."""
    part, tokens = [], 0
    for row in rows:
        if part and (len(part) == max_rows or tokens + row[2] > max_tokens):
            yield part
            part, tokens = [], 0
        part.append(row)
        tokens += row[2]
    if part:
        yield part


def _settle(jobs: list[Job]) -> None:
    """Answer each generation job whose rows have all finished."""
    for job in jobs:
        if not job.future.done() and all(seq.finish_reason for seq in job.rows):
            job.future.set_result([seq.result() for seq in job.rows])


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

    def token_limit(body: Sampling, requested: int | None, default: int) -> int:
        check_parameters(body)
        requested = requested or default
        if requested > max_tokens:
            raise ApiError(400, f"max_tokens {requested} is above this server's limit of {max_tokens}",
                           "context_length_exceeded", "max_tokens")
        return requested

    def generation_job(kind: str, body: Sampling, adapter: str | None, prompts: list, n_tokens: int) -> Job:
        """One Sequence per prompt and choice (n), prompts still as text or messages (prepare tokenizes)."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "invalid_body", "stop")
        job = Job(kind, adapter, [])
        job.rows = [Sequence(prompt, adapter, max_tokens=n_tokens, temperature=body.temperature or 0.0,
                             top_p=body.top_p or 1.0, seed=None if body.seed is None else body.seed + i,
                             stop=tuple(stops), cancelled=lambda: job.cancelled)
                    for i, prompt in enumerate(p for p in prompts for _ in range(body.n))]
        return job

    async def admit(job: Job) -> None:
        """Check a job's size, then its texts (tokenized in a worker thread); raises ApiError."""
        if not 1 <= len(job.rows) <= max_inputs:
            raise ApiError(400, f"got {len(job.rows)} inputs (counting n choices each); send 1 to {max_inputs} "
                           "per request", "invalid_body")
        await run_in_threadpool(batcher.prepare, job)

    async def run(request: Request, job: Job) -> list:
        """The job's results; a client that disconnects while it waits has its job cancelled."""
        await admit(job)
        future = asyncio.wrap_future(batcher.submit(job))
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits for it now
                    raise ApiError(499, "the client closed the request", "client_closed") from None

    async def stream(request: Request, job: Job, body: Sampling) -> StreamingResponse:
        """Server-sent events as OpenAI streams them: text pieces as they are decoded, then each
        choice's finish_reason, usage when stream_options.include_usage asks for it, then [DONE]."""
        await admit(job)  # a bad prompt still gets its 4xx, before the stream
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for index, seq in enumerate(job.rows):
            seq.on_text = lambda text, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, text))
        chat = job.kind == "chat"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.model}

        def chunk(index: int, text: str | None, finish: str | None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _event({**head, "choices": [choice]})

        async def events_out():
            future = batcher.submit(job)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
            try:
                if chat:
                    for index in range(len(job.rows)):
                        opening = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}
                        yield _event({**head, "choices": [opening]})
                while (item := await events.get()) is not None:
                    yield chunk(*item, None)
                if future.exception() is not None:
                    yield _event(_error_body(future.exception()))
                else:
                    for index, seq in enumerate(job.rows):
                        yield chunk(index, None, seq.finish_reason)
                    if (body.stream_options or {}).get("include_usage"):
                        yield _event({**head, "choices": [], "usage": _usage([s.result() for s in job.rows])})
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # a client gone mid-stream: its rows end at the next step

        return StreamingResponse(events_out(), media_type="text/event-stream")

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
    async def completions(body: CompletionBody, request: Request):
        adapter = adapter_for(body.model, "causal-lm", "/v1/completions")
        n_tokens = token_limit(body, body.max_tokens, default=min(16, max_tokens))  # OpenAI's default
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        job = generation_job("complete", body, adapter, prompts, n_tokens)
        if body.stream:
            return await stream(request, job, body)
        results = await run(request, job)
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                   for i, r in enumerate(results)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        adapter = adapter_for(body.model, "causal-lm", "/v1/chat/completions")
        n_tokens = token_limit(body, body.max_completion_tokens or body.max_tokens, default=max_tokens)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]
        job = generation_job("chat", body, adapter, [messages], n_tokens)
        if body.stream:
            return await stream(request, job, body)
        results = await run(request, job)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "usage": _usage(results),
                "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                             "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]}

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, request: Request):
        adapter = adapter_for(body.model, "classification", "/v1/classify")
        texts = [body.input] if isinstance(body.input, str) else body.input
        results = await run(request, Job("classify", adapter, texts))
        return {"object": "list", "model": body.model, "data": [{"index": i, **r} for i, r in enumerate(results)]}

    @app.post("/v1/answer")
    async def answer(body: AnswerBody, request: Request):
        adapter = adapter_for(body.model, "qa", "/v1/answer")
        questions = [body.question] if isinstance(body.question, str) else body.question
        contexts = [body.context] if isinstance(body.context, str) else body.context
        if len(questions) != len(contexts):
            raise ApiError(400, f"{len(questions)} questions but {len(contexts)} contexts", "invalid_body", "context")
        results = await run(request, Job("answer", adapter, list(zip(questions, contexts))))
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
        if batcher.in_use[name] > 0:
            raise ApiError(409, f"adapter {name!r} is serving requests now; unload it when they are done",
                           "adapter_busy", "name")
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


def check_parameters(body: Sampling) -> None:
    """Refuse, by name, OpenAI parameters this server would otherwise ignore, and unknown ones."""
    extra = body.model_extra or {}
    refused = [k for k, v in extra.items() if k in UNSUPPORTED and v not in DO_NOTHING
               and not (k == "best_of" and v == 1)]
    if refused:
        raise ApiError(400, f"this server does not support {', '.join(refused)}; leave "
                       f"{'it' if len(refused) == 1 else 'them'} out", "unsupported_parameter", refused[0])
    unknown = [k for k in extra if k not in UNSUPPORTED and k not in HARMLESS]
    if unknown:
        raise ApiError(400, f"unknown parameter {', '.join(unknown)}", "unknown_parameter", unknown[0])


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error_body(err: Exception) -> dict:
    """The error a stream ends with: an ApiError as it is, anything else as a logged internal error."""
    if isinstance(err, ApiError):
        return {"error": {"message": err.message, "type": "invalid_request_error", "code": err.code,
                          "param": err.param}}
    request_id = uuid.uuid4().hex[:16]
    log.error("stream %s failed", request_id, exc_info=err)
    return {"error": {"message": f"internal error; request id {request_id}", "type": "server_error",
                      "code": "internal_error", "param": None}}


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
