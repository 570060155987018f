"""Load and fault test of `peftkit serve`, bounded and on loopback only.

    .venv/bin/python benchmarks/serve_load.py [--seconds 60] [--out benchmarks/results/serve-cpu.md]

Two servers in this process, each an AdapterBank behind `create_app`: SmolLM2-135M with 8 adapters
(LoRA, Houlsby, Pfeiffer and prefix, random weights) for completions and chat, and MiniLM-L6 with
8 classification adapters. Then, all at once for --seconds:

* generation clients, half of them streaming, some with seeded sampling, over all 8 adapters;
* classification clients sending 1 to 8 texts to any of the 8 adapters;
* a client streaming 128-token completions, and a slow reader;
* fault clients: streams dropped after the first piece, requests abandoned mid-generation,
  5 MB bodies (must get 413), malformed JSON (400), unsupported parameters (400), and a body
  trickled in 8 bytes at a time (must get its 200 without holding anyone up).

Every answer is compared with the same request sent alone beforehand (cross-talk), and every
status is counted (no 5xx allowed). Reported: p50/p99 latency per kind and throughput.

Then, with nothing else running, the heavy/small check: a small client's 4-token completions,
timed alone, then while one heavy client streams 128-token completions from the same server
(the target: the small client's p99 at most 2x its p99 alone). Writes the JSON beside the
Markdown.
"""
import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import torch

import peftkit
from peftkit.bank import AdapterBank
from peftkit.bench.machine import machine_info
from peftkit.serve import BackgroundServer, create_app

PROMPTS = ["The weather today is", "Once upon a time", "My favourite food is", "In the year 2000,",
           "The capital of France is", "She opened the door and", "Here is a recipe for", "The best way to learn"]
TEXTS = ["a triumph of style", "shares fell sharply today", "the match ended in a draw", "dull and overlong",
         "the vote passed narrowly", "a warm, funny film", "profits rose in the quarter", "the striker scored twice"]
METHODS = [{"method": "lora", "init_lora_weights": False}, "houlsby", "pfeiffer", "prefix"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--small-requests", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve-cpu.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        lm = bank_with_adapters("smollm2-135m", "causal-lm", Path(tmp) / "lm")
        cls = bank_with_adapters("minilm-l6", "classification", Path(tmp) / "cls")
        with BackgroundServer(create_app(lm, max_tokens=128)) as lm_server, \
                BackgroundServer(create_app(cls)) as cls_server:
            results = run_load(lm_server.url, cls_server.url, args.seconds)
            results |= heavy_and_small(lm_server.url, args.small_requests)
    machine = machine_info("cpu")
    results["machine"] = f"{machine['machine']}, torch {machine['torch']}, {machine['threads']} threads"
    write_report(args, results)


def bank_with_adapters(model: str, task: str, folder: Path) -> AdapterBank:
    """A bank over `model` holding 8 adapters of mixed methods with random weights (so they differ)."""
    tokenizer = peftkit.load_tokenizer(model)
    bank = AdapterBank(model, task=task)
    for i in range(8):
        base = peftkit.load_model(model, task=task, pad_token_id=tokenizer.pad_token_id,
                                  **({"num_labels": 2} if task == "classification" else {}))
        spec = METHODS[i % 4] if task == "causal-lm" else METHODS[i % 3]
        adapted = peftkit.attach(base, spec)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in adapted.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.02)
        bank.load(f"a{i}", peftkit.save_adapter(adapted, folder / f"a{i}"))
    return bank


# ---------------------------------------------------------------------------- the clients

def completion(adapter, prompt, max_tokens=16, seed=None, stream=False):
    body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    return body | ({"temperature": 0.8, "seed": seed} if seed is not None else {})


