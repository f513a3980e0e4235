"""OpenAI-compatible HTTP API over one base model and several LoRA adapters.

Layout, top to bottom: errors and settings; the `Engine` (model, adapters, queue, worker thread); turning chat
messages into a prompt; the request/response schemas; the guard middleware (API key, body size); `create_app`.

One worker thread owns the model, so generation never runs on the event loop and never runs twice at once.
Requests that arrive while it is busy wait in a queue; the worker takes the oldest one plus every queued request
for the same model with the same settings (up to `max_batch_size`) and answers them with one left-padded
`generate` call. A streaming request is answered alone, token by token; a client that goes away sets its cancel
event, which stops the generation at the next token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteriaList, TextIteratorStreamer

from medlora.config import GenerationArgs
from medlora.errors import ConfigError, MedloraError
from medlora.generate import Generator, StopOnEvent, cut_at_markers, template_for
from medlora.templates import Template

logger = logging.getLogger(__name__)

BASE_ALIAS = "base"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
MAX_STOP_STRINGS = 4


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

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_tokens_cap", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_cap)


# --- the engine --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to answer with one model; `stop` strings end the answer (they are not part of it)."""

    model: str
    prompt: str
    gen: GenerationArgs
    stop: tuple[str, ...] = ()


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

    @property
    def batch_key(self) -> tuple:
        return (self.request.model, dataclasses.astuple(self.request.gen))


