"""The request bodies the API accepts, as OpenAI defines them, and the ``knowstream`` extension.

Only shapes and types are checked here; ranges and limits (temperature, max_tokens, k, an empty
question...) are the infer service's to check, so there is one rule and one message for gRPC
and HTTP callers. Fields of OpenAI's API that have no meaning here (seed, penalties...) are
accepted and ignored, as vLLM does; ones that would change the answer's shape and cannot be
honoured (n > 1, logprobs, tools, echo, suffix) are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domains: list[str] = []
    sources: list[str] = []
    doc_ids: list[str] = []


class Options(BaseModel):
    """``knowstream: {...}`` in a completion request: what an AskRequest has beyond OpenAI's."""

    model_config = ConfigDict(extra="forbid")

    retrieval: bool = True
    # Passages retrieved as evidence; 0 = the service default (as in AskRequest.k).
    k: int = Field(0, ge=0)
    template: str = ""
    # Score mode: answer with the most likely of these (e.g. yes/no/maybe).
    candidates: list[str] = []
    filters: Filters | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class GenerationRequest(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The caller id canary routing is sticky on (AskRequest.caller).
    user: str | None = None
    knowstream: Options = Options()

    @model_validator(mode="after")
    def _one_choice(self) -> GenerationRequest:
        if self.n != 1:
            raise ValueError("n must be 1: one answer per request")
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        return self


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt must be one string (one answer per request)")
        if self.echo or self.suffix or self.logprobs:
            raise ValueError("echo, suffix and logprobs are not supported")
        return self


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
