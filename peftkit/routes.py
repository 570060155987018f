"""What each endpoint of `peftkit serve` does, as plain functions over a Service (the bank, its
batcher and the server's limits), with no HTTP in sight: each can be called and tested directly.

    service = Service.open(bank, max_tokens=32)
    routes.classify(service, ClassifyBody(model="topic", input="shares fell"))   # /v1/classify's body
    service.close()

A request becomes a checked Job (its adapter, its limits: ApiError otherwise), `run` admits it
(prompts tokenized, sizes checked), queues it and waits for its rows, and openai_api shapes the
answer. serve.py wires these to routes and adds what only HTTP has: streaming, and cancelling the
job of a client that went away; so it calls the *_job functions, `admit` and the shapes itself.
"""
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path

from .batcher import Batcher, Job
from .decoding import Sequence
from .errors import PeftkitError
from .openai_api import (AnswerBody, ApiError, ChatBody, ClassifyBody, CompletionBody, LoadBody, Sampling,
                         chat_response, check_parameters, completion_response, listing, message_text)


@dataclass
class Service:
    """One served bank: its batcher, where runtime loading may read, the admin token and the limits."""
    bank: object  # an AdapterBank
    batcher: Batcher
    adapter_dir: Path | None = None  # runtime loading reads folders under it only; None: no runtime loading
    admin_token: str | None = None  # None or empty: the admin endpoints are off
    max_tokens: int = 256  # tokens a request may generate per choice
    max_inputs: int = 64  # rows a request may hold (prompts times n choices, texts, questions)
    created: int = field(default_factory=lambda: int(time.time()))
    base_id: str = field(init=False)  # the name that selects the base model (no adapter)

    def __post_init__(self):
        self.adapter_dir = Path(self.adapter_dir).resolve() if self.adapter_dir else None
        self.base_id = Path(self.bank.base_name).name

    @classmethod
    def open(cls, bank, *, adapter_dir=None, admin_token: str | None = None, max_batch: int = 8,
             max_tokens: int = 256, max_prompt_tokens: int = 1024, max_inputs: int = 64,
             batch_wait_ms: float = 5.0, max_input_tokens: int = 8192) -> "Service":
        """The service with its batcher started (`close` stops it)."""
        batcher = Batcher(bank, max_batch, batch_wait_ms / 1000, max_prompt_tokens, max_input_tokens)
        return cls(bank, batcher, adapter_dir, admin_token, max_tokens, max_inputs)

    def close(self) -> None:
        self.batcher.close()


# ---------------------------------------------------------------------------- the endpoints, whole

def list_models(service: Service) -> dict:
    """/v1/models: the base model, then the loaded adapters."""
    def entry(name: str, **more) -> dict:
        return {"id": name, "object": "model", "created": service.created, "owned_by": "peftkit", **more}
    data = [entry(service.base_id, peftkit={"adapter": False, "task": service.bank.task})]
    for info in service.bank.adapters():
        described = {k: v for k, v in info.items() if k not in ("name", "path")}  # no server paths
        data.append(entry(info["name"], parent=service.base_id, peftkit={"adapter": True, **described}))
    return {"object": "list", "data": data}


def completion(service: Service, body: CompletionBody) -> dict:
    """/v1/completions' body, blocking (`stream` is HTTP's: serve.py streams)."""
    return completion_response(body, run(service, completion_job(service, body)))


def chat_completion(service: Service, body: ChatBody) -> dict:
    """/v1/chat/completions' body, blocking (`stream` is HTTP's: serve.py streams)."""
    return chat_response(body, run(service, chat_job(service, body)))


def classify(service: Service, body: ClassifyBody) -> dict:
    return listing(body, run(service, classify_job(service, body)))


def answer(service: Service, body: AnswerBody) -> dict:
    return listing(body, run(service, answer_job(service, body)))


def check_admin(service: Service, authorization: str) -> None:
    """Whether an Authorization header value opens the admin endpoints; raises ApiError if not."""
    if not service.admin_token:
        raise ApiError(403, "the admin endpoints are off; start the server with an admin token "
                       "(--admin-token or PEFTKIT_ADMIN_TOKEN)", "admin_disabled")
    scheme, _, given = authorization.partition(" ")
    # compare_digest: how long the comparison takes says nothing about how much of the token matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.admin_token.encode()):
        raise ApiError(401, "missing or wrong admin token; send Authorization: Bearer TOKEN", "unauthorized")


