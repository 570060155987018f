"""peftkit.routes: the server's endpoints as plain functions over a Service, called without HTTP.

The same tiny banks as test_serve (random weights, the real SmolLM2 and MiniLM tokenizers). Where
a route's answer or error can be compared with the HTTP endpoint's, it is: the app over the same
bank must say the same thing.
"""
import httpx
import pytest
from test_bank import LORA, PREFIX, TOKEN, make_adapter, one_thread, served_llama, tiny  # noqa: F401 (one_thread: autouse fixture)

import peftkit
from peftkit import AdapterBank, routes
from peftkit.openai_api import AnswerBody, ApiError, ChatBody, ClassifyBody, CompletionBody, LoadBody
from peftkit.routes import Service
from peftkit.serve import BackgroundServer, create_app

@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama with two adapters, its Service (admin on) and an HTTP server over the same bank."""
    root = tmp_path_factory.mktemp("routes")
    adapters = root / "adapters"
    bank = served_llama(root, {"alpha": LORA, "beta": "houlsby", "extra": PREFIX}, loaded=["alpha", "beta"])
    limits = dict(adapter_dir=adapters, admin_token=TOKEN, max_tokens=32, max_prompt_tokens=48)
    service = Service.open(bank, **limits)
    with BackgroundServer(create_app(bank, **limits)) as server:
        yield service, server, root
    service.close()


def raises(status: int, call, *args) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args)
    assert caught.value.status == status, caught.value.message
    return caught.value


def http_error(server, path: str, body: dict) -> dict:
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    return {"status": response.status_code, **response.json()["error"]}


def as_http(err: ApiError) -> dict:
    return {"status": err.status, "message": err.message, "type": "invalid_request_error", "code": err.code,
            "param": err.param}


def test_models_lists_the_base_then_the_adapters_as_http_does(lm):
    service, server, _ = lm
    listed = routes.list_models(service)
    assert [m["id"] for m in listed["data"]] == ["tiny-llama", "alpha", "beta"]
    assert [m["peftkit"].get("method") for m in listed["data"]] == [None, "lora", "houlsby"]
    assert all("path" not in m["peftkit"] for m in listed["data"])  # no server paths for clients
    assert all(m.get("parent") == "tiny-llama" for m in listed["data"][1:])
    over_http = httpx.get(server.url + "/v1/models").json()
    assert routes.list_models(server.server.config.app.state.service) == over_http


@pytest.mark.parametrize("path,job,body", [
    ("/v1/completions", routes.completion_job, {"model": "nope", "prompt": "hi"}),
    ("/v1/chat/completions", routes.chat_job, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/classify", routes.classify_job, {"model": "alpha", "input": "hi"}),
    ("/v1/answer", routes.answer_job, {"model": "alpha", "question": "who?", "context": "me"}),
    ("/v1/completions", routes.completion_job, {"model": "alpha", "prompt": "hi", "max_tokens": 1000}),
    ("/v1/completions", routes.completion_job, {"model": "alpha", "prompt": "hi", "logprobs": 2}),
    ("/v1/completions", routes.completion_job, {"model": "alpha", "prompt": "hi", "colour": "blue"}),
    ("/v1/completions", routes.completion_job, {"model": "alpha", "prompt": "hi", "stop": list("abcde")}),
])
def test_a_refused_request_raises_the_error_http_sends(lm, path, job, body):
    service, server, _ = lm
    bodies = {"/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody, "/v1/classify": ClassifyBody,
              "/v1/answer": AnswerBody}
    err = raises(http_error(server, path, body)["status"], job, service, bodies[path].model_validate(body))
    assert as_http(err) == http_error(server, path, body)


def test_an_unknown_model_is_a_404_naming_what_the_server_has(lm):
    service, _, _ = lm
    err = raises(404, routes.completion_job, service, CompletionBody(model="nope", prompt="hi"))
    assert err.message == "unknown model 'nope'; this server has tiny-llama, alpha, beta"
    assert (err.code, err.param) == ("model_not_found", "model")


def test_token_limits_are_refused_and_requests_within_them_run(lm):
    service, _, _ = lm
    err = raises(400, routes.completion_job, service, CompletionBody(model="alpha", prompt="hi", max_tokens=33))
    assert err.message == "max_tokens 33 is above this server's limit of 32" and err.param == "max_tokens"
    long = routes.completion_job(service, CompletionBody(model="alpha", prompt="word " * 100, max_tokens=4))
    err = raises(400, routes.run, service, long)  # the prompt is counted when it is admitted
    assert err.code == "context_length_exceeded" and "takes at most 48 prompt tokens" in err.message
    many = routes.completion_job(service, CompletionBody(model="alpha", prompt=["hi"] * 40, n=2, temperature=1))
    assert "got 80 inputs" in raises(400, routes.admit, service, many).message

    bank = service.bank
    got = routes.completion(service, CompletionBody(model="alpha", prompt="The weather", max_tokens=32))
    [want] = bank.complete([bank.prompt_ids("The weather", "alpha", template=False)], ["alpha"], [32])
    assert got["choices"][0]["text"] == want["text"] and got["usage"]["completion_tokens"] == want["completion_tokens"]
    default = routes.completion_job(service, CompletionBody(model="tiny-llama", prompt="The weather"))
    assert [seq.max_tokens for seq in default.rows] == [16]  # OpenAI's default for completions
    chat = routes.chat_job(service, ChatBody(model="alpha", messages=[{"role": "user", "content": "hi"}], n=2))
    assert [seq.max_tokens for seq in chat.rows] == [32, 32]  # the server's limit for chat


def test_chat_completion_answers_what_the_bank_generates(lm):
    service, server, _ = lm
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    got = routes.chat_completion(service, ChatBody(model="beta", messages=messages, max_completion_tokens=6))
    as_given = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    [want] = service.bank.complete([service.bank.chat_ids(as_given)], ["beta"], [6])
    assert got["choices"][0]["message"] == {"role": "assistant", "content": want["text"]}
    over_http = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "beta", "messages": messages, "max_completion_tokens": 6}).json()
    assert over_http["choices"] == got["choices"] and over_http["usage"] == got["usage"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert raises(400, routes.chat_job, service, ChatBody(model="beta", messages=image)).param == "messages"


def test_admin_token_is_checked_and_off_without_one(lm):
    service, _, root = lm
    routes.check_admin(service, f"Bearer {TOKEN}")
    routes.check_admin(service, f"bearer  {TOKEN}")  # any case, spaces around the token
    for header in ("", TOKEN, "Bearer wrong", f"Basic {TOKEN}"):
        assert raises(401, routes.check_admin, service, header).code == "unauthorized"
    off = Service(service.bank, service.batcher, adapter_dir=root / "adapters")
    assert raises(403, routes.check_admin, off, f"Bearer {TOKEN}").code == "admin_disabled"
    no_dir = Service(service.bank, service.batcher, admin_token=TOKEN)
    assert raises(403, routes.load_adapter, no_dir, LoadBody(name="x", path="extra")).code == "no_adapter_dir"


def test_admin_loads_only_inside_the_adapter_dir_then_unloads(lm):
    service, _, root = lm
    for outside in ("../outside", str(root / "outside"), "extra/../../outside"):
        err = raises(403, routes.load_adapter, service, LoadBody(name="x", path=outside))
        assert "outside the adapter directory" in err.message and err.code == "path_not_allowed"
    err = raises(400, routes.load_adapter, service, LoadBody(name="foreign", path="foreign"))
    assert "trained on" in err.message and err.code == "adapter_refused"
    assert raises(409, routes.load_adapter, service, LoadBody(name="alpha", path="extra")).code == "name_taken"
    assert "x" not in service.bank and "foreign" not in service.bank

    loaded = routes.load_adapter(service, LoadBody(name="extra", path="extra"))["loaded"]
    assert loaded["name"] == "extra" and loaded["method"] == "prefix" and "path" not in loaded
    assert [m["id"] for m in routes.list_models(service)["data"]] == ["tiny-llama", "alpha", "beta", "extra"]
    got = routes.completion(service, CompletionBody(model="extra", prompt="The weather", max_tokens=5))
    [want] = service.bank.complete([service.bank.prompt_ids("The weather", "extra", template=False)], ["extra"], [5])
    assert got["choices"][0]["text"] == want["text"]

    with service.batcher.counting:
        service.batcher.in_use["extra"] += 1  # a batch using it is under way
    try:
        assert raises(409, routes.unload_adapter, service, "extra").code == "adapter_busy"
    finally:
        with service.batcher.counting:
            service.batcher.in_use["extra"] -= 1
    assert routes.unload_adapter(service, "extra") == {"unloaded": "extra"}
    assert "extra" not in service.bank
    assert raises(404, routes.unload_adapter, service, "extra").code == "model_not_found"
    raises(404, routes.completion_job, service, CompletionBody(model="extra", prompt="hi"))


def test_classify_returns_what_the_http_endpoint_returns(tmp_path):
    tokenizer = peftkit.load_tokenizer("minilm-l6")
    labels = {"sentiment": ["negative", "positive"], "topic": ["business", "sport", "tech", "politics", "film"]}
    bank = AdapterBank(tiny("bert", "cls", vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)
    for i, (name, names) in enumerate(labels.items()):
        model = tiny("bert", "cls", len(names), vocab_size=tokenizer.vocab_size, id2label=dict(enumerate(names)))
        bank.load(name, make_adapter(model, LORA if i == 0 else "houlsby", tmp_path / name, seed=i))
    texts = ["a triumph", "shares fell sharply today", "the match ended in a draw"]
    service = Service.open(bank)
    try:
        with BackgroundServer(create_app(bank)) as server:
            for name in labels:
                got = routes.classify(service, ClassifyBody(model=name, input=texts))
                assert [g["label"] for g in got["data"]] == [r["label"] for r in bank.classify(texts, adapter=name)]
                assert httpx.post(server.url + "/v1/classify", json={"model": name, "input": texts},
                                  timeout=60).json() == got
            body = {"model": "BertForSequenceClassification", "input": "hi"}
            err = raises(400, routes.classify_job, service, ClassifyBody(**body))
            assert "needs an adapter" in err.message and as_http(err) == http_error(server, "/v1/classify", body)
            assert raises(400, routes.run, service, routes.classify_job(service, ClassifyBody(
                model="topic", input=[]))).message.startswith("got 0 inputs")
    finally:
        service.close()


def test_answer_returns_what_the_http_endpoint_returns(tmp_path):
    tokenizer = peftkit.load_tokenizer("minilm-l6")
    bank = AdapterBank(tiny("bert", "qa", vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)
    bank.load("squad", make_adapter(tiny("bert", "qa", vocab_size=tokenizer.vocab_size), LORA, tmp_path / "squad"))
    questions, contexts = ["who won?", "where was it?"], ["Arsenal won at Wembley.", "It was in a hall in Paris."]
    service = Service.open(bank, max_input_tokens=200)
    try:
        with BackgroundServer(create_app(bank, max_input_tokens=200)) as server:
            body = {"model": "squad", "question": questions, "context": contexts}
            got = routes.answer(service, AnswerBody(**body))
            assert [g["answer"] for g in got["data"]] == \
                [r["answer"] for r in bank.answer(questions, contexts, adapter="squad")]
            assert httpx.post(server.url + "/v1/answer", json=body, timeout=60).json() == got

            uneven = {"model": "squad", "question": ["a", "b"], "context": "c"}
            err = raises(400, routes.answer_job, service, AnswerBody(**uneven))
            assert err.message == "2 questions but 1 contexts" and as_http(err) == http_error(server, "/v1/answer",
                                                                                             uneven)
            long = AnswerBody(model="squad", question=["who?"] * 3, context=["word " * 100] * 3)
            err = raises(400, routes.run, service, routes.answer_job(service, long))
            assert err.code == "too_many_tokens" and "at most 200 per request" in err.message
    finally:
        service.close()
