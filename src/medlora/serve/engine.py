"""The serving engine: one base model with its LoRA adapters, answered by one worker thread.

One worker thread owns the model, so generation never runs on the event loop and never runs twice at once.
Requests wait in a queue; the worker answers them with continuous batching (medlora.batching): a refill loop for
the model of the oldest request takes the queued requests for that model, up to `max_batch_size` rows at a time,
each with its own settings, and gives a row's place to the next request as soon as its answer ends; it stops
taking more once a request for another model has waited `switch_after` seconds. Streamed answers
are rows like the others; their tokens become text events on a thread of their own. A client that goes away sets
its cancel event, which ends its row at the next step. When a batch fails, each of its requests is answered again
on its own, so that only a request that fails alone gets the error. Also here: turning chat messages into a
prompt, and the errors and bounds the HTTP layer (`medlora.serve.api`) answers with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from fastapi.responses import JSONResponse
from transformers import TextIteratorStreamer

from medlora.batching import Finished, Request, end_reason
from medlora.config import GenerationArgs
from medlora.data import joined_text_parts
from medlora.errors import ConfigError, DataError
from medlora.generate import Generator
from medlora.templates import Template
from medlora.turns import Turn, conversation_turns

if TYPE_CHECKING:
    from medlora.config import ModelArgs, PromptArgs
    from medlora.knowledge import Retrieved

logger = logging.getLogger(__name__)

BASE_ALIAS = "base"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --- errors and settings -----------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass
class ServeSettings:
    """Bounds on what one request may ask for, and the API key (None: no authentication)."""

    api_key: str | None = None
    max_prompt_tokens: int = 2048
    max_tokens_cap: int = 1024
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    urgent_threshold: float = 0.0  # the operator's choice for every greedy answer (GenerationArgs' option)

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_tokens_cap", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1")
        GenerationArgs(urgent_threshold=self.urgent_threshold)  # checked as every other command checks it
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_cap)


# --- the engine --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to answer with one model; `stop` strings end the answer (they are not part of it). A `seed` (given
    only when sampling) makes the answer reproducible: the request is answered alone, as its loop's only row."""

    model: str
    prompt: str
    gen: GenerationArgs
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Output:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens reached)


@dataclass
class _Job:
    request: GenerationRequest
    emit: Callable[[str, object], None]  # called from the worker: ("text", str), ("done", Output), ("error", exc)
    stream: bool
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    ids: list[int] | None = None  # the prompt's tokens, once taken
    tokens: list[int] = dataclasses.field(default_factory=list)  # the answer's tokens so far

    _streamer: TextIteratorStreamer | None = None
    _reason: str = "stop"
    _n_tokens: int = 0
    _failed: bool = False

    def start_stream(self, generator: Generator) -> None:
        """Start the thread that turns this job's tokens into text events."""
        self._streamer = TextIteratorStreamer(generator.tokenizer, skip_special_tokens=True)
        threading.Thread(target=self._emit_pieces, args=(generator,), daemon=True).start()

    def add_token(self, token: int) -> None:
        """Each new token of the answer: kept (a failed batch's retry resumes from them) and streamed."""
        self.tokens.append(token)
        if self._streamer is not None:
            self._streamer.put(torch.tensor([token]))

    def _emit_pieces(self, generator: Generator) -> None:
        pieces = []
        for piece in generator.pieces(self._streamer, self.cancel, self.request.stop):
            pieces.append(piece)
            self.emit("text", piece)
        if not self._failed:
            reason = "length" if self._reason == "length" and not self.cancel.is_set() else "stop"
            self.emit("done", Output("".join(pieces), self._n_tokens, reason))

    def end_stream(self, done: Finished) -> None:
        self._reason, self._n_tokens = done.reason, len(self.tokens)  # read by the text thread once the stream ends
        self._streamer.end()

    def fail(self, exc: Exception) -> None:
        self._failed = True
        if self._streamer is not None:
            self._streamer.end()
        self.emit("error", exc)


