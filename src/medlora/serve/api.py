"""OpenAI-compatible HTTP API over the serving engine (`medlora.serve.engine`).

Layout, top to bottom: from a request to a `GenerationRequest`; server-sent events; errors as OpenAI JSON; the
guard middleware (API key, body size, before FastAPI parses anything); `create_app` and its routes.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlora.config import GenerationArgs
from medlora.errors import MedloraError
from medlora.serve.engine import (APIError, Engine, GenerationRequest, Output, ServeSettings, TextStream,
                                  required_text)
from medlora.serve.schemas import (ERROR_RESPONSES, MAX_STOP_STRINGS, NOT_HONOURED, AssistantMessage, ChatChoice,
                                   ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                                   ChatDelta, Completion, CompletionChoice, CompletionRequest, Health, ModelCard,
                                   ModelList, Usage, SamplingFields)

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


# --- from a request to a GenerationRequest -----------------------------------------------------------------

def refuse_not_honoured(body: SamplingFields) -> None:
    """A 400 naming the first field that asks for what this server does not do (schemas.NOT_HONOURED)."""
    for name, accepted in NOT_HONOURED.items():
        value = getattr(body, name, None)  # each endpoint declares only its own
        if value not in accepted:
            shown = json.dumps(value, ensure_ascii=False)
            shown = shown if len(shown) <= 40 else shown[:39] + "…"
            raise APIError(400, f"{name}={shown} is not supported by this server; leave {name} out", param=name,
                           code="unsupported_value")


def generation_args(body: SamplingFields, settings: ServeSettings) -> GenerationArgs:
    """Greedy unless temperature > 0 (greedy answers with the server's --urgent_threshold); max_tokens within
    [1, cap]."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_cap:
        raise APIError(400, f"max_tokens is {max_tokens}, over this server's cap of {settings.max_tokens_cap}",
                       param="max_tokens", code="max_tokens_exceeded")
    penalties = {"frequency_penalty": body.frequency_penalty or 0.0, "presence_penalty": body.presence_penalty or 0.0}
    if not body.temperature:
        return GenerationArgs(max_new_tokens=max_tokens, urgent_threshold=settings.urgent_threshold, **penalties)
    top_p = 1.0 if body.top_p is None else body.top_p
    return GenerationArgs(max_new_tokens=max_tokens, do_sample=True, temperature=body.temperature, top_p=top_p,
                          top_k=0, **penalties)  # top_k=0: no top-k cut, as in OpenAI's API


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop", code="unsupported_value")
    return tuple(s for s in stops if s)


def check_prompt_length(prompt_tokens: int, max_tokens: int, settings: ServeSettings, context: int | None,
                        param: str) -> None:
    if prompt_tokens > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, over this server's limit of "
                            f"{settings.max_prompt_tokens}", param=param, code="context_length_exceeded")
    if context and prompt_tokens + max_tokens > context:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                            f"context of {context} tokens", param=param, code="context_length_exceeded")


def completion_prompt(prompt: str | list[str]) -> str:
    if not isinstance(prompt, str) and len(prompt) != 1:
        raise APIError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt",
                       code="unsupported_value")
    return required_text(prompt if isinstance(prompt, str) else prompt[0], "the prompt", "prompt")


def usage(prompt_tokens: int, output: Output) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=output.completion_tokens,
                 total_tokens=prompt_tokens + output.completion_tokens)


def _meta(prefix: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}


# --- server-sent events ------------------------------------------------------------------------------------

async def chat_chunks(stream: TextStream, model: str, prompt_tokens: int, include_usage: bool,
                      knowledge: dict | None = None) -> AsyncIterator[BaseModel]:
    meta = _meta("chatcmpl", model)
    yield ChatCompletionChunk(**meta, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))],
                              medlora_knowledge=knowledge)
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
            absent = {"medlora_knowledge"} if getattr(chunk, "medlora_knowledge", None) is None else None
            yield {"data": chunk.model_dump_json(exclude=absent)}
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
    """The first schema violation as a 400 (OpenAI answers 400, not 422, for malformed requests); a violation that a
    value check found (an unpaired surrogate) comes before the type mismatches of a union's other branches."""
    errors = exc.errors() or [{}]
    first = next((error for error in errors if error.get("type") == "value_error"), errors[0])
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
    async def prepare(body: SamplingFields, build_prompt: Callable[[str], tuple], param: str):
        """The queued request, its prompt's token count, whether usage is streamed, and the knowledge found."""
        name = engine.resolve(body.model)
        refuse_not_honoured(body)
        gen = generation_args(body, settings)
        stops = stop_strings(body.stop)
        seed = body.seed if gen.do_sample else None  # a greedy answer is reproducible without one: batch it

        def prompt_and_count():  # tokenising a long prompt (and retrieval) is CPU work: off the event loop
            prompt, found = build_prompt(name)
            return prompt, found, engine.count_tokens(name, prompt)

        prompt, found, prompt_tokens = await run_in_threadpool(prompt_and_count)
        check_prompt_length(prompt_tokens, gen.max_new_tokens, settings, engine.context_length, param)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        knowledge = found.to_dict() if found is not None else None
        return GenerationRequest(name, prompt, gen, stops, seed), prompt_tokens, include_usage, knowledge

    @app.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True,
              dependencies=bearer, tags=["openai"],
              responses={**ERROR_RESPONSES, 200: stream_response(ChatCompletionChunk)})
    async def chat_completions(body: ChatCompletionRequest):
        """Answer a conversation; messages go through the model's prompt template (or its chat template)."""
        messages = [message.model_dump() for message in body.messages]
        request, prompt_tokens, include_usage, knowledge = await prepare(
            body, lambda name: engine.chat_prompt(name, messages), "messages")
        if body.stream:
            return event_stream(chat_chunks(engine.open_stream(request), request.model, prompt_tokens, include_usage,
                                            knowledge))
        output = await engine.complete(request)
        choice = ChatChoice(message=AssistantMessage(content=output.text), finish_reason=output.finish_reason)
        return ChatCompletion(**_meta("chatcmpl", request.model), choices=[choice], usage=usage(prompt_tokens, output),
                              medlora_knowledge=knowledge)

    @app.post("/v1/completions", response_model=Completion, dependencies=bearer, tags=["openai"],
              responses={**ERROR_RESPONSES, 200: stream_response(Completion)})
    async def completions(body: CompletionRequest):
        """Continue a raw prompt (no template); the answer is cut at the template's section markers."""
        text = completion_prompt(body.prompt)
        request, prompt_tokens, include_usage, _ = await prepare(body, lambda name: (text, None), "prompt")
        if body.stream:
            return event_stream(completion_chunks(engine.open_stream(request), request.model, prompt_tokens,
                                                  include_usage))
        output = await engine.complete(request)
        choice = CompletionChoice(text=output.text, finish_reason=output.finish_reason)
        return Completion(**_meta("cmpl", request.model), choices=[choice], usage=usage(prompt_tokens, output))
