"""OpenAI-compatible request and response models for the dgserve ingress.

Requests are strict: unknown fields are a 400, a short allow-list of harmless OpenAI fields is accepted and
ignored, vLLM's extension fields are accepted with vLLM's meaning (or, where a canvas sampler gives them none, only
at their neutral value), and features dgserve does not have (audio, penalties...) fail with a 400 that says why.
dgserve's diffusion extensions are ordinary optional fields, documented in the OpenAPI schema.
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
    model_validator,
)

_STRICT = ConfigDict(strict=True, extra="forbid")
IGNORED = "Accepted for OpenAI compatibility and ignored."
FinishReason = Literal["stop", "length", "tool_calls"]
MAX_N = 128  # choices per request (OpenAI's limit); each is a request of its own to the engine
TOP_CANDIDATES = 1024  # dgserve.model.generation_config.TOP_CANDIDATES (the routing layer sits above it)
MAX_LOGIT_BIAS = 64  # dgserve.model.generation_config.MAX_LOGIT_BIAS
_CANVAS_PENALTY = ("a canvas of tokens is sampled in parallel, so a penalty on tokens generated so far could only "
                   "see earlier canvases, not the tokens being denoised beside each other; dgserve accepts only ")


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
    continuous_usage_stats: bool | None = Field(
        None, description="vLLM extension: every chunk carries the `usage` so far (prompt tokens, and the "
        "completion tokens of the canvases committed up to that chunk).")
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
    top_p: float | None = Field(
        None, ge=0.0, le=1.0, description="Nucleus sampling, applied to every denoising step's distribution: each "
        "position samples among the most likely tokens whose probabilities sum to top_p (taken among its "
        f"{TOP_CANDIDATES} most likely tokens; 0 keeps only the most likely one). 1 (the default) is off.")
    top_k: int | None = Field(
        None, ge=-1, description=f"vLLM extension: sample each position among its top_k most likely tokens (at most "
        f"{TOP_CANDIDATES}); 0 or -1 (the default) is off. 1 equals greedy denoising at every step.")
    min_p: float | None = Field(
        None, ge=0.0, le=1.0, description="vLLM extension: drop tokens less likely than min_p times the most likely "
        "token of the position, at every denoising step. 0 (the default) is off.")
    n: int = Field(1, ge=1, le=MAX_N, description="How many choices to generate (each a sample of its own, with a "
                   "seed derived from `seed` when given, so a seeded request stays reproducible); usage sums them.")
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
    presence_penalty: Annotated[float | None, _require(lambda v: not v, "presence_penalty is not supported: "
                                                         + _CANVAS_PENALTY + "0")] = Field(
        None, ge=-2.0, le=2.0, description="Only 0 (or unset) is accepted: a canvas is sampled in parallel.")
    frequency_penalty: Annotated[float | None, _require(lambda v: not v, "frequency_penalty is not supported: "
                                                          + _CANVAS_PENALTY + "0")] = Field(
        None, ge=-2.0, le=2.0, description="Only 0 (or unset) is accepted: a canvas is sampled in parallel.")
    repetition_penalty: Annotated[float | None, _require(lambda v: v in (None, 1.0), "repetition_penalty is not "
                                                           "supported: " + _CANVAS_PENALTY + "1.0")] = Field(
        None, gt=0.0, description="vLLM extension; only 1.0 (or unset) is accepted: a canvas is sampled in parallel.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> bias in [-100, 100] added to that "
        "token's logit at every denoising step, before temperature (-100 removes the token). At most "
        f"{MAX_LOGIT_BIAS} entries.")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: EOS and padding are not sampled, and stop strings "
                            "do not end the text, before this many completion tokens.")
    skip_special_tokens: bool = Field(True, description="vLLM extension: leave special tokens out of the text (pad "
                                      "ids and EOS never reach it).")
    include_stop_str_in_output: bool = Field(False, description="vLLM extension: a stop string that ends the text is "
                                             "kept at its end.")
    reasoning_effort: Annotated[str | None, _require(lambda v: v in (None, "none"), "reasoning_effort is not "
                                                      "supported: DiffusionGemma's canvases have no reasoning budget "
                                                      "dgserve controls; leave it unset or 'none'")] = Field(
        None, description="Only 'none' (or unset) is accepted.")

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
    ignore_eos: bool = Field(False, description="dgserve and vLLM extension (benchmarks): generate max_tokens "
                             "tokens of output: generation goes on past end-of-sequence, and neither EOS nor "
                             "padding is sampled (a canvas' padding is not output).")
    stream_drafts: bool = Field(
        False, description="dgserve extension, needs `stream: true`. Also stream provisional snapshots of the "
        "canvas being denoised as `event: draft` SSE events (see the text/event-stream response). Drafts are "
        "never part of the committed text.")
    draft_every: int | None = Field(
        None, ge=1, le=1024, description="dgserve extension, needs `stream_drafts: true`. Send a draft every "
        "this many denoising steps (server default if unset).")

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, v: int | None) -> int | None:
        if v is not None and v > TOP_CANDIDATES:
            raise ValueError(f"top_k is {v}; dgserve samples among at most the {TOP_CANDIDATES} most likely tokens of "
                             "a position: use a top_k of at most that, or 0 to turn it off")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids written as strings; {key!r} is not one")
        return v

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
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def token_bias(self) -> dict[int, float] | None:
        return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def _prompt_list(v: Any) -> Any:
    if isinstance(v, list) and not v:
        raise ValueError("prompt must not be an empty list")
    if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
        raise ValueError("a prompt of the list is an empty list of token ids")
    return v


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_GenerationFields):
    """POST /v1/completions."""

    prompt: Annotated[Text | list[Text] | TokenIds | list[TokenIds], AfterValidator(_prompt_list)] = Field(
        description="A string, a list of token ids, or a list of either (a batch: one choice per prompt, times n, "
        "with index = prompt index x n + sample).")
    echo: bool = Field(False, description="Put the prompt's text before each choice's text.")
    suffix: Annotated[str | None, _unsupported("suffix (insertion)")] = Field(None, description="Not supported.")
    best_of: Annotated[int | None, _require(lambda v: v in (None, 1), "best_of > 1 is not supported: send n "
                                            "and pick among the choices")] = Field(None, description="Only 1.")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Return each generated token's log-probability under the distribution of the "
        "denoising step that accepted it (see the API description), and this many most likely alternatives of "
        "that step.")

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("echo"):
            raise ValueError("logprobs with echo would need the prompt tokens' log-probabilities, which a "
                             "block-diffusion model does not define (its encoder writes the KV cache, it predicts "
                             "nothing): send echo or logprobs, not both")
        return v

    @property
    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompts of the batch, in order."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return [x if isinstance(x, str) else list(x) for x in p]  # type: ignore[union-attr]


def _text_and_image_parts(v: Any) -> Any:
    if isinstance(v, dict) and v.get("type") not in ("text", "image_url"):
        raise ValueError(f"content parts of type {v.get('type')!r} are not supported: send text parts "
                         "({\"type\": \"text\", \"text\": ...}) and image_url parts ({\"type\": \"image_url\", "
                         "\"image_url\": {\"url\": \"data:image/png;base64,...\"}})")
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


class FunctionCall(BaseModel):
    model_config = _STRICT

    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments as a JSON object, in a string (as OpenAI sends them).")


class ToolCall(BaseModel):
    model_config = _STRICT

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="`developer` is treated as `system`; `tool` carries the result of an assistant's tool call "
        "(`tool_call_id` names it).")
    content: Text | list[Annotated[TextPart | ImagePart, Field(discriminator="type"),
                                  BeforeValidator(_text_and_image_parts)]] | None = Field(
        None, description="A string or a list of text parts (joined with newlines) and image_url parts (on a model "
        "with a vision tower; the server's limits on images per request, pixels and bytes apply). Audio and "
        "file parts are a 400. May be null only on an assistant message with tool_calls.")
    name: str | None = Field(None, description=IGNORED)
    refusal: str | None = Field(None, description=IGNORED)
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant message's calls of the request's tools.")
    tool_call_id: str | None = Field(None, description="A tool message's: the id of the call it answers.")

    @model_validator(mode="after")
    def _tool_messages_name_their_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError(f"tool_call_id belongs on tool messages, not {self.role!r} ones")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def image_parts(self) -> list[tuple[int, ImagePart]]:
        """(index in content, part) of each image part."""
        if not isinstance(self.content, list):
            return []
        return [(j, p) for j, p in enumerate(self.content) if isinstance(p, ImagePart)]

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it: text joined into a string; with images, a list of text parts
        and one ``{"type": "image"}`` part per image, in order. (Tool calls and tool results: ``tool_calls``.)"""
        role = "system" if self.role == "developer" else self.role
        if not self.image_parts:
            return {"role": role, "content": self.text}
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                 for p in self.content]  # type: ignore[union-attr]
        return {"role": role, "content": parts}


