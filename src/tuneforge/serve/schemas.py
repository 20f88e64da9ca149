"""Request and response bodies: the OpenAI fields clients send, validated, plus the task routes' shapes.

Requests refuse unknown fields (a typo is a 400 naming it, not a silently ignored option). Fields OpenAI
defines that tuneforge does not implement (``logprobs``, ``tools``, penalties...) are absent, so they are
refused by name too: what is accepted is what works.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AnswerItem", "AnswerRequest", "AnswerResponse", "ChatCompletion", "ChatCompletionRequest", "ChatMessage",
    "ClassifyItem", "ClassifyRequest", "ClassifyResponse", "Completion", "CompletionRequest", "EmbeddingRequest",
    "EmbeddingResponse", "LoadAdapterRequest", "ModelCard", "ModelList", "TagItem", "TagRequest", "TagResponse",
    "Usage",
]


Text = Annotated[str, Field(min_length=1)]
StopText = Annotated[str, Field(min_length=1, max_length=256)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _TextPart(_Request):
    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class ChatMessage(_Request):
    """One turn; ``developer`` is read as ``system``; content is text or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Decoding fields shared by chat and completions (greedy unless temperature > 0)."""

    model: str = Field(min_length=1, max_length=512, description="a name /v1/models lists")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (capped by the server)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy; > 0: sampling")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus mass when sampling")
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings that end generation (cut from the text)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed for sampling")
    n: int = Field(1, ge=1, description="choices to return (capped by the server)")
    stream: bool = Field(False, description="server-sent events ending 'data: [DONE]'")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="accepted and ignored")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop is at most 4 non-empty strings of at most 256 characters")
        return stops


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the run's chat template renders ``messages``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: raw text continued (no chat template)."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=64)] = Field(
        description="text, or a list of texts (one choice set each)")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or len(items) > 64 or any(not p for p in items):
            raise ValueError("prompt is a non-empty string or a list of 1 to 64 non-empty strings")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Message(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: _Message
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class _Inputs(_Request):
    model: str = Field(min_length=1, max_length=512)
    input: Text | Annotated[list[Text], Field(min_length=1)] = Field(description="a text or a list of texts")

    @field_validator("input")
    @classmethod
    def _texts(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or any(not t.strip() for t in items):
            raise ValueError("input is a non-empty text or a non-empty list of non-empty texts")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingRequest(_Inputs):
    """``POST /v1/embeddings``: mean of the last hidden states over the input's tokens."""

    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, max_length=256)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class ClassifyRequest(_Inputs):
    """``POST /v1/classify``: a classification run labels each text (``pairs``: second texts of pairs)."""

    pairs: list[str] | None = Field(None, description="second text of each pair (runs trained on pairs)")


class ClassifyItem(BaseModel):
    index: int
    label: str
    probabilities: dict[str, float] = Field(description="label -> probability")


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[ClassifyItem]


class TagRequest(_Inputs):
    """``POST /v1/tag``: a token-classification (NER) run tags the whitespace-separated words of each text."""


class Entity(BaseModel):
    text: str
    type: str
    start: int = Field(description="character offset where the entity starts")
    end: int = Field(description="character offset just after the entity")
    score: float


class TagItem(BaseModel):
    index: int
    tags: list[str] = Field(description="one tag per whitespace-separated word")
    entities: list[Entity]


class TagResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[TagItem]


class QAPair(_Request):
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)


class AnswerRequest(_Request):
    """``POST /v1/answer``: an extractive-QA run finds each question's answer span in its context."""

    model: str = Field(min_length=1, max_length=512)
    input: QAPair | list[QAPair]

    def items(self) -> list[QAPair]:
        return [self.input] if isinstance(self.input, QAPair) else list(self.input)


class AnswerItem(BaseModel):
    index: int
    text: str
    start: int
    end: int
    score: float


class AnswerResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[AnswerItem]


class ModelCard(BaseModel):
    """A served name: a base (``parent`` null), an adapter (``parent``: its base) or a task run."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tuneforge"
    root: str
    parent: str | None = None
    kind: Literal["generative", "encoder", "task"]
    task: str | None = None
    source: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadAdapterRequest(_Request):
    """``POST /v1/adapters``: attach a saved adapter run (or its ``model/`` folder) to the matching base."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    path: str = Field(min_length=1, max_length=4096)