def send(url: str, body: dict, client: httpx.Client, read_delay: float = 0.0) -> tuple[int, str]:
    """(status, text): for a stream, the pieces joined."""
    if not body.get("stream"):
        response = client.post(url, json=body, timeout=300)
        data = response.json()
        text = json.dumps(data["data"]) if "data" in data else data.get("choices", [{}])[0].get("text")
        return response.status_code, text
    pieces = []
    with client.stream("POST", url, json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                pieces += [c.get("text", "") for c in json.loads(line[6:]).get("choices", [])]
                time.sleep(read_delay)
    return response.status_code, "".join(pieces)


def run_load(lm_url: str, cls_url: str, seconds: float) -> dict:
    rng = random.Random(0)
    gen_requests = [completion(f"a{rng.randrange(8)}", rng.choice(PROMPTS), seed=rng.choice([None, None, 1, 2]))
                    for _ in range(24)]
    cls_requests = [{"model": f"a{rng.randrange(8)}", "input": rng.sample(TEXTS, rng.randint(1, 8))} for _ in range(24)]
    with httpx.Client() as client:  # answers alone, one request at a time: what each must get under load too
        alone = {key(b): send(lm_url + "/v1/completions", b, client)[1] for b in gen_requests}
        alone |= {key(b): send(cls_url + "/v1/classify", b, client)[1] for b in cls_requests}

    log = defaultdict(list)  # kind -> [(seconds, status, matched or None)]
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()

    def client_loop(kind, make, check=True):
        local = random.Random(hash(kind))
        with httpx.Client() as client:
            while time.monotonic() < stop_at:
                url, body, delay = make(local)
                try:
                    took, (status, text) = timed(lambda: send(url, body, client, delay))
                except (httpx.HTTPError, json.JSONDecodeError) as err:
                    took, status, text = 0.0, f"client error {type(err).__name__}", None
                matched = (text == alone[key(body)]) if check and status == 200 else None
                with lock:
                    log[kind].append((took, status, matched))

    def generation(r):
        body = r.choice(gen_requests)
        return lm_url + "/v1/completions", {**body, "stream": r.random() < 0.5}, 0.0

    def classification(r):
        return cls_url + "/v1/classify", r.choice(cls_requests), 0.0

    clients = [("generate", generation)] * 6 + [("classify", classification)] * 4 + [
        ("128-token stream", lambda r: (lm_url + "/v1/completions", completion("a2", PROMPTS[3], 128, stream=True), 0)),
        ("slow reader", lambda r: (lm_url + "/v1/completions", completion("a3", PROMPTS[4], 32, stream=True), 0.2))]
    threads = [threading.Thread(target=client_loop, args=(kind, make, kind in ("generate", "classify")))
               for kind, make in clients]
    threads += [threading.Thread(target=fault_loop, args=(lm_url, cls_url, stop_at, log, lock))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(log, time.monotonic() - started)


def heavy_and_small(lm_url: str, n: int) -> dict:
    """The small client's latency alone, then while one heavy client streams long completions."""
    small = completion("a1", PROMPTS[0], max_tokens=4)
    heavy = completion("a2", PROMPTS[3], max_tokens=128, stream=True)
    with httpx.Client() as client:
        alone = sorted(timed(lambda: send(lm_url + "/v1/completions", small, client))[0] for _ in range(n))
        running = threading.Event()
        running.set()

        def keep_streaming():
            with httpx.Client() as own:
                while running.is_set():
                    send(lm_url + "/v1/completions", heavy, own)
        thread = threading.Thread(target=keep_streaming)
        thread.start()
        time.sleep(2)  # the heavy client is generating
        loaded = sorted(timed(lambda: send(lm_url + "/v1/completions", small, client))[0] for _ in range(n))
        running.clear()
        thread.join()
    return {"small_requests": n, "small_p50_alone_s": round(percentile(alone, 50), 3),
            "small_p99_alone_s": round(percentile(alone, 99), 3),
            "small_p50_with_heavy_s": round(percentile(loaded, 50), 3),
            "small_p99_with_heavy_s": round(percentile(loaded, 99), 3),
            "small_p99_ratio": round(percentile(loaded, 99) / percentile(alone, 99), 2)}


def fault_loop(lm_url: str, cls_url: str, stop_at: float, log, lock) -> None:
    """Bad clients, one after another: each fault's status is logged under its own kind."""
    faults = {
        "dropped stream (client)": lambda c: drop_stream(c, lm_url),
        "abandoned request (client)": lambda c: abandon(lm_url),
        "5 MB body (413)": lambda c: c.post(cls_url + "/v1/classify", content=b"x" * (5 << 20), timeout=60,
                                            headers={"Content-Type": "application/json"}).status_code,
        "malformed JSON (400)": lambda c: c.post(lm_url + "/v1/completions", content=b"{not json", timeout=60,
                                                 headers={"Content-Type": "application/json"}).status_code,
        "logprobs (400)": lambda c: c.post(lm_url + "/v1/completions", timeout=60, json={
            "model": "a0", "prompt": "hi", "logprobs": 3}).status_code,
        "slow sender (200)": lambda c: c.post(cls_url + "/v1/classify", content=trickle(
            json.dumps({"model": "a0", "input": TEXTS[:2]}).encode()), timeout=60,
            headers={"Content-Type": "application/json"}).status_code,
    }
    with httpx.Client() as client:
        while time.monotonic() < stop_at:
            for kind, fault in faults.items():
                took, status = timed(lambda: fault(client))
                with lock:
                    log[kind].append((took, status, None))


def trickle(body: bytes, piece: int = 8, pause: float = 0.05):
    """A request body sent a few bytes at a time (no Content-Length), as a slow client sends it."""
    for start in range(0, len(body), piece):
        time.sleep(pause)
        yield body[start:start + piece]


def drop_stream(client, url: str) -> str:
    with client.stream("POST", url + "/v1/completions", timeout=60,
                       json=completion("a5", PROMPTS[5], 64, stream=True)) as response:
        next(response.iter_lines())
    return "dropped"


def abandon(url: str) -> str:
    try:
        httpx.post(url + "/v1/completions", json=completion("a6", PROMPTS[6], 64), timeout=0.5)
        return "finished first"
    except httpx.ReadTimeout:
        return "abandoned"


def key(body: dict) -> str:
    """A request, whether streamed or not: both must give the same text."""
    return json.dumps({k: v for k, v in body.items() if k != "stream"}, sort_keys=True)


def timed(call):
    start = time.monotonic()
    out = call()
    return time.monotonic() - start, out


# ---------------------------------------------------------------------------- the report

def summarize(log, seconds: float) -> dict:
    kinds = {}
    for kind, rows in log.items():
        times = sorted(t for t, status, _ in rows if status == 200)
        kinds[kind] = {"requests": len(rows), "statuses": dict(Counter(str(s) for _, s, _ in rows)),
                       "mismatches": sum(m is False for _, _, m in rows),
                       "p50_s": round(percentile(times, 50), 3) if times else None,
                       "p99_s": round(percentile(times, 99), 3) if times else None}
    server_errors = sum(n for k in kinds.values() for s, n in k["statuses"].items() if s.startswith("5"))
    return {"seconds": round(seconds, 1), "kinds": kinds, "server_errors": server_errors,
            "mismatches": sum(k["mismatches"] for k in kinds.values()),
            "answered_per_s": round(sum(k["statuses"].get("200", 0) for k in kinds.values()) / seconds, 2)}


def percentile(values: list, q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def write_report(args, r: dict) -> None:
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    lines = ["# peftkit serve under load and faults", "",
             f"Machine: {r['machine']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"Regenerate: `.venv/bin/python benchmarks/serve_load.py --seconds {args.seconds:g}` "
             f"(raw: `{out.with_suffix('.json').name}`)", "",
             f"{r['seconds']} s of load on two loopback servers (SmolLM2-135M and MiniLM-L6, 8 adapters each). "
             f"**5xx: {r['server_errors']}. Cross-talk (answers that differ from the same request sent alone): "
             f"{r['mismatches']}.** Answered {r['answered_per_s']} requests/s.", "",
             "| client | requests | statuses | mismatches | p50 (s) | p99 (s) |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for kind, k in r["kinds"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(k["statuses"].items()))
        lines.append(f"| {kind} | {k['requests']} | {statuses} | {k['mismatches']} | {k['p50_s']} | {k['p99_s']} |")
    lines += ["", f"Heavy and small, with nothing else running: the small client's 4-token completion "
              f"({r['small_requests']} requests each way) took p50 {r['small_p50_alone_s']} s / p99 "
              f"{r['small_p99_alone_s']} s alone and p50 {r['small_p50_with_heavy_s']} s / p99 "
              f"{r['small_p99_with_heavy_s']} s while a heavy client streamed 128-token completions: "
              f"**p99 {r['small_p99_ratio']}x** (target: at most 2x)."]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