class Engine:
    """One base model with its adapters, served by a single worker thread that batches queued requests.

    Models are named: the base by its `--base_model` name (alias `base`), each adapter by its own name. Names are
    only ever looked up in this table, never used as paths.
    """

    def __init__(self, model, tokenizer, templates: dict[str, Template], base_name: str, text_tokenizer=None,
                 max_batch_size: int = 8, max_queue: int = 256, context_length: int | None = None):
        if max_batch_size < 1 or max_queue < 1:
            raise ConfigError("--max_batch_size and --max_queue must be at least 1")
        self.model, self.base_name = model, base_name
        self.generators = {name: Generator(model, tokenizer, template) for name, template in templates.items()}
        self.text_tokenizer = text_tokenizer or tokenizer  # request-side prompt building and counting only
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.context_length = context_length
        self._text_lock = threading.Lock()  # a Rust tokenizer must not be used by two threads at once
        self._pending: deque[_Job] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._running: list[_Job] = []
        self._worker: threading.Thread | None = None
        self.served = self.generate_calls = 0  # answered requests, and model.generate calls that answered them

    @classmethod
    def load(cls, base_model: str, adapters: dict[str, str] | None = None, prompt_template: str | None = None,
             dtype: str = "auto", load_8bit: bool = False, load_4bit: bool = False, trust_remote_code: bool = False,
             allow_pickle: bool = False, **engine_kwargs) -> "Engine":
        """Load the base once and put every adapter on it as a named PeftModel adapter."""
        from medlora.modeling import load_adapter, load_base_model, load_tokenizer, preflight_adapter

        adapters = dict(adapters or {})
        check_model_names(base_model, adapters)
        for path in adapters.values():  # a bad adapter is refused before the base's weights are loaded
            preflight_adapter(path, base_model, allow_pickle, trust_remote_code)
        tokenizer = load_tokenizer(base_model, padding_side="left", trust_remote_code=trust_remote_code)
        text_tokenizer = load_tokenizer(base_model, padding_side="left", trust_remote_code=trust_remote_code)
        templates = {base_model: template_for(prompt_template, base_model)}
        templates.update({name: template_for(prompt_template, path, base_model) for name, path in adapters.items()})
        model = load_base_model(base_model, dtype, load_8bit, load_4bit, trust_remote_code)
        context = getattr(model.config, "max_position_embeddings", None)
        for name, path in adapters.items():
            model = load_adapter(model, path, allow_pickle=allow_pickle, adapter_name=name)
        return cls(model, tokenizer, templates, base_model, text_tokenizer, context_length=context, **engine_kwargs)

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

    def chat_prompt(self, name: str, messages: list[dict]) -> str:
        """The prompt for a conversation of {"role", "content"} messages, through the model's template."""
        template = self.generators[name].template
        if template.use_chat_template and getattr(self.text_tokenizer, "chat_template", None):
            messages = chat_template_messages(messages)
            with self._text_lock:
                return self.text_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        last_user, history = split_conversation(messages)
        return template.build_prompt(last_user, "", self.text_tokenizer, history)

    def count_tokens(self, name: str, text: str) -> int:
        special = not self.generators[name].template.use_chat_template  # as Generator._encode does
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
        while (jobs := self._next_jobs()) is not None:
            self._running = jobs
            try:
                self._run(jobs)
                self.served, self.generate_calls = self.served + len(jobs), self.generate_calls + 1
            except Exception as exc:  # every failure goes to its requests; the worker lives on
                logger.exception("generation failed")
                for job in jobs:
                    job.emit("error", exc)
            finally:
                self._running = []

    def _next_jobs(self) -> list[_Job] | None:
        """The oldest live job, plus queued non-streaming jobs it can share a batch with; None once closed."""
        with self._wakeup:
            while True:
                while not self._pending and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return None
                first = self._pending.popleft()
                if not first.cancel.is_set():
                    break
            if first.stream:
                return [first]
            batch = [first]
            for job in list(self._pending):
                if len(batch) < self.max_batch_size and not job.stream and job.batch_key == first.batch_key:
                    self._pending.remove(job)
                    if not job.cancel.is_set():
                        batch.append(job)
            return batch

    def _run(self, jobs: list[_Job]) -> None:
        name = jobs[0].request.model
        with self._use_model(name):
            if jobs[0].stream:
                self._run_stream(jobs[0])
            else:
                self._run_batch(jobs)

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

    def _run_batch(self, jobs: list[_Job]) -> None:
        first = jobs[0].request
        answers = self.generators[first.model].generate([job.request.prompt for job in jobs], first.gen,
                                                        batch_size=self.max_batch_size)
        for job, answer in zip(jobs, answers):
            text, was_cut = cut_at_stops(answer.text, job.request.stop)
            reason = "stop" if answer.ended_by_eos or was_cut else "length"
            job.emit("done", Output(text, answer.n_tokens, reason))

    def _run_stream(self, job: _Job) -> None:
        """Like `Generator.stream`, but also counting tokens and honouring the request's stop strings."""
        generator, request = self.generators[job.request.model], job.request
        streamer = CountingStreamer(generator.tokenizer, generator.eos_ids)
        kwargs = dict(**generator._encode([request.prompt]), **generator._generate_kwargs(request.gen),
                      streamer=streamer)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*kwargs.get("stopping_criteria", []),
                                                            StopOnEvent(job.cancel)])
        errors: list[Exception] = []
        thread = threading.Thread(target=_generate_into, args=(generator.model, kwargs, streamer, errors), daemon=True)
        thread.start()
        markers = [*generator.template.stop_strings, *request.stop]
        pieces = []
        for piece in strip_pieces(cut_at_markers(strip_pieces(streamer), markers, job.cancel)):
            pieces.append(piece)
            job.emit("text", piece)
        stopped = job.cancel.is_set()
        job.cancel.set()
        thread.join()
        if errors:
            raise errors[0]
        reason = "stop" if stopped or streamer.ended_by_eos else "length"
        job.emit("done", Output("".join(pieces), streamer.n_tokens, reason))


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


class CountingStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also counts generated tokens and notes whether the last one was EOS."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.eos_ids, self.n_tokens, self.ended_by_eos = eos_ids, 0, False

    def put(self, value):
        if not self.next_tokens_are_prompt:
            ids = value.reshape(-1).tolist()
            self.n_tokens += len(ids)
            self.ended_by_eos = bool(ids) and ids[-1] in self.eos_ids
        super().put(value)


def _generate_into(model, kwargs: dict, streamer, errors: list) -> None:
    try:
        with torch.inference_mode():
            model.generate(**kwargs)
    except Exception as exc:  # re-raised by the worker once the stream is drained
        errors.append(exc)
        streamer.end()


