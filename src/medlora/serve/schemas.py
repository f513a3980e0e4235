"""OpenAI's request and response schemas, the subset `medlora serve` answers (pydantic models)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4


def _valid_text(value: str) -> str:
    """Refuse a lone surrogate (JSON `"\\ud800"` without its pair): not text, and tokenizers crash on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"unpaired surrogate at character {exc.start + 1}: not valid text") from None
    return value


Text = Annotated[str, AfterValidator(_valid_text)]  # every string a request carries


class _Lenient(BaseModel):
    """Unknown fields (user, metadata, ...) are accepted and ignored; those that ask for what this server does not do
    are declared and refused (NOT_HONOURED)."""

    model_config = ConfigDict(extra="ignore")


# OpenAI fields this server does not honour, each with the values that ask for nothing more than it does (absent or
# the default). Any other value is refused with a 400 naming the field (medlora.serve.api.refuse_not_honoured),
# rather than answered as if the field had not been sent.
NOT_HONOURED = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
                "echo": (None, False), "suffix": (None, "")}


def _not_honoured(name: str, what: str):
    accepted = " or ".join(json.dumps(value) for value in NOT_HONOURED[name][1:])
    return Field(None, description=f"{what}: not supported, so anything but {accepted} (or leaving it out) is "
                                   f"refused with 400")


class TextPart(_Lenient):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(_Lenient):
    role: Text = Field(description="system (or developer), user or assistant")
    content: Text | list[TextPart] | None = Field(None, description="the text, or a list of text parts")


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, description="send a last chunk with token usage before [DONE]")


class SamplingFields(_Lenient):
    model: Text = Field(description="a served model id (see GET /v1/models); `base` is the base model")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (1 to the server's cap)")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False,
                                      description="0 or absent: greedy; above 0: sampling")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                description="nucleus sampling threshold, with temperature > 0")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False,
                                            description="subtracted from a token's logit per time the answer already "
                                                        "holds it (the prompt is not counted)")
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False,
                                           description="subtracted from the logit of every token the answer already "
                                                       "holds")
    stop: Text | list[Text] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} strings that end the answer")
    n: int | None = _not_honoured("n", "number of answers")
    seed: int | None = Field(None, ge=-2**63, lt=2**64,
                             description="with temperature > 0, the same seed gives the same answer to the same "
                                         "request (a seeded request is answered alone, not batched with others)")
    stream: bool = Field(False, description="answer as server-sent events ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, ending with a user message")
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens; wins if both")
    logprobs: bool | None = _not_honoured("logprobs", "log probabilities of the answer's tokens")
    top_logprobs: int | None = _not_honoured("top_logprobs", "the most likely tokens at each position")


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] = Field(description="the raw prompt (no template applied); a list must hold one string")
    logprobs: int | None = _not_honoured("logprobs", "log probabilities of the most likely tokens")
    echo: bool | None = _not_honoured("echo", "the prompt before the answer")
    suffix: Text | None = _not_honoured("suffix", "text after the answer")
    best_of: int | None = _not_honoured("best_of", "answers to choose the best of")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


KNOWLEDGE_FIELD = ("medlora's own: the knowledge-base entries retrieved for the last user message "
                   "({diseases, attribute, facts: [{disease, attribute, items}], matches: [{disease, why, score, possible}], "
                   "flags: [red flag]}: why each entry matched, whether it is only a possibility to check with a "
                   "doctor, and the clinical red flags the message shows); absent when "
                   "knowledge is off")


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
    medlora_knowledge: dict | None = Field(default=None, description=KNOWLEDGE_FIELD)


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
    medlora_knowledge: dict | None = Field(default=None, description=KNOWLEDGE_FIELD + " (first chunk only)")


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
    generate_calls: int = Field(description="batch loops that answered them (a loop takes in every request for its "
                                                "model that arrives while it runs)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "invalid request, empty or too long prompt, max_tokens out of bounds, a field this server does not honour",
    401: "missing or wrong API key", 404: "unknown model", 413: "request body too large",
    503: "queue full or shutting down"}.items()}