class FunctionDefinition(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments (an object).")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema the output follows.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema {name, schema}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema belongs to response_format type json_schema, not {self.type!r}")
        return self


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, rendered with the "
                                        "checkpoint's chat template.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens (OpenAI's newer name).")
    logprobs: bool = Field(False, description="Return each generated token's log-probability under the distribution "
                           "of the denoising step that accepted it (see the API description).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many most likely "
                                     "alternatives of that step per token.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call, rendered into the prompt by the "
                                     "checkpoint's chat template (DiffusionGemma: Gemma 4's tool format); its calls "
                                     "come back as `tool_calls`.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" (the default with tools): the model chooses; "none": no calls; "required" or a '
        "named function: the output is a call, generated under the function's parameters schema (constrained "
        "denoising, see response_format).")
    parallel_tool_calls: bool | None = Field(None, description=IGNORED)
    functions: Annotated[list[dict[str, Any]] | None, _unsupported("functions (deprecated; send tools)")] = Field(
        None, description="Not supported: send tools.")
    function_call: Annotated[str | dict[str, Any] | None, _require(
        lambda v: v in (None, "none"), "function_call is not supported (deprecated; send tool_choice)")] = Field(
        None, description="Not supported: send tool_choice.")
    response_format: ResponseFormat | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}: '
        "the output is JSON (valid for the schema), through constrained denoising: each position is sampled "
        "among the tokens the grammar allows after the tokens before it, and a step accepts only a contiguous "
        "left-to-right run of confident positions. Schema keywords dgserve cannot enforce are a 400.")
    add_generation_prompt: bool = Field(True, description="vLLM extension: end the rendered chat with the model "
                                        "turn's opening.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM extension: extra variables for the chat template (e.g. enable_thinking).")
    modalities: Annotated[list[str] | None, _require(
        lambda v: v is None or set(v) <= {"text"}, "only the text modality is supported")] = Field(
        None, description='Only ["text"] is accepted.')
    audio: Annotated[dict[str, Any] | None, _unsupported("audio output")] = Field(None, description="Not supported.")
    prediction: Annotated[dict[str, Any] | None, _unsupported("prediction")] = Field(
        None, description="Not supported.")
    prompt_cache_key: str | None = Field(None, description=IGNORED + " (dgserve caches prompt prefixes itself.)")
    safety_identifier: str | None = Field(None, description=IGNORED)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_template_variables(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(v or {})
        if reserved:
            raise ValueError(f"chat_template_kwargs cannot set {sorted(reserved)}: send them as request fields")
        return v

    @field_validator("messages")
    @classmethod
    def _tool_messages_follow_calls(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        calls: set[str] = set()
        for i, m in enumerate(v):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise ValueError(f"messages[{i}]: content may be null only on an assistant message with tool_calls")
            if m.tool_calls and m.role != "assistant":
                raise ValueError(f"messages[{i}]: only assistant messages have tool_calls")
            calls |= {c.id for c in m.tool_calls or []}
            if m.role == "tool" and m.tool_call_id not in calls:
                raise ValueError(f"messages[{i}]: tool_call_id {m.tool_call_id!r} names no earlier assistant tool call")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, v: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if v in ("required",) and not tools:
            raise ValueError('tool_choice "required" needs tools')
        if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {v.function.name!r}, which is not among the request's tools")
        return v

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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: per generated token its text, log-probability, top alternatives and
    character offset in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


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
                                "but the last, which has empty choices (with continuous_usage_stats: the usage so "
                                "far on every chunk).")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float = Field(description="Under the distribution of the denoising step that accepted the token.")
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _no_empty_tool_calls(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends {"role": ..., "content": ""} first, then {"content": ...}, then {} with the finish_reason.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a /v1/chat/completions stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="Only with stream_options.include_usage: null on every chunk "
                                "but the last, which has empty choices (with continuous_usage_stats: the usage so "
                                "far on every chunk).")


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