def strip_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Text pieces whose concatenation is that of `pieces`, stripped: no leading whitespace, and trailing
    whitespace held back until more text follows (so a stream adds up to exactly the non-streamed answer)."""
    held, started = "", False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        text = held + piece
        body = text.rstrip()
        held = text[len(body):]
        if body:
            yield body


def cut_at_stops(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """`text` up to the first of the stop strings (excluded, right-stripped), and whether one was found."""
    hits = [text.index(stop) for stop in stops if stop and stop in text]
    if not hits:
        return text, False
    return text[:min(hits)].rstrip(), True


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
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        part = part if isinstance(part, dict) else part.model_dump()
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages", code="unsupported_content")
        texts.append(part["text"])
    return "\n".join(texts)


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


def split_conversation(messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """(last user message, earlier (user, assistant) turns); system text is put before the first user message.

    Consecutive messages of one role are joined with a newline; a conversation must alternate user/assistant,
    starting and ending with the user.
    """
    pairs = normalise_roles(messages)
    system = "\n".join(text for role, text in pairs if role == "system")
    turns: list[list[str]] = []
    for role, text in pairs:
        if role == "system":
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if turns[0][0] != "user":
        raise APIError(400, "the conversation must start with a user message", param="messages",
                       code="invalid_messages")
    if system:
        turns[0][1] = f"{system}\n\n{turns[0][1]}"
    texts = [text for _, text in turns]
    return texts[-1], list(zip(texts[0:-1:2], texts[1:-1:2]))


def chat_template_messages(messages: list[dict]) -> list[dict]:
    """Messages for the tokenizer's own chat template: plain-text content, known roles."""
    return [{"role": role, "content": text} for role, text in normalise_roles(messages)]


# --- request and response schemas (OpenAI's, the subset served) --------------------------------------------

class _Lenient(BaseModel):
    """Unknown OpenAI fields (user, seed, presence_penalty, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Lenient):
    role: str = Field(description="system (or developer), user or assistant")
    content: str | list[TextPart] | None = Field(None, description="the text, or a list of text parts")


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, description="send a last chunk with token usage before [DONE]")


class _SamplingFields(_Lenient):
    model: str = Field(description="a served model id (see GET /v1/models); `base` is the base model")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (1 to the server's cap)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy; above 0: sampling")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling threshold, with temperature > 0")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} strings that end the answer")
    n: int | None = Field(None, description="number of answers; only 1 is supported")
    stream: bool = Field(False, description="answer as server-sent events ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, ending with a user message")
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens; wins if both")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(description="the raw prompt (no template applied); a list must hold one string")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """A completion, or (with `stream`) one server-sent event of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medlora"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: list[str]
    queue: int = Field(description="requests waiting or running")
    served: int = Field(description="requests answered since start")
    generate_calls: int = Field(description="batched generate calls that answered them")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "invalid request, prompt too long, max_tokens out of bounds, unsupported n",
    401: "missing or wrong API key", 404: "unknown model", 413: "request body too large",
    503: "queue full or shutting down"}.items()}


# --- from a request to a GenerationRequest -----------------------------------------------------------------

