"""OpenAI-compatible request and response models for the dgserve ingress.

Requests are strict: unknown fields are a 400, a short allow-list of harmless OpenAI fields is accepted and
ignored, and OpenAI features dgserve does not have (n > 1, logprobs, tools, audio...) fail with a 400 that
says so. dgserve's diffusion extensions are ordinary optional fields, documented in the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
)

_STRICT = ConfigDict(strict=True, extra="forbid")
IGNORED = "Accepted for OpenAI compatibility and ignored."
FinishReason = Literal["stop", "length"]


def _require(ok: Callable[[Any], bool], message: str) -> AfterValidator:
    """A validator that rejects a value with ``message`` unless ``ok(value)``."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _unsupported(feature: str) -> AfterValidator:
    return _require(lambda v: not v, f"{feature} is not supported by dgserve; leave it unset")


def _unicode_text(value: str) -> str:
    # JSON can carry "\ud800", a lone UTF-16 surrogate: a Python str, but not Unicode text a tokenizer can take
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone UTF-16 surrogate (\\u{ord(value[exc.start]):04x} at character "
                         f"{exc.start}), which is not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


# --------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool | None = Field(
        None, description="Send one extra chunk before `data: [DONE]` with empty `choices` and the `usage`; "
        "every other chunk then carries `usage: null`.")
    include_obfuscation: bool | None = Field(None, description=IGNORED)


