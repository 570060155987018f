"""`peftkit serve`, driven over real HTTP on 127.0.0.1 (an ephemeral port).

Tiny random models with the real embedded tokenizers (SmolLM2's for the causal LM, MiniLM's for
classification): concurrent clients naming different adapters must each get what the bank gives
for their adapter alone; every class of bad request gets its 4xx and the server goes on serving.
"""
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_bank import LORA, PREFIX, TOKEN, make_adapter, one_thread, served_llama, tiny  # noqa: F401 (one_thread: autouse fixture)

import peftkit
from peftkit import AdapterBank
from peftkit import batcher
from peftkit.serve import BackgroundServer, create_app

@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, three adapters loaded, served with admin on."""
    root = tmp_path_factory.mktemp("serve")
    adapters = root / "adapters"
    bank = served_llama(root, {"alpha": LORA, "beta": "houlsby", "gamma": PREFIX, "extra": "pfeiffer"},
                        loaded=["alpha", "beta", "gamma"])
    app = create_app(bank, adapter_dir=adapters, admin_token=TOKEN, max_batch=8, max_tokens=32,
                     max_prompt_tokens=48, batch_wait_ms=300)
    with BackgroundServer(app) as server:
        yield server, bank, root


def raw(bank, prompts, adapter, max_tokens):
    """What the bank generates for these prompts, as the server returns it (not stripped)."""
    ids = [bank.prompt_ids(p, adapter, template=False) for p in prompts]
    return [o["text"] for o in bank.complete(ids, [adapter] * len(ids), [max_tokens] * len(ids))]


def post(server, path, body, token=None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=60, **kwargs)


def test_models_lists_the_base_and_the_adapters(lm):
    server, bank, _ = lm
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-llama", "alpha", "beta", "gamma"]
    assert [m["peftkit"].get("method") for m in data] == [None, "lora", "houlsby", "prefix"]
    assert all(m["peftkit"]["file_bytes"] > 0 for m in data[1:])


def test_concurrent_clients_each_get_their_own_adapters_answer(lm):
    server, bank, _ = lm
    requests = [(model, prompt) for prompt in ("The weather today is", "Once upon a time, in a land far away,")
                for model in ("alpha", "beta", "gamma", "tiny-llama")]
    expected = {(m, p): raw(bank, [p], None if m == "tiny-llama" else m, 8)[0] for m, p in requests}
    for prompt in ("The weather today is",):  # otherwise a mix-up could go unnoticed
        assert len({expected[(m, prompt)] for m in ("alpha", "beta", "gamma", "tiny-llama")}) == 4
    before = len(server.server.config.app.state.batcher.history)
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: post(server, "/v1/completions",
                                               {"model": r[0], "prompt": r[1], "max_tokens": 8}), requests))
    for (model, prompt), response in zip(requests, answers):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == model and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == expected[(model, prompt)], (model, prompt)
        assert body["usage"]["completion_tokens"] >= 1
    batches = list(server.server.config.app.state.batcher.history)[before:]
    assert max(len(adapters) for _, _, adapters in batches) > 1  # different adapters shared a batch
    assert sum(rows for _, rows, _ in batches) == len(requests)


def test_chat_completions_and_prompt_lists(lm):
    server, bank, _ = lm
    messages = [{"role": "user", "content": "Hello there"}]
    response = post(server, "/v1/chat/completions", {"model": "beta", "messages": messages, "max_tokens": 6})
    assert response.status_code == 200, response.text
    reply = response.json()["choices"][0]["message"]
    [want] = bank.complete([bank.chat_ids(messages)], ["beta"], [6])
    assert reply == {"role": "assistant", "content": want["text"]}
    assert bank.chat([messages], adapter="beta", max_new_tokens=6) == [want["text"].strip()]
    response = post(server, "/v1/completions", {"model": "gamma", "prompt": ["One", "Two three"], "max_tokens": 4})
    assert [c["text"] for c in response.json()["choices"]] == raw(bank, ["One", "Two three"], "gamma", 4)


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "unknown model 'nope'"),
    ("/v1/classify", {"model": "alpha", "input": "hi"}, 400, "needs a classification model"),
    ("/v1/answer", {"model": "alpha", "question": "who?", "context": "me"}, 400, "needs a qa model"),
    ("/v1/completions", "this is not json", 400, "malformed request body"),
    ("/v1/completions", {"model": "alpha"}, 400, "prompt: Field required"),
    ("/v1/completions", {"model": "alpha", "prompt": 12}, 400, "malformed request body: prompt"),
    ("/v1/chat/completions", {"model": "alpha", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"content": "hi"}]}, 400, "role: Field required"),
    ("/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 1000}, 400, "above this server's limit"),
    ("/v1/completions", {"model": "alpha", "prompt": "word " * 100}, 400, "tokens"),
    ("/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "word " * 100}]}, 400,
     "prompt tokens"),
    ("/v1/completions", {"model": "alpha", "prompt": ["hi"] * 100}, 400, "got 100 inputs"),
    ("/v1/completions", {"model": "alpha", "prompt": "hi", "logprobs": 2}, 400, "does not support logprobs"),
    ("/v1/completions", {"model": "alpha", "prompt": "hi", "frequency_penalty": 0.5, "echo": True}, 400,
     "does not support frequency_penalty, echo"),
    ("/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/completions", {"model": "alpha", "prompt": "hi", "colour": "blue"}, 400, "unknown parameter colour"),
    ("/v1/chat/completions", {"model": "beta", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "beta", "messages": [{"role": "tool", "content": "hi"}]}, 400, "role"),
    ("/v1/completions", {"model": "alpha", "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": "alpha", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "alpha", "prompt": ["hi"] * 40, "n": 2, "temperature": 1}, 400, "got 80 inputs"),
])
def test_bad_requests_get_4xx_and_the_server_goes_on(lm, path, body, status, message):
    server, _, _ = lm
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert response.status_code != 500
    assert post(server, "/v1/completions", {"model": "alpha", "prompt": "still there?", "max_tokens": 2}) \
        .status_code == 200


def test_admin_loads_and_unloads_inside_the_adapter_dir_only(lm):
    server, bank, root = lm
    admin = "/v1/admin/adapters"
    assert post(server, admin, {"name": "x", "path": "extra"}).status_code == 401
    assert post(server, admin, {"name": "x", "path": "extra"}, token="wrong").status_code == 401
    for outside in ("../outside", str(root / "outside"), "extra/../../outside"):
        response = post(server, admin, {"name": "x", "path": outside}, token=TOKEN)
        assert response.status_code == 403 and "outside the adapter directory" in response.json()["error"]["message"]
    response = post(server, admin, {"name": "foreign", "path": "foreign"}, token=TOKEN)
    assert response.status_code == 400 and "trained on" in response.json()["error"]["message"]
    assert post(server, admin, {"name": "x", "path": "missing"}, token=TOKEN).status_code == 400
    assert post(server, admin, {"name": "alpha", "path": "extra"}, token=TOKEN).status_code == 409

    response = post(server, admin, {"name": "extra", "path": "extra"}, token=TOKEN)
    assert response.status_code == 201, response.text
    assert "extra" in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    response = post(server, "/v1/completions", {"model": "extra", "prompt": "The weather", "max_tokens": 5})
    assert response.json()["choices"][0]["text"] == raw(bank, ["The weather"], "extra", 5)[0]
    assert httpx.delete(server.url + admin + "/extra").status_code == 401
    response = httpx.delete(server.url + admin + "/extra", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert post(server, "/v1/completions", {"model": "extra", "prompt": "hi"}).status_code == 404
    assert httpx.delete(server.url + admin + "/extra", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert post(server, "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_an_oversized_body_gets_413_before_it_is_read_whole(lm):
    _, bank, _ = lm
    with BackgroundServer(create_app(bank, max_body_bytes=1000)) as small:
        big = json.dumps({"model": "alpha", "prompt": "word " * 1000})
        response = post(small, "/v1/completions", big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(100):
                yield b" " * 100
        response = httpx.post(small.url + "/v1/completions", content=chunks(), timeout=60,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "limit of 1000 bytes" in response.json()["error"]["message"]
        assert post(small, "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_the_admin_token_is_checked_before_the_body_and_bearer_is_any_case(lm):
    server, _, _ = lm
    response = post(server, "/v1/admin/adapters", "not json at all")
    assert response.status_code == 401 and "admin token" in response.json()["error"]["message"]
    response = httpx.delete(server.url + "/v1/admin/adapters/nothing", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 404  # past the token check: no such adapter


def test_a_server_error_names_a_request_id_and_nothing_internal(lm, monkeypatch, caplog):
    server, bank, _ = lm

    def broken(*args, **kwargs):
        raise RuntimeError("tensor of shape (3, 7) at /secret/path")
    monkeypatch.setattr(bank, "decode", broken)
    response = post(server, "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "secret" not in message and "shape" not in message
    assert response.headers["x-request-id"] in message
    assert response.headers["x-request-id"] in caplog.text and "/secret/path" in caplog.text


def test_a_row_that_breaks_fails_only_its_own_request(lm, monkeypatch):
    server, bank, _ = lm
    decode, poison = bank.decode, bank.prompt_ids("poison", "alpha", template=False)

    def fragile(seqs, *args, **kwargs):
        if any(seq.prompt == poison for seq in seqs):
            raise RuntimeError("this row cannot be run")
        return decode(seqs, *args, **kwargs)
    monkeypatch.setattr(bank, "decode", fragile)
    with ThreadPoolExecutor(2) as pool:  # within the 300 ms batch wait: one batch
        bad, good = pool.map(lambda prompt: post(server, "/v1/completions", {
            "model": "alpha", "prompt": prompt, "max_tokens": 2}), ["poison", "The weather"])
    assert bad.status_code == 500 and good.status_code == 200, (bad.text, good.text)
    assert good.json()["choices"][0]["text"] == raw(bank, ["The weather"], "alpha", 2)[0]


def test_admin_is_off_without_a_token(lm):
    _, bank, root = lm
    with BackgroundServer(create_app(bank, adapter_dir=root / "adapters")) as server:
        response = post(server, "/v1/admin/adapters", {"name": "extra", "path": "extra"}, token="anything")
        assert response.status_code == 403 and "admin endpoints are off" in response.json()["error"]["message"]
        assert httpx.delete(server.url + "/v1/admin/adapters/alpha").status_code == 403
    assert "alpha" in bank


def test_classification_server(tmp_path):
    tokenizer = peftkit.load_tokenizer("minilm-l6")
    labels = {"sentiment": ["negative", "positive"], "topic": ["business", "sport", "tech", "politics", "film"]}
    bank = AdapterBank(tiny("bert", "cls", vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)
    for i, (name, names) in enumerate(labels.items()):
        model = tiny("bert", "cls", len(names), vocab_size=tokenizer.vocab_size, id2label=dict(enumerate(names)))
        bank.load(name, make_adapter(model, LORA if i == 0 else "houlsby", tmp_path / name, seed=i))
    texts = ["a triumph", "shares fell sharply today", "the match ended in a draw", "dull", "the vote passed"]
    with BackgroundServer(create_app(bank, batch_wait_ms=200)) as server:
        jobs = [(name, texts[i:i + 2]) for i in range(4) for name in labels]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: post(server, "/v1/classify", {"model": j[0], "input": j[1]}), jobs))
        for (name, batch), response in zip(jobs, answers):
            assert response.status_code == 200, response.text
            got = response.json()["data"]
            assert [g["label"] for g in got] == [r["label"] for r in bank.classify(batch, adapter=name)]
            assert all(g["label"] in labels[name] for g in got)
        response = post(server, "/v1/completions", {"model": "topic", "prompt": "hi"})
        assert response.status_code == 400 and "needs a causal-lm model" in response.json()["error"]["message"]
        response = post(server, "/v1/classify", {"model": "BertForSequenceClassification", "input": "hi"})
        assert response.status_code == 400 and "needs an adapter" in response.json()["error"]["message"]
        assert post(server, "/v1/classify", {"model": "topic", "input": []}).status_code == 400


def test_qa_server(tmp_path, monkeypatch):
    tokenizer = peftkit.load_tokenizer("minilm-l6")
    bank = AdapterBank(tiny("bert", "qa", vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)
    for i, (name, spec) in enumerate({"squad": LORA, "squad2": PREFIX}.items()):
        bank.load(name, make_adapter(tiny("bert", "qa", vocab_size=tokenizer.vocab_size), spec, tmp_path / name,
                                     seed=i))
    questions, contexts = ["who won?", "where was it?"], ["Arsenal won at Wembley.", "It was in a hall in Paris."]
    with BackgroundServer(create_app(bank, batch_wait_ms=100, max_input_tokens=200)) as server:
        jobs = [(name, i) for name in ("squad", "squad2") for i in range(2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: post(server, "/v1/answer", {
                "model": j[0], "question": questions[j[1]], "context": contexts[j[1]]}), jobs))
        for (name, i), response in zip(jobs, answers):
            assert response.status_code == 200, response.text
            want = bank.answer([questions[i]], [contexts[i]], adapter=name)[0]
            assert response.json()["data"][0]["answer"] == want["answer"]
        response = post(server, "/v1/answer", {"model": "squad", "question": ["a", "b"], "context": "c"})
        assert response.status_code == 400 and "2 questions but 1 contexts" in response.json()["error"]["message"]
        long = post(server, "/v1/answer", {"model": "squad", "question": ["who?"] * 3, "context": ["word " * 100] * 3})
        assert long.status_code == 400
        assert "at most 200 per request" in long.json()["error"]["message"], long.text
        assert post(server, "/v1/answer", {"model": "squad", "question": questions[0], "context": contexts[0]}) \
            .status_code == 200

        # a request over CHUNK_TOKENS of text is answered a chunk of rows per turn on the model
        calls, answer = [], bank.answer
        monkeypatch.setattr(batcher, "CHUNK_TOKENS", 25)
        monkeypatch.setattr(bank, "answer", lambda q, c, a: calls.append(len(q)) or answer(q, c, a))
        many_q, many_c = questions * 4, [c + " The crowd was large." for c in contexts] * 4
        response = post(server, "/v1/answer", {"model": "squad", "question": many_q, "context": many_c})
        assert response.status_code == 200, response.text
        assert [d["answer"] for d in response.json()["data"]] == \
            [r["answer"] for r in answer(many_q, many_c, "squad")]
        assert len(calls) > 1 and sum(calls) == len(many_q)


def test_cli_serve(lm):
    _, _, root = lm
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", "--base", str(root / "tiny-llama"),
                                "--adapter", f"alpha={root / 'adapters' / 'alpha'}", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "serving on http://127.0.0.1:" in line, process.stderr.read() if process.poll() is not None else line
        url = line.split()[-1]
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["tiny-llama", "alpha"]
        response = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] is not None
        response = httpx.post(url + "/v1/admin/adapters", json={"name": "x", "path": "y"})
        assert response.status_code == 403  # no token configured
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---------------------------------------------------------------------------- the official OpenAI client

def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


PROMPTS = ["The weather today is", "Once upon a time", "My favourite food", "In the year 2000", "Hello, my name is",
           "The capital of France is", "She opened the door and", "Numbers: 1, 2, 3,"]


def test_openai_client_completions_keep_leading_whitespace_and_stream_the_same_text(lm):
    server, bank, _ = lm
    api = client(server)
    expected = raw(bank, PROMPTS, "alpha", 8)
    spaced = [p for p, text in zip(PROMPTS, expected) if text[:1].isspace()]
    assert spaced, expected  # a continuation that starts with a space, to check it is kept
    for prompt in spaced[:2] + PROMPTS[:2]:
        want = expected[PROMPTS.index(prompt)]
        response = api.completions.create(model="alpha", prompt=prompt, max_tokens=8)
        assert response.choices[0].text == want
        pieces = [c.choices[0].text for c in api.completions.create(model="alpha", prompt=prompt, max_tokens=8,
                                                                     stream=True) if c.choices]
        assert "".join(pieces) == want and len([p for p in pieces if p]) > 1, pieces


def test_openai_client_chat_streams_with_the_role_first_and_usage_last(lm):
    server, bank, _ = lm
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    [want] = bank.complete([bank.chat_ids(messages)], ["beta"], [10])
    reply = client(server).chat.completions.create(model="beta", messages=messages, max_tokens=10)
    assert reply.choices[0].message.content == want["text"] and reply.choices[0].finish_reason == want["finish_reason"]
    chunks = list(client(server).chat.completions.create(model="beta", messages=messages, max_tokens=10, stream=True,
                                                         stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want["completion_tokens"]
    assert chunks[-1].usage.prompt_tokens == want["prompt_tokens"]


def test_openai_client_sampling_is_seeded_and_n_gives_distinct_choices(lm):
    server, _, _ = lm
    api = client(server)

    def sampled(**kwargs):
        response = api.completions.create(model="alpha", prompt="Once upon a time", max_tokens=12, **kwargs)
        return [c.text for c in response.choices]
    first = sampled(temperature=1.0, seed=7)
    assert sampled(temperature=1.0, seed=7) == first
    assert sampled(temperature=1.0, seed=8) != first
    assert sampled(temperature=1.0, seed=7, top_p=0.9) != sampled(temperature=1.0, seed=7, top_p=1e-6)
    assert sampled(temperature=1.0, seed=7, top_p=1e-6) == sampled(temperature=0)  # top_p -> the likeliest token
    several = sampled(temperature=1.0, seed=7, n=4)
    assert several[0] == first[0] and len(set(several)) == 4
    streamed = api.completions.create(model="alpha", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                      seed=7, n=4, stream=True)
    texts = ["", "", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == several


def test_openai_client_stop_cuts_the_text_and_counts_only_returned_tokens(lm):
    server, bank, _ = lm
    ids = {p: bank.prompt_ids(p, "alpha", template=False) for p in PROMPTS}
    full = {p: bank.complete([ids[p]], ["alpha"], [16])[0] for p in PROMPTS}
    # a prompt whose continuation has, past its middle, a 3-character piece seen there first
    prompt, stop = next((p, f["text"][i:i + 3]) for p, f in full.items() for i in range(len(f["text"]) // 2,
                                                                                       len(f["text"]) - 3)
                        if f["text"][i:i + 3].strip() and f["text"].index(f["text"][i:i + 3]) == i)
    full = full[prompt]
    response = client(server).completions.create(model="alpha", prompt=prompt, max_tokens=16, stop=[stop, "zzzz"])
    text = response.choices[0].text
    assert text == full["text"][:full["text"].index(stop)] and response.choices[0].finish_reason == "stop"
    assert 0 < response.usage.completion_tokens < full["completion_tokens"]
    kept = bank.complete([ids[prompt]], ["alpha"], [response.usage.completion_tokens])[0]["text"]
    fewer = bank.complete([ids[prompt]], ["alpha"], [response.usage.completion_tokens - 1])[0]["text"] \
        if response.usage.completion_tokens > 1 else ""
    assert kept.startswith(text) and not fewer.startswith(text)  # just the tokens that make the text
    streamed = client(server).completions.create(model="alpha", prompt=prompt, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_openai_client_gets_a_400_naming_what_it_cannot_honour(lm):
    import openai
    api = client(server := lm[0])
    for call in (lambda: api.completions.create(model="alpha", prompt="hi", logprobs=2),
                 lambda: api.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                                     tools=[{"type": "function", "function": {"name": "f"}}]),
                 lambda: api.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                                     presence_penalty=1.0),
                 lambda: api.chat.completions.create(model="beta", messages=[{"role": "tool", "content": "hi",
                                                                              "tool_call_id": "1"}])):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.status_code == 400
        assert any(word in str(err.value) for word in ("logprobs", "tools", "presence_penalty", "role")), err.value
    assert post(server, "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_mixed_adapter_batches_stay_correct_with_sampling_and_streaming(lm):
    server, _, _ = lm
    requests = [(model, prompt, seed, stream) for seed, prompt in enumerate(PROMPTS[:3])
                for model in ("alpha", "beta", "gamma", "tiny-llama") for stream in (False, True)]

    def ask(request):
        model, prompt, seed, stream = request
        response = client(server).completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.9,
                                                     seed=seed, stream=stream)
        return "".join(c.choices[0].text for c in response if c.choices) if stream else response.choices[0].text
    alone = {r: ask(r) for r in requests if not r[3]}
    before = len(server.server.config.app.state.batcher.history)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = dict(zip(requests, pool.map(ask, requests)))
    for request, text in together.items():
        assert text == alone[request[:3] + (False,)], request
    batches = list(server.server.config.app.state.batcher.history)[before:]
    assert max(len(adapters) for _, _, adapters in batches) > 1


def slow_steps(monkeypatch, bank, seconds):
    """Every forward of the bank's model takes at least `seconds`: long enough to act mid-generation."""
    forward = bank.model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)
    monkeypatch.setattr(bank.model, "forward", slow)