def generation_args(body: _SamplingFields, settings: ServeSettings) -> GenerationArgs:
    """Greedy unless temperature > 0; max_tokens within [1, cap]; n must be 1."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_cap:
        raise APIError(400, f"max_tokens is {max_tokens}, over this server's cap of {settings.max_tokens_cap}",
                       param="max_tokens", code="max_tokens_exceeded")
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if not body.temperature:
        return GenerationArgs(max_new_tokens=max_tokens)
    top_p = 1.0 if body.top_p is None else body.top_p
    return GenerationArgs(max_new_tokens=max_tokens, do_sample=True, temperature=body.temperature, top_p=top_p,
                          top_k=0)  # top_k=0: no top-k cut, as in OpenAI's API


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop", code="unsupported_value")
    return tuple(s for s in stops if s)


def check_prompt_length(prompt_tokens: int, max_tokens: int, settings: ServeSettings, context: int | None,
                        param: str) -> None:
    if prompt_tokens == 0:
        raise APIError(400, "the prompt is empty", param=param, code="empty_prompt")
    if prompt_tokens > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, over this server's limit of "
                            f"{settings.max_prompt_tokens}", param=param, code="context_length_exceeded")
    if context and prompt_tokens + max_tokens > context:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                            f"context of {context} tokens", param=param, code="context_length_exceeded")


def completion_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise APIError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt",
                       code="unsupported_value")
    return prompt[0]


def usage(prompt_tokens: int, output: Output) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=output.completion_tokens,
                 total_tokens=prompt_tokens + output.completion_tokens)


def _meta(prefix: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}


# --- server-sent events ------------------------------------------------------------------------------------

async def chat_chunks(stream: TextStream, model: str, prompt_tokens: int, include_usage: bool
                      ) -> AsyncIterator[BaseModel]:
    meta = _meta("chatcmpl", model)
    yield ChatCompletionChunk(**meta, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
    async for piece in stream:
        yield ChatCompletionChunk(**meta, choices=[ChatChunkChoice(delta=ChatDelta(content=piece))])
    reason = stream.output.finish_reason
    yield ChatCompletionChunk(**meta, choices=[ChatChunkChoice(delta=ChatDelta(), finish_reason=reason)])
    if include_usage:
        yield ChatCompletionChunk(**meta, choices=[], usage=usage(prompt_tokens, stream.output))


async def completion_chunks(stream: TextStream, model: str, prompt_tokens: int, include_usage: bool
                            ) -> AsyncIterator[BaseModel]:
    meta = _meta("cmpl", model)
    async for piece in stream:
        yield Completion(**meta, choices=[CompletionChoice(text=piece)])
    yield Completion(**meta, choices=[CompletionChoice(text="", finish_reason=stream.output.finish_reason)])
    if include_usage:
        yield Completion(**meta, choices=[], usage=usage(prompt_tokens, stream.output))


async def sse_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[dict]:
    """`data: {chunk}` events, then `data: [DONE]`; a failure mid-stream becomes an `{"error": ...}` event."""
    try:
        async for chunk in chunks:
            yield {"data": chunk.model_dump_json()}
    except Exception as exc:  # the response has started: the error can only travel as an event
        yield {"data": json.dumps(as_api_error(exc).body(), ensure_ascii=False)}
    yield {"data": "[DONE]"}


def event_stream(chunks: AsyncIterator[BaseModel]):
    from sse_starlette.sse import EventSourceResponse

    return EventSourceResponse(sse_events(chunks), ping=15, headers={"Cache-Control": "no-cache"})


# --- errors as OpenAI JSON ---------------------------------------------------------------------------------

def as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MedloraError):
        return APIError(400, str(exc))
    logger.error("unexpected error: %r", exc)
    return APIError(500, f"internal error ({type(exc).__name__}); the server is still running", type="server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """The first schema violation as a 400 (OpenAI answers 400, not 422, for malformed requests)."""
    first = (exc.errors() or [{}])[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, param=".".join(where) or None, code="invalid_request")


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                        ).response()

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(MedloraError, api_error)
    app.add_exception_handler(Exception, api_error)  # a bug: still OpenAI-shaped JSON, and the server stays up


# --- guard: API key and body size, before FastAPI parses anything ------------------------------------------

class GuardMiddleware:
    """Refuse requests without the API key (401) and bodies over `max_body_bytes` (413), as OpenAI JSON.

    The size is checked on the declared Content-Length and again on the bytes actually received (a chunked or
    lying client cannot get past it); the body is read here once and handed on.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        body = await self._read_body(receive)
        if body is None:
            return await self._too_large().response()(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, path: str, headers: dict) -> APIError | None:
        if self.api_key and path not in PUBLIC_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is over this server's limit of {self.max_body_bytes} bytes",
                        code="request_too_large")

    async def _read_body(self, receive) -> bytes | None:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI receive that gives the already-read body once, then waits on the real one (for disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --- the app -----------------------------------------------------------------------------------------------

def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The OpenAI-compatible app around `engine`; the engine's worker runs for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="medlora", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API over a base model and its LoRA adapters. Research use only; "
                              "not medical advice.")
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    # Declares the bearer scheme in the OpenAPI schema (the Authorize button of /docs); GuardMiddleware enforces it.
    bearer = [Depends(HTTPBearer(auto_error=False))]
    _add_info_routes(app, engine, bearer)
    _add_generation_routes(app, engine, settings, bearer)
    _document_openapi(app)
    return app


