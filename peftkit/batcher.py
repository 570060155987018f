"""The serving batcher: requests of one kind grouped into batches that take turns on the model.

A dispatcher thread groups waiting requests of one kind (up to max_batch rows, whatever adapters
they name) into batches, and worker threads run the batches in turns: a generating batch offers
the bank's lock after every token (and after every chunk of its prompts, bank.generate.PREFILL_TOKENS
tokens), a classify or answer batch after every chunk of rows, and the lock goes to the waiting
batch that has had the fewest turns (peftkit.turns). A new small request runs as soon as the step
under way ends; long ones alternate step by step; none waits for a whole long one. A job whose
client went away (`cancelled`) has its rows end at the next step; their batch-mates go on.
"""
import concurrent.futures
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from .openai_api import ApiError

WORKERS = 4  # batches that may be under way at once, taking turns on the model
CHUNK_TOKENS = 4096  # text tokens a classify or answer turn takes at most (a dozen 384-token QA windows)


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