class Engine:
    """One base model with its adapters, served by a single worker thread that batches requests continuously.

    Models are named: the base by its `--base_model` name (alias `base`), each adapter by its own name. Names are
    only ever looked up in this table, never used as paths.
    """

    def __init__(self, model, tokenizer, templates: dict[str, Template], base_name: str, text_tokenizer=None,
                 max_batch_size: int = 8, max_queue: int = 256, context_length: int | None = None,
                 knowledge: dict | None = None):
        if max_batch_size < 1 or max_queue < 1:
            raise ConfigError("--max_batch_size and --max_queue must be at least 1")
        self.model, self.base_name = model, base_name
        knowledge = knowledge or {}
        self.generators = {name: Generator(model, tokenizer, template, knowledge.get(name))
                           for name, template in templates.items()}
        self.text_tokenizer = text_tokenizer or tokenizer  # request-side prompt building and counting only
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.switch_after = 2.0  # seconds a request for another model waits before the running loop stops taking more
        self.context_length = context_length
        self._text_lock = threading.Lock()  # a Rust tokenizer must not be used by two threads at once
        self._pending: deque[_Job] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._running: list[_Job] = []
        self._worker: threading.Thread | None = None
        self.served = self.generate_calls = 0  # answered requests, and model.generate calls that answered them

    @classmethod
    def load(cls, model: "ModelArgs | str", adapters: dict[str, str] | None = None, prompt: "PromptArgs | None" = None,
             **options) -> "Engine":
        """Load the base `model` (ModelArgs, or a base model's name) once and put every adapter ({name: folder}) on it
        as a named PeftModel adapter. `prompt`: for every model; what it leaves None, each adapter's own
        (medlora.json), else the defaults (loader.resolve_prompt). ModelArgs' and PromptArgs' fields are also taken
        as keywords; the other keywords are the Engine's (max_batch_size, max_queue, ...)."""
        from medlora.config import model_and_prompt
        from medlora.loader import load
        from medlora.modeling import load_tokenizer

        margs, prompt, engine_kwargs = model_and_prompt(model, prompt, options)
        adapters = dict(adapters or {})
        check_model_names(margs.base_model, adapters)
        loaded = load(margs, adapters, prompt, merge=False)
        text_tokenizer = load_tokenizer(margs.base_model, padding_side="left",
                                        trust_remote_code=margs.trust_remote_code)
        return cls(loaded.model, loaded.tokenizer, loaded.templates, margs.base_model, text_tokenizer,
                   context_length=loaded.context_length, knowledge=loaded.knowledge, **engine_kwargs)

    # request side (any thread) ----------------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return list(self.generators)

    @property
    def queue_length(self) -> int:
        return len(self._pending) + len(self._running)

    def resolve(self, name: str) -> str:
        """The served model called `name`, or a 404."""
        name = self.base_name if name == BASE_ALIAS else name
        if name not in self.generators:
            raise APIError(404, f"The model {name[:100]!r} does not exist; available: {', '.join(self.generators)}",
                           param="model", code="model_not_found")
        return name

    def chat_prompt(self, name: str, messages: list[dict]) -> tuple[str, "Retrieved | None"]:
        """The prompt for a conversation of {"role", "content"} messages, rendered by the model's template as
        training rendered it, and the facts retrieved for its last user message (None when the model has no
        knowledge)."""
        generator = self.generators[name]
        system, last_user, history = split_conversation(messages)
        with self._text_lock:
            return generator.prepare(Turn(last_user, history=tuple(history), system=system))

    def count_tokens(self, name: str, text: str) -> int:
        special = self.generators[name].template.add_special_tokens
        with self._text_lock:
            return len(self.text_tokenizer(text, add_special_tokens=special)["input_ids"])

    def submit(self, request: GenerationRequest, emit: Callable[[str, object], None], stream: bool = False
               ) -> threading.Event:
        """Queue a request; `emit` is called from the worker. Returns the event that cancels it."""
        job = _Job(request, emit, stream)
        with self._wakeup:
            if self._closed:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise APIError(503, f"the server is busy ({len(self._pending)} requests queued); retry later",
                               type="server_error", code="server_busy")
            self._pending.append(job)
            self._wakeup.notify()
        self.start()
        return job.cancel

    async def complete(self, request: GenerationRequest) -> Output:
        """The whole answer; awaiting never blocks the event loop."""
        sink = _LoopSink(asyncio.get_running_loop())
        cancel = self.submit(request, sink)
        try:
            kind, payload = await sink.queue.get()
        finally:
            cancel.set()  # if this task was cancelled while queued, the worker skips the job
        if kind == "error":
            raise payload
        return payload

    def open_stream(self, request: GenerationRequest) -> "TextStream":
        """Queue a streaming request now (so a full queue is refused before any response starts)."""
        sink = _LoopSink(asyncio.get_running_loop())
        return TextStream(sink.queue, self.submit(request, sink, stream=True))

    # worker side -----------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._wakeup:
            if self._worker is None and not self._closed:
                self._worker = threading.Thread(target=self._work, name="medlora-engine", daemon=True)
                self._worker.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, refuse the queued ones, stop a running stream and let the worker finish."""
        with self._wakeup:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._wakeup.notify_all()
        for job in self._running:
            job.cancel.set()
        for job in dropped:
            job.emit("error", APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))
        if self._worker is not None:
            self._worker.join(timeout)

    def _work(self) -> None:
        """Serve the oldest request's model with one refill loop until it has no request left to take, then the next
        oldest request's model (adapters switch between loops only)."""
        while (name := self._next_model()) is not None:
            try:
                self._run_loop(name, lambda n: self._take(name, n), self.max_batch_size)
            except Exception:  # the worker lives on
                logger.exception("a batch failed; its requests are retried one by one")
                self._retry_alone(name)

    def _run_loop(self, name: str, take: Callable[[int], list[Request]], max_rows: int) -> None:
        with self._use_model(name):
            self.generators[name].refill_loop(max_rows).run(take, self._finish)
        self.generate_calls += 1

    def _retry_alone(self, name: str) -> None:
        """Answer each request of a failed batch in a loop of its own, from where its answer had got to.

        A batch's exception does not say which row caused it (a hostile input, a numeric blow-up, a batch too big for
        memory), and failing every row would let one request fail all the others; alone, a request gets the error
        only if it fails by itself. Resuming from prompt + answer so far keeps a stream's text whole (a penalty then
        counts the answer's tokens from the resumption on: the loop keeps its own counts)."""
        generator = self.generators[name]
        for job in list(self._running):  # they stay in _running meanwhile, so that close() cancels them
            try:
                ended = end_reason(job.tokens, job.request.gen.max_new_tokens, generator.eos_ids)
                if ended is not None:  # the batch failed after the answer's last token
                    self._finish(Finished(Request(job.ids, job.request.gen, job), job.tokens, ended, 0.0))
                    continue
                batches = iter([[self._request(generator, job)]])
                self._run_loop(name, lambda n: next(batches, []), 1)
            except Exception as exc:
                logger.exception("generation failed for one request")
                if job in self._running:
                    self._running.remove(job)
                job.fail(exc)

    def _next_model(self) -> str | None:
        """The model of the oldest live request (waiting for one); None once closed."""
        with self._wakeup:
            while True:
                while not self._pending and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return None
                if not self._pending[0].cancel.is_set():
                    return self._pending[0].request.model
                self._pending.popleft()

    def _take(self, name: str, n: int) -> list[Request]:
        """Up to `n` queued requests for model `name`, oldest first (a client gone away is skipped). Requests that
        arrived after one for another model are taken only until that one has waited `switch_after` seconds: then
        the loop drains and the other model's turn comes (first come, first served)."""
        jobs = []
        with self._wakeup:
            others = (job for job in self._pending if job.request.model != name and not job.cancel.is_set())
            other = next(others, None)
            overdue = other is not None and time.monotonic() - other.queued_at > self.switch_after
            if any(job.request.seed is not None for job in self._running):
                return []  # a seeded request runs alone
            for job in list(self._pending):
                if self._closed or len(jobs) >= n or (overdue and job.queued_at > other.queued_at):
                    break
                if job.request.model != name:
                    continue
                # Rows draw their samples in turn from one random generator, so a seed is honoured only alone: a
                # seeded request waits for the loop to drain (those behind it wait too: first come, first served).
                seeded = job.request.seed is not None
                if seeded and (jobs or self._running):
                    break
                self._pending.remove(job)
                if not job.cancel.is_set():
                    jobs.append(job)
                if seeded:
                    break
            self._running += jobs
        generator = self.generators[name]
        return [self._request(generator, job) for job in jobs]

    def _request(self, generator: Generator, job: _Job) -> Request:
        """The job as a row of the loop: its prompt and answer so far (empty unless a retry resumes it), with the
        tokens it has left. The first call tokenises the prompt, starts the stream and seeds the random generator."""
        if job.ids is None:
            job.ids = generator.tokenizer(job.request.prompt,
                                          add_special_tokens=generator.template.add_special_tokens)["input_ids"]
            if job.stream:
                job.start_stream(generator)
            if job.request.seed is not None:
                torch.manual_seed(job.request.seed)  # the row is alone: nothing else draws from it until it ends
        gen = dataclasses.replace(job.request.gen, max_new_tokens=job.request.gen.max_new_tokens - len(job.tokens))
        return Request(job.ids + job.tokens, gen, job, job.add_token, job.cancel)

    def _finish(self, done: Finished) -> None:
        job: _Job = done.request.tag
        self._running.remove(job)
        self.served += 1
        if job.stream:
            job.end_stream(done)
            return
        answer = self.generators[job.request.model].to_answer(job.tokens, done.seconds, job.request.stop)
        reason = "stop" if answer.ended_by_eos or answer.cut else "length"
        job.emit("done", Output(answer.text, answer.n_tokens, reason))

    @contextmanager
    def _use_model(self, name: str):
        """Activate adapter `name`, or switch every adapter off for the base model."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            context = nullcontext()
        elif name == self.base_name:
            context = self.model.disable_adapter()
        else:
            self.model.set_adapter(name, inference_mode=True)
            context = nullcontext()
        with context:
            yield


class _LoopSink:
    """Carries a job's events from the worker thread into an asyncio queue on the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody is listening
            pass


