"""Request bodies (validated by pydantic: a wrong type or an unknown field is a 400 naming the field).

The OpenAI fields lmforge cannot honour (n > 1, logprobs, presence/frequency penalties, echo) are
accepted only at their neutral values, so a client that sets them learns so instead of being ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


class RequestError(ValueError):
    """A request that cannot be served as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def unsupported(message: str) -> AfterValidator:
    """A field lmforge cannot honour: accepted only unset (null, false, empty), else refused with `message`."""

    def neutral(value):
        if value:
            raise ValueError(message)
        return value

    return AfterValidator(neutral)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _unicode(cls, v):
        """JSON may escape a lone surrogate ("\\ud800"), which is no Unicode text: refuse it here, not fail later."""
        for text in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("holds a lone surrogate escape (\\ud800-\\udfff), which is not text") from None
        return v


class SamplingFields(Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # lmforge/vLLM extra: no end-of-text before this many tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    # OpenAI's nullable fields take null as "the default"
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = 1
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logprobs: Annotated[bool | int | None, unsupported("logprobs are not supported")] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(len(s) > 100 for s in stops):
            raise ValueError("stop strings are at most 100 characters")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v not in (None, 0):
            raise ValueError("not supported; use repetition_penalty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: Annotated[bool | None, unsupported("echo is not supported")] = False
    suffix: Annotated[
        str | None, unsupported("suffix (text to insert before) is not supported: the model only continues text")
    ] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string or a list of one string)")
            v = v[0]
        if not v:
            raise ValueError("prompt is empty")
        return v


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    context: str | None = None  # lmforge extra: the passage to answer from (else: the system messages)
    max_completion_tokens: int | None = Field(None, ge=1)
    # lmforge extra: "sample" generates with the sampling fields; "span" answers with the passage span the
    # model finds likeliest (as `lmforge eval` with eval.decoding = "span"), which needs a context
    decoding: Literal["sample", "span"] = "sample"

    def question(self) -> str:
        """The last non-empty user message (the model answers single questions, not conversations)."""
        for m in reversed(self.messages):
            if m.role == "user" and m.text().strip():
                return m.text().strip()
        raise RequestError("messages: needs a user message with the question", "messages")

    def context_text(self) -> str | None:
        """The extra `context` field, else the system/developer messages joined."""
        if self.context is not None:
            return self.context.strip() or None
        system = "\n".join(m.text() for m in self.messages if m.role in ("system", "developer")).strip()
        return system or None


class AttentionRequest(Strict):
    text: str | None = None
    question: str | None = None  # instead of text: the QA prompt built from question (+ context)
    context: str | None = None
    completion: str | None = None  # generated text whose "input focus" over the prompt words is wanted
    # with question: how the chat answer was made, so the prompt is the one it was made from
    decoding: Literal["sample", "span"] = "sample"
    max_tokens: int | None = Field(None, ge=1)
    model: str | None = None
    discount_first: bool = False
    log_scale: bool = False
    normalize: bool = False

    def check(self) -> None:
        if (self.text is None) == (self.question is None):
            raise RequestError("give either text or question (with optional context)", "text")


class CheckpointRequest(Strict):
    checkpoint: str = Field(min_length=1)
