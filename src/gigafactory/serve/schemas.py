"""Request bodies of the OpenAI API, strictly typed.

Strict means: no coercion (`"stream": "yes"` and `"max_tokens": true` are refused), text must be valid
Unicode (a lone UTF-16 surrogate such as `"\\ud800"` is refused), unknown fields are refused, and the OpenAI
fields this server does not implement (tools, audio, `suffix`, ...) are refused with the code
`unsupported_parameter` naming the field, rather than silently ignored. A field sent as `null` counts as
absent, as OpenAI treats it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 8
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's bound)
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs (OpenAI's bound)
MAX_LOGIT_BIAS = 300  # entries
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def _valid_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_text", "contains a lone UTF-16 surrogate; send valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_valid_text)]


def _refuse_unsupported(data: Any, unsupported: dict[str, str]) -> Any:
    """Raise `unsupported_parameter` for the first field we do not implement that has a non-null value."""
    if isinstance(data, dict):
        for name, why in unsupported.items():
            if data.get(name) is not None:
                raise PydanticCustomError(
                    "unsupported_parameter",
                    "'{field}' is not supported by this server: {why}",
                    {"field": name, "why": why},
                )
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


_MESSAGE_UNSUPPORTED = {
    "name": "participant names are not used; put the speaker in the text",
    "tool_calls": "this server has no tools",
    "tool_call_id": "this server has no tools",
    "function_call": "this server has no functions",
    "audio": "this server has no audio",
    "refusal": "refusals are not modelled",
}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("role") in ("tool", "function"):
                raise PydanticCustomError(
                    "unsupported_parameter",
                    "messages with role '{role}' are not supported: this server has no tools",
                    {"role": data["role"]},
                )
            content = data.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") not in (None, "text"):
                        raise PydanticCustomError(
                            "unsupported_parameter",
                            "content parts of type '{kind}' are not supported; send text",
                            {"kind": str(part.get("type"))[:40]},
                        )
        return _refuse_unsupported(data, _MESSAGE_UNSUPPORTED)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object"]

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") == "json_schema":
            raise PydanticCustomError(
                "unsupported_parameter", "response_format 'json_schema' is not supported; use 'json_object'"
            )
        return data


TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]


class Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: Text = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but common (vLLM): 0 = off
    min_p: float | None = Field(None, ge=0, le=1)  # not OpenAI's (vLLM): drop tokens below min_p * the top one
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Text | list[Text] | None = Field(None)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[TokenId, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: Text | None = Field(None, max_length=256)  # accepted: it only labels the caller
    ignore_eos: bool | None = False  # keep going past the end-of-text token (benchmarks)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @model_validator(mode="after")
    def _check(self) -> Sampling:
        if len(self.stops()) > MAX_STOPS:
            raise PydanticCustomError("invalid_value", "at most {n} stop sequences", {"n": MAX_STOPS})
        for value in (self.logit_bias or {}).values():
            if not -100 <= value <= 100:
                raise PydanticCustomError("invalid_value", "logit_bias values must be between -100 and 100")
        return self


_CHAT_UNSUPPORTED = {
    "tools": "this server has no tools",
    "tool_choice": "this server has no tools",
    "parallel_tool_calls": "this server has no tools",
    "functions": "this server has no functions",
    "function_call": "this server has no functions",
    "modalities": "this server produces text only",
    "audio": "this server produces text only",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "this server has no web search",
    "reasoning_effort": "the personas do not reason",
    "store": "completions are not stored",
    "metadata": "completions are not stored",
    "service_tier": "there is a single tier",
}


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    greeting: int | None = Field(None, ge=0, le=1000)  # which of a card's greetings opens the chat

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _refuse_unsupported(data, _CHAT_UNSUPPORTED)

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs: true")
        return self

    def wanted_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's plus the k most likely ones."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def json_mode(self) -> bool:
        return self.response_format is not None and self.response_format.type == "json_object"


_COMPLETION_UNSUPPORTED = {
    "suffix": "insertion (fill in the middle) is not implemented",
    "best_of": "server-side best-of is not implemented; use n and pick",
}


class CompletionRequest(Sampling):
    prompt: Text | list[Text]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("best_of") in (1,) and data.get("n") in (None, 1):
            data = {k: v for k, v in data.items() if k != "best_of"}  # best_of 1 is plain sampling
        if isinstance(data, dict) and isinstance(data.get("prompt"), list):
            if any(isinstance(p, int | list) for p in data["prompt"]):
                raise PydanticCustomError(
                    "unsupported_parameter", "token-id prompts are not supported; send the prompt as text"
                )
        return _refuse_unsupported(data, _COMPLETION_UNSUPPORTED)

    @model_validator(mode="after")
    def _check_prompts(self) -> CompletionRequest:
        if not 1 <= len(self.prompts()) * (self.n or 1) <= MAX_N:
            raise PydanticCustomError("invalid_value", "between 1 and {n} prompts × n", {"n": MAX_N})
        return self

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