class TextStream:
    """The pieces of one streamed answer: iterate for ("text", str) events, then `output` holds the Output."""

    def __init__(self, queue: asyncio.Queue, cancel: threading.Event):
        self.queue, self.cancel = queue, cancel
        self.output: Output | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                kind, payload = await self.queue.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    self.output = payload
                    return
                yield payload
        finally:
            self.cancel.set()  # a client that went away stops the generation at the next token


def check_model_names(base_model: str, adapters: dict[str, str]) -> None:
    """Adapter names are API identifiers: short, plain, distinct from the base model's."""
    for name in adapters:
        if not MODEL_NAME.match(name):
            raise ConfigError(f"--lora_weights {name}=...: a model name is letters, digits, '.', '_' or '-' "
                              f"(at most 64, starting with a letter or digit)")
        if name in (BASE_ALIAS, base_model):
            raise ConfigError(f"--lora_weights {name}=...: {name!r} names the base model; choose another name")


# --- chat messages to a prompt -----------------------------------------------------------------------------

def message_text(content) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts joined as data files'
    are (`data.joined_text_parts`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    try:
        return joined_text_parts([p if isinstance(p, dict) else p.model_dump() for p in content], "messages: content")
    except DataError as exc:
        raise APIError(400, str(exc), param="messages", code="unsupported_content") from None


def normalise_roles(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, text) pairs with `developer` read as `system`; other roles than system/user/assistant refused."""
    pairs = []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"unsupported message role {role[:40]!r}: use system, user or assistant",
                           param="messages", code="unsupported_role")
        pairs.append((role, message_text(message.get("content"))))
    if not pairs or pairs[-1][0] != "user":
        raise APIError(400, "the last message must be the user's", param="messages", code="invalid_messages")
    return pairs


def split_conversation(messages: list[dict]) -> tuple[str | None, str, list[tuple[str, str]]]:
    """(system text or None, last user message, earlier (user, assistant) turns).

    Message order follows the one rule data files follow (turns.conversation_turns): system messages are joined with
    a newline into the system text, and so are consecutive messages of one role into one turn; the conversation
    starts with the user and (here) ends with the user.
    """
    try:
        system, texts = conversation_turns(normalise_roles(messages))
    except DataError as exc:
        raise APIError(400, f"messages: {exc}", param="messages", code="invalid_messages") from None
    question = required_text(texts[-1], "the last user message", "messages")
    return system, question, list(zip(texts[0:-1:2], texts[1:-1:2]))


def required_text(text: str, what: str, param: str) -> str:
    """`text`, unless it is empty or only whitespace: then there is nothing to answer, and a template would make a
    prompt of it anyway. One rule for a chat's last user message and a completion's prompt."""
    if not text.strip():
        raise APIError(400, f"{what} is empty", param=param, code="empty_prompt")
    return text