class _GenerationFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then dgserve's)."""

    model_config = _STRICT

    model: Text = Field(description="The served model id (see GET /v1/models); any other id is a 404.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate. Default: the server's default_max_tokens, or what "
        "is left of the context window. prompt + max_tokens over the context window is a 400.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description=(
        "Scales the diffusion sampler's temperature schedule: each denoising step samples at a temperature "
        "annealed from `t_max` down to `t_min` (checkpoint defaults 0.8 -> 0.4); `temperature` multiplies both "
        "ends, so 1.0 (the default) is the checkpoint's schedule and 0.5 halves it. 0 is greedy denoising: "
        "every step takes the argmax instead of a sample (positions are still accepted by the entropy bound "
        "at the checkpoint's schedule, and the rest renoised with random tokens drawn from `seed`, 0 when "
        "unset), so the output is deterministic. Cannot be combined with explicit `t_max`/`t_min`."))
    top_p: Annotated[
        float | None,
        _require(lambda v: v is None or v == 1.0, "top_p < 1 is not supported: the entropy-bound sampler "
                 "samples from the full distribution; use `temperature` or `entropy_bound` instead"),
    ] = Field(None, ge=0.0, le=1.0, description="Only 1.0 (or unset) is accepted: the diffusion sampler has "
              "no nucleus truncation.")
    n: Annotated[int | None, _require(lambda v: v in (None, 1), "n > 1 is not supported: send n requests")] = (
        Field(None, ge=1, description="Only 1 is supported."))
    stream: bool = Field(False, description="Stream Server-Sent Events (see the text/event-stream response).")
    stream_options: StreamOptions | None = Field(None, description="Only allowed with `stream: true`.")
    stop: Annotated[
        Text | Annotated[list[Text], Field(max_length=16)] | None,
        _require(lambda v: v is None or all(v if isinstance(v, list) else [v]), "stop strings must not be empty"),
    ] = Field(None, description="Up to 16 stop strings; the text is cut before the first one.")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Seeds the diffusion sampler: the same seed, prompt and parameters "
        "give the same output.")
    user: str | None = Field(None, description=IGNORED)
    metadata: dict[str, str] | None = Field(None, description=IGNORED)
    store: bool | None = Field(None, description=IGNORED + " Nothing is stored.")
    service_tier: str | None = Field(None, description=IGNORED)
    presence_penalty: Annotated[float | None, _require(lambda v: not v, "presence_penalty is not supported")] = (
        Field(None, description="Only 0 (or unset) is accepted."))
    frequency_penalty: Annotated[float | None, _require(lambda v: not v, "frequency_penalty is not supported")] = (
        Field(None, description="Only 0 (or unset) is accepted."))
    logit_bias: Annotated[dict[str, float] | None, _unsupported("logit_bias")] = Field(
        None, description="Only empty (or unset) is accepted.")

    # dgserve extensions: the diffusion sampler (defaults from the checkpoint's generation_config.json)
    entropy_bound: float | None = Field(
        None, gt=0.0, description="dgserve extension. Entropy budget per denoising step: positions are accepted, "
        "lowest entropy first, while their summed entropy stays under this bound. Larger = more tokens per "
        "step (faster), smaller = more careful.")
    max_denoising_steps: int | None = Field(
        None, ge=1, le=1024, description="dgserve extension. Most denoising steps per canvas.")
    t_max: float | None = Field(
        None, ge=0.0, description="dgserve extension. Sampling temperature of the first denoising step.")
    t_min: float | None = Field(
        None, ge=0.0, description="dgserve extension. Sampling temperature of the last denoising step "
        "(must be below t_max).")
    ignore_eos: bool = Field(False, description="dgserve extension. Keep generating past end-of-sequence "
                             "(benchmarks).")
    stream_drafts: bool = Field(
        False, description="dgserve extension, needs `stream: true`. Also stream provisional snapshots of the "
        "canvas being denoised as `event: draft` SSE events (see the text/event-stream response). Drafts are "
        "never part of the committed text.")
    draft_every: int | None = Field(
        None, ge=1, le=1024, description="dgserve extension, needs `stream_drafts: true`. Send a draft every "
        "this many denoising steps (server default if unset).")

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("t_max", "t_min")
    @classmethod
    def _schedule_or_temperature(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("temperature") is not None:
            raise ValueError(f"give either temperature or {info.field_name}, not both (temperature scales the "
                             "t_max -> t_min schedule)")
        return v

    @field_validator("stream_drafts")
    @classmethod
    def _drafts_need_stream(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not info.data.get("stream"):
            raise ValueError("stream_drafts needs stream: true (drafts are only sent on a stream)")
        return v

    @field_validator("draft_every")
    @classmethod
    def _draft_every_needs_drafts(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("stream_drafts"):
            raise ValueError("draft_every needs stream_drafts: true")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def _one_prompt(v: str | list[str] | list[int]) -> str | list[str] | list[int]:
    if isinstance(v, list):
        if not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v[0], str) and len(v) > 1:
            raise ValueError(f"batched prompts ({len(v)} strings) are not supported: send one request per prompt")
    return v


class CompletionRequest(_GenerationFields):
    """POST /v1/completions."""

    prompt: Annotated[Text | list[Text] | list[Annotated[int, Field(ge=0)]], AfterValidator(_one_prompt)] = Field(
        description="A string, a list holding one string, or a list of token ids.")
    echo: Annotated[bool | None, _unsupported("echo")] = Field(None, description="Only false is accepted.")
    suffix: Annotated[str | None, _unsupported("suffix (insertion)")] = Field(None, description="Not supported.")
    best_of: Annotated[int | None, _require(lambda v: v in (None, 1), "best_of > 1 is not supported")] = Field(
        None, description="Only 1 is supported.")
    logprobs: Annotated[int | None, _require(lambda v: v is None, "logprobs are not supported by dgserve")] = (
        Field(None, description="Not supported: leave unset."))

    @property
    def prompt_input(self) -> str | list[int]:
        """The prompt as text or token ids (a one-string list unwrapped)."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


def _text_and_image_parts(v: Any) -> Any:
    if isinstance(v, dict) and v.get("type") not in ("text", "image_url"):
        raise ValueError(f"content parts of type {v.get('type')!r} are not supported: send text parts "
                         "({\"type\": \"text\", \"text\": ...}) and image_url parts ({\"type\": \"image_url\", "
                         "\"image_url\": {\"url\": \"data:image/png;base64,...\"}})")
    return v


def _no_tool_roles(v: Any) -> Any:
    if v in ("tool", "function"):
        raise ValueError(f"{v!r} messages are not supported: dgserve has no tool calling")
    return v


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: Text


class ImageURLField(BaseModel):
    model_config = _STRICT

    url: str = Field(min_length=1, description="A data:image/png|jpeg|webp;base64,... URL; http(s) URLs only where "
                     "the server's operator allows their host (off by default).")
    detail: Literal["auto", "low", "high"] | None = Field(None, description=IGNORED + " Every image is encoded at "
                                                           "the checkpoint's soft-token budget.")


class ImagePart(BaseModel):
    model_config = _STRICT

    type: Literal["image_url"]
    image_url: ImageURLField


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Annotated[Literal["system", "developer", "user", "assistant"], BeforeValidator(_no_tool_roles)] = Field(
        description="`developer` is treated as `system`.")
    content: Text | list[Annotated[TextPart | ImagePart, Field(discriminator="type"),
                                  BeforeValidator(_text_and_image_parts)]] = Field(
        description="A string or a list of text parts (joined with newlines) and image_url parts (on a model "
        "with a vision tower; the server's limits on images per request, pixels and bytes apply). Audio and "
        "file parts are a 400.")
    name: str | None = Field(None, description=IGNORED)
    refusal: str | None = Field(None, description=IGNORED)
    tool_calls: Annotated[list[dict[str, Any]] | None, _unsupported("tool_calls")] = Field(
        None, description="Only empty (or unset) is accepted.")

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def image_parts(self) -> list[tuple[int, ImagePart]]:
        """(index in content, part) of each image part."""
        if isinstance(self.content, str):
            return []
        return [(j, p) for j, p in enumerate(self.content) if isinstance(p, ImagePart)]

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it: text joined into a string; with images, a list of text parts
        and one ``{"type": "image"}`` part per image, in order."""
        role = "system" if self.role == "developer" else self.role
        if not self.image_parts:
            return {"role": role, "content": self.text}
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                 for p in self.content]  # type: ignore[union-attr]
        return {"role": role, "content": parts}


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, rendered with the "
                                        "checkpoint's chat template.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens (OpenAI's newer name).")
    logprobs: Annotated[bool | None, _unsupported("logprobs")] = Field(None, description="Only false is accepted.")
    top_logprobs: Annotated[int | None, _unsupported("top_logprobs")] = Field(None, description="Not supported.")
    tools: Annotated[list[dict[str, Any]] | None, _unsupported("tools (function calling)")] = Field(
        None, description="Only empty (or unset) is accepted.")
    tool_choice: Annotated[
        str | dict[str, Any] | None, _require(lambda v: v in (None, "none"), "tool_choice is not supported")
    ] = Field(None, description='Only "none" (or unset) is accepted.')
    parallel_tool_calls: bool | None = Field(None, description=IGNORED)
    functions: Annotated[list[dict[str, Any]] | None, _unsupported("functions")] = Field(
        None, description="Not supported.")
    function_call: Annotated[str | dict[str, Any] | None, _require(
        lambda v: v in (None, "none"), "function_call is not supported")] = Field(None, description="Not supported.")
    response_format: Annotated[dict[str, Any] | None, _require(
        lambda v: v is None or v == {"type": "text"}, "only response_format {\"type\": \"text\"} is supported"
    )] = Field(None, description='Only {"type": "text"} is accepted (no JSON mode).')
    modalities: Annotated[list[str] | None, _require(
        lambda v: v is None or set(v) <= {"text"}, "only the text modality is supported")] = Field(
        None, description='Only ["text"] is accepted.')
    audio: Annotated[dict[str, Any] | None, _unsupported("audio output")] = Field(None, description="Not supported.")
    prediction: Annotated[dict[str, Any] | None, _unsupported("prediction")] = Field(
        None, description="Not supported.")
    prompt_cache_key: str | None = Field(None, description=IGNORED + " (dgserve caches prompt prefixes itself.)")
    safety_identifier: str | None = Field(None, description=IGNORED)

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, v: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if v is not None and other is not None and other != v:
            raise ValueError(f"max_tokens ({other}) and max_completion_tokens ({v}) disagree; send one of them")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def image_urls(self) -> list[tuple[str, str]]:
        return image_urls(self.messages)