def _version() -> str:
    from medlora import __version__

    return __version__


def _add_info_routes(app: FastAPI, engine: Engine, bearer: list) -> None:
    started = int(time.time())

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        """Liveness, the served models and how many requests are waiting or running (no API key needed)."""
        return Health(models=engine.model_names, queue=engine.queue_length, served=engine.served,
                      generate_calls=engine.generate_calls)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, dependencies=bearer, tags=["openai"])
    async def list_models() -> ModelList:
        """The base model (also reachable as `base`) and each adapter."""
        return ModelList(data=[ModelCard(id=name, created=started) for name in engine.model_names])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERROR_RESPONSES, dependencies=bearer,
             tags=["openai"])
    async def get_model(model_id: str) -> ModelCard:
        return ModelCard(id=engine.resolve(model_id), created=started)


def stream_response(chunk: type[BaseModel]) -> dict:
    # Before OpenAPI 3.2, a text/event-stream schema describes one event; its `data` is JSON text (or [DONE]).
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    event = {"type": "object", "required": ["data"], "properties": {
        "data": {"anyOf": [{"type": "string", "const": "[DONE]"},
                           {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]},
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}
    return {"description": f"the answer; with `stream: true`, server-sent events `data: <{chunk.__name__}>`, then "
                           f"`data: [DONE]`",
            "content": {"text/event-stream": {"schema": event}}}


def _document_openapi(app: FastAPI) -> None:
    """Add the stream chunk schema, and drop FastAPI's 422 entries: malformed requests are answered 400."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}",
                                                          mode="serialization")
            components.update(chunk.pop("$defs", {}), ChatCompletionChunk=chunk)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _add_generation_routes(app: FastAPI, engine: Engine, settings: ServeSettings, bearer: list) -> None:
    async def prepare(body: _SamplingFields, build_prompt: Callable[[str], str], param: str):
        name = engine.resolve(body.model)
        gen = generation_args(body, settings)
        stops = stop_strings(body.stop)

        def prompt_and_count():  # tokenising a long prompt is CPU work: off the event loop
            prompt = build_prompt(name)
            return prompt, engine.count_tokens(name, prompt)

        prompt, prompt_tokens = await run_in_threadpool(prompt_and_count)
        check_prompt_length(prompt_tokens, gen.max_new_tokens, settings, engine.context_length, param)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return GenerationRequest(name, prompt, gen, stops), prompt_tokens, include_usage

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=bearer, tags=["openai"],
              responses={**ERROR_RESPONSES, 200: stream_response(ChatCompletionChunk)})
    async def chat_completions(body: ChatCompletionRequest):
        """Answer a conversation; messages go through the model's prompt template (or its chat template)."""
        messages = [message.model_dump() for message in body.messages]
        request, prompt_tokens, include_usage = await prepare(
            body, lambda name: engine.chat_prompt(name, messages), "messages")
        if body.stream:
            return event_stream(chat_chunks(engine.open_stream(request), request.model, prompt_tokens, include_usage))
        output = await engine.complete(request)
        choice = ChatChoice(message=AssistantMessage(content=output.text), finish_reason=output.finish_reason)
        return ChatCompletion(**_meta("chatcmpl", request.model), choices=[choice], usage=usage(prompt_tokens, output))

    @app.post("/v1/completions", response_model=Completion, dependencies=bearer, tags=["openai"],
              responses={**ERROR_RESPONSES, 200: stream_response(Completion)})
    async def completions(body: CompletionRequest):
        """Continue a raw prompt (no template); the answer is cut at the template's section markers."""
        text = completion_prompt(body.prompt)
        request, prompt_tokens, include_usage = await prepare(body, lambda name: text, "prompt")
        if body.stream:
            return event_stream(completion_chunks(engine.open_stream(request), request.model, prompt_tokens,
                                                  include_usage))
        output = await engine.complete(request)
        choice = CompletionChoice(text=output.text, finish_reason=output.finish_reason)
        return Completion(**_meta("cmpl", request.model), choices=[choice], usage=usage(prompt_tokens, output))
