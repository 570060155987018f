"""The OpenAI-shaped side of `peftkit serve`: request bodies, response bodies, stream events, errors.

Only shapes live here (pydantic models and dicts); what a request does is in routes.py. Bad
requests raise ApiError, which the app turns into {"error": {"message", "type", "code", "param"}}.
"""
import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI parameters this server does not implement: a request that sets one (to anything but its
# do-nothing value) is refused, naming it, rather than answered as if it had not asked
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty",
               "repetition_penalty", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
               "response_format", "best_of", "echo", "suffix", "modalities", "audio", "prediction",
               "reasoning_effort", "web_search_options", "min_p", "top_k")
DO_NOTHING = (None, False, 0, [], {}, "none", {"type": "text"})
HARMLESS = ("user", "metadata", "store", "service_tier")  # bookkeeping for OpenAI's side; nothing to do here


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

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


# ---------------------------------------------------------------------------- checking requests

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


def message_text(content) -> str:
    """A chat message's text: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    parts = [p.get("text") for p in content if p.get("type") == "text"]
    if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
        raise ApiError(400, "message content parts must all be {'type': 'text', 'text': ...}", "invalid_body",
                       "messages")
    return "".join(parts)


# ---------------------------------------------------------------------------- response bodies

def completion_response(body: CompletionBody, results: list[dict]) -> dict:
    choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
               for i, r in enumerate(results)]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "choices": choices, "usage": usage(results)}


def chat_response(body: ChatBody, results: list[dict]) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "usage": usage(results),
            "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                         "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]}


def listing(body: Body, results: list[dict]) -> dict:
    """/v1/classify's and /v1/answer's body: one entry per input, in order."""
    return {"object": "list", "model": body.model, "data": [{"index": i, **r} for i, r in enumerate(results)]}


def usage(results: list[dict]) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_body(message: str, code: str | None, param: str | None = None, kind: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or "invalid_request_error", "code": code, "param": param}}


# ---------------------------------------------------------------------------- stream events

class Chunks:
    """The server-sent events of one streamed completion or chat completion, as OpenAI sends them:
    (chat) each choice's role first, text pieces, each choice's finish_reason, usage, [DONE]."""

    DONE = "data: [DONE]\n\n"

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}

    def opening(self, index: int) -> str:
        return self.choice({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def piece(self, index: int, text: str | None, finish: str | None = None) -> str:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return self.choice({"index": index, "delta": delta, "logprobs": None, "finish_reason": finish})
        return self.choice({"index": index, "text": text or "", "logprobs": None, "finish_reason": finish})

    def choice(self, choice: dict) -> str:
        return event({**self.head, "choices": [choice]})

    def usage(self, results: list[dict]) -> str:
        return event({**self.head, "choices": [], "usage": usage(results)})


def event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
