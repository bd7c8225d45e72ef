"""SamplingParams: per-request decoding settings, vLLM-compatible, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass


GREEDY_BELOW = 1e-5          # vLLM's _SAMPLING_EPS


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1 (or 0) = disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16          # None = up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None          # top-k logprobs per generated token (sampled token always included)
    prompt_logprobs: int | None = None   # top-k logprobs per prompt token (the prompt token always included)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # token id -> bias in [-100, 100], added to the raw float32 logits before anything else (penalties,
    # temperature, greedy argmax, logprobs); -100 effectively bans a token, +100 all but forces it (OpenAI's)
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._check()
        if self.logit_bias is not None:
            self.logit_bias = {t: float(v) for t, v in self.logit_bias.items()} or None

    def _check(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", ">= 0 (0 means greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1 (disabled) or an integer >= 1")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0 (1 means no penalty)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "an integer in [0, 20] or None")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "an integer in [0, 20] or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids >= 0")
        if self.logit_bias is not None:
            _check_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 decode greedily, as vLLM's do (dividing logits by them overflows float32)."""
        return self.temperature < GREEDY_BELOW


def _check_logit_bias(bias: object) -> None:
    if not isinstance(bias, dict):
        raise ValueError(f"SamplingParams.logit_bias must be a dict of token id -> bias or None, got "
                         f"{type(bias).__name__}")
    for token, value in bias.items():
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValueError(f"SamplingParams.logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if not _is_number(value) or not math.isfinite(value) or not -100 <= value <= 100:
            raise ValueError(f"SamplingParams.logit_bias values must be numbers in [-100, 100], got {value!r} "
                             f"for token {token}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN
