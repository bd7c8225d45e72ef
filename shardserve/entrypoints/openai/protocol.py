"""OpenAI-compatible request bodies (pydantic) and the mapping onto SamplingParams."""
from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, field_validator, model_validator

from shardserve.sampling_params import SamplingParams

MAX_TOKENS_CAP = 1 << 16
MAX_PROMPTS_PER_REQUEST = 256           # prompts in one completions request
MAX_SEQUENCES_PER_REQUEST = 1024        # prompts x n: the sequences one request may queue


def _check_unicode(value) -> None:
    """JSON may carry lone surrogates (\\udcff); the tokenizer cannot take them: refuse them as a 400."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"strings must be valid Unicode (lone surrogate at position {exc.start})") from None
    elif isinstance(value, dict):
        for v in value.values():
            _check_unicode(v)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v)


class _Request(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        _check_unicode(data)
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    model_config = ConfigDict(extra="allow")       # clients send fields we do not use; ignore them

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, le=2**62)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra field: per prompt token, its logprob plus the top-k (returned as `prompt_logprobs`)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    # OpenAI's: {"token id": bias in [-100, 100]}, added to the logits before sampling
    logit_bias: dict[str, StrictFloat] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not re.fullmatch(r"[0-9]+", key):
                raise ValueError(f"logit_bias keys must be token ids as decimal strings (e.g. \"7042\"), got {key!r}")
            if not math.isfinite(value) or not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {key}")
        return bias

    @model_validator(mode="after")
    def _no_streamed_prompt_logprobs(self):
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("`prompt_logprobs` are not available when `stream=True`")
        return self

    def sampling_params(self, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
            max_tokens=self.max_tokens or default_max_tokens, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if len(p) > MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"prompt holds {len(p)} prompts; at most {MAX_PROMPTS_PER_REQUEST} per request "
                             "(send several requests)")
        if len(p) * self.n > MAX_SEQUENCES_PER_REQUEST:
            raise ValueError(f"{len(p)} prompts x n={self.n} would queue {len(p) * self.n} sequences; at most "
                             f"{MAX_SEQUENCES_PER_REQUEST} per request (lower n or send fewer prompts)")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):        # OpenAI content parts: keep the text ones
            texts = [part.get("text", "") for part in self.content if part.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("a content part of type 'text' needs a string 'text'")
            return "".join(texts)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    add_generation_prompt: bool = True


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]