def load_adapter(service: Service, body: LoadBody) -> dict:
    """Load an adapter folder under the adapter directory (blocking: it reads the files)."""
    root = service.adapter_dir
    if root is None:
        raise ApiError(403, "loading adapters at run time needs an adapter directory (--adapter-dir)",
                       "no_adapter_dir", "path")
    path = (root / body.path).resolve()  # resolved first: "a/../../b" and symlinks cannot step outside
    if not path.is_relative_to(root):
        raise ApiError(403, f"adapter path {body.path!r} is outside the adapter directory", "path_not_allowed",
                       "path")
    if body.name in service.bank:
        raise ApiError(409, f"an adapter named {body.name!r} is already loaded; unload it first", "name_taken",
                       "name")
    try:
        info = service.bank.load(body.name, path)
    except PeftkitError as err:
        raise ApiError(400, str(err), "adapter_refused", "path") from None
    return {"loaded": {k: v for k, v in info.items() if k != "path"}}


def unload_adapter(service: Service, name: str) -> dict:
    if name not in service.bank:
        raise ApiError(404, f"no adapter named {name!r} is loaded", "model_not_found", "name")
    if service.batcher.in_use[name] > 0:
        raise ApiError(409, f"adapter {name!r} is serving requests now; unload it when they are done",
                       "adapter_busy", "name")
    service.bank.unload(name)
    return {"unloaded": name}


# ---------------------------------------------------------------------------- requests into jobs

def completion_job(service: Service, body: CompletionBody) -> Job:
    adapter = adapter_for(service, body.model, "causal-lm", "/v1/completions")
    n_tokens = token_limit(service, body, body.max_tokens, default=min(16, service.max_tokens))  # OpenAI's default
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return generation_job("complete", body, adapter, prompts, n_tokens)


def chat_job(service: Service, body: ChatBody) -> Job:
    adapter = adapter_for(service, body.model, "causal-lm", "/v1/chat/completions")
    n_tokens = token_limit(service, body, body.max_completion_tokens or body.max_tokens, default=service.max_tokens)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)}
                for m in body.messages]
    return generation_job("chat", body, adapter, [messages], n_tokens)


def classify_job(service: Service, body: ClassifyBody) -> Job:
    adapter = adapter_for(service, body.model, "classification", "/v1/classify")
    return Job("classify", adapter, [body.input] if isinstance(body.input, str) else body.input)


def answer_job(service: Service, body: AnswerBody) -> Job:
    adapter = adapter_for(service, body.model, "qa", "/v1/answer")
    questions = [body.question] if isinstance(body.question, str) else body.question
    contexts = [body.context] if isinstance(body.context, str) else body.context
    if len(questions) != len(contexts):
        raise ApiError(400, f"{len(questions)} questions but {len(contexts)} contexts", "invalid_body", "context")
    return Job("answer", adapter, list(zip(questions, contexts)))


def adapter_for(service: Service, model: str, task: str, endpoint: str) -> str | None:
    """The adapter a request's `model` names (None: the base model), if it fits the endpoint's task."""
    bank, base_id = service.bank, service.base_id
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
        names = [base_id] + [a["name"] for a in bank.adapters()]
        raise ApiError(404, f"unknown model {model!r}; this server has {', '.join(names)}", "model_not_found",
                       "model")
    if entry.task != task:
        raise ApiError(400, f"adapter {model!r} is a {entry.task} adapter; {endpoint} needs a {task} one",
                       "wrong_task", "model")
    return model


def token_limit(service: Service, body: Sampling, requested: int | None, default: int) -> int:
    """The tokens to generate per choice (checking the body's other parameters first)."""
    check_parameters(body)
    requested = requested or default
    if requested > service.max_tokens:
        raise ApiError(400, f"max_tokens {requested} is above this server's limit of {service.max_tokens}",
                       "context_length_exceeded", "max_tokens")
    return requested


def generation_job(kind: str, body: Sampling, adapter: str | None, prompts: list, n_tokens: int) -> Job:
    """One Sequence per prompt and choice (n), prompts still as text or messages (admit tokenizes)."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", "invalid_body", "stop")
    job = Job(kind, adapter, [])
    job.rows = [Sequence(prompt, adapter, max_tokens=n_tokens, temperature=body.temperature or 0.0,
                         top_p=body.top_p or 1.0, seed=None if body.seed is None else body.seed + i,
                         stop=tuple(stops), cancelled=lambda: job.cancelled)
                for i, prompt in enumerate(p for p in prompts for _ in range(body.n))]
    return job


# ---------------------------------------------------------------------------- running jobs

def admit(service: Service, job: Job) -> None:
    """Check a job's size, then its texts (blocking: it tokenizes, in a turn on the model)."""
    if not 1 <= len(job.rows) <= service.max_inputs:
        raise ApiError(400, f"got {len(job.rows)} inputs (counting n choices each); send 1 to "
                       f"{service.max_inputs} per request", "invalid_body")
    service.batcher.prepare(job)


def run(service: Service, job: Job) -> list:
    """The job's results, blocking until its batch is done (a failed row raises its error)."""
    admit(service, job)
    return service.batcher.submit(job).result()