def image_urls(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(url, where) of every image part, in conversation order; ``where`` names the part for errors."""
    return [(part.image_url.url, f"messages[{i}].content[{j}]")
            for i, message in enumerate(messages) for j, part in message.image_parts]


# -------------------------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens served from dgserve's prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Generated tokens returned as text: up to EOS and at most "
                                   "max_tokens; pad ids the model generated are not counted.")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One `data:` event of a /v1/completions stream (OpenAI sends these with object "text_completion")."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="Only with stream_options.include_usage: null on every chunk "
                                "but the last, which has empty choices.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _set_fields_only(self) -> dict[str, str]:
        # OpenAI sends {"role": ..., "content": ""} first, then {"content": ...}, then {} with the finish_reason.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a /v1/chat/completions stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="Only with stream_options.include_usage: null on every chunk "
                                "but the last, which has empty choices.")


class Draft(BaseModel):
    text: str = Field(description="Provisional text of the canvas being denoised. It follows the committed text "
                      "so far and replaces the previous draft; it may change entirely and is NOT committed.")
    token_ids: list[int]
    step: int = Field(description="Denoising step this snapshot was taken after.")
    canvas_index: int = Field(description="Which canvas (0-based) is being denoised.")


class DraftPayload(BaseModel):
    draft: Draft


class DraftChunk(BaseModel):
    """A provisional canvas snapshot, sent as `event: draft` only when the request set stream_drafts.

    `choices` is always empty, so the official OpenAI clients (which yield it like a usage chunk) and any
    code that accumulates `choices[*].delta.content` / `choices[*].text` add nothing from a draft; browsers'
    EventSource delivers it only to an explicit "draft" listener. The payload is under `dgserve.draft`.
    """

    id: str
    object: Literal["chat.completion.chunk.draft", "text_completion.draft"]
    created: int
    model: str
    choices: list[Any] = Field(default_factory=list, max_length=0, description="Always empty.")
    dgserve: DraftPayload


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dgserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body, and the `data:` of an error event in a stream."""

    error: ErrorDetail