def watch_decodes(monkeypatch, bank):
    """The Sequences of every decode call, to see how they ended."""
    seen, decode = [], bank.decode

    def spy(seqs, *args, **kwargs):
        seen.extend(seqs)
        return decode(seqs, *args, **kwargs)
    monkeypatch.setattr(bank, "decode", spy)
    return seen


def test_a_client_that_disconnects_releases_its_rows_and_its_batch_mates_go_on(lm, monkeypatch):
    server, bank, _ = lm
    slow_steps(monkeypatch, bank, 0.05)
    seen = watch_decodes(monkeypatch, bank)
    mate = {"model": "beta", "prompt": PROMPTS[1], "max_tokens": 12}
    with ThreadPoolExecutor(3) as pool:  # within the 300 ms batch wait: one batch of three requests
        def leave_stream():
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
                    "model": "alpha", "prompt": PROMPTS[0], "max_tokens": 30, "stream": True}) as response:
                next(response.iter_lines())  # the first piece arrived, then the client goes away
        def give_up():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/completions", timeout=0.8, json={
                    "model": "gamma", "prompt": PROMPTS[2], "max_tokens": 30})
        stays = pool.submit(post, server, "/v1/completions", mate)
        gone = [pool.submit(leave_stream), pool.submit(give_up)]
        for future in gone:
            future.result()
        response = stays.result()
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == raw(bank, [PROMPTS[1]], "beta", 12)[0]
    for _ in range(100):  # the batch ends a step after the last client left
        if all(seq.finish_reason for seq in seen):
            break
        time.sleep(0.05)
    ended = {seq.adapter: seq for seq in seen}
    assert ended["alpha"].finish_reason == ended["gamma"].finish_reason == "cancelled"
    assert len(ended["alpha"].tokens) < 30 and len(ended["gamma"].tokens) < 30
    assert ended["beta"].finish_reason == "length"


def test_a_small_request_does_not_wait_for_a_long_generation(lm, monkeypatch):
    server, bank, _ = lm
    slow_steps(monkeypatch, bank, 0.03)
    finished = {}

    def long():
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
                "model": "alpha", "prompt": PROMPTS[0], "max_tokens": 30, "stream": True}) as response:
            lines = response.iter_lines()
            next(lines)
            started.set()  # generating: the small request comes after the batch began
            for _ in lines:
                pass
        finished["long"] = time.monotonic()
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(long)
        assert started.wait(30)
        response = post(server, "/v1/completions", {"model": "beta", "prompt": PROMPTS[1], "max_tokens": 2})
        finished["small"] = time.monotonic()
        running.result()
    assert response.status_code == 200
    assert finished["small"] < finished["long"]  # served between the long one's steps, not after it
