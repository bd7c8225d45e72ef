"""LLM: the offline, vLLM-compatible API (generate, chat, shutdown, context manager)."""
from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Sequence as Seq

from tqdm import tqdm

from shardserve.core.outputs import RequestOutput
from shardserve.engine.engine_args import EngineArgs
from shardserve.engine.llm_engine import LLMEngine, PromptType
from shardserve.model.tokenizer import apply_chat_template
from shardserve.sampling_params import SamplingParams

logger = logging.getLogger("shardserve")


class LLM:
    """LLM(model=None, tensor_parallel_size=1, pipeline_parallel_size=1, ...): see EngineArgs for every knob."""

    def __init__(self, model: str | None = None, **kwargs):
        kwargs.pop("trust_remote_code", None)
        known = set(EngineArgs.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown arguments {unknown}; known: {sorted(known)}")
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()
        self._finalizer = weakref.finalize(self, self.engine.shutdown)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in input order. A prompt the engine cannot serve (too long, empty, bad token ids) gets an
        output with finish_reason "error" and `.error` saying why; the other prompts still run."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, params):
            request_id = str(next(self._ids))
            order.append(request_id)
            try:
                self.engine.add_request(request_id, prompt, p)
            except ValueError as exc:
                logger.warning("request %s refused: %s", request_id, exc)
                results[request_id] = self.engine.fail_request(request_id, prompt, str(exc))
        self._run(results, len(order), use_tqdm)
        return [results[i] for i in order]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self.engine.tokenizer, conv, add_generation_prompt)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, results: dict[str, RequestOutput], total: int, use_tqdm: bool) -> None:
        bar = tqdm(total=total, desc="Processed prompts", disable=not use_tqdm or total < 8, dynamic_ncols=True)
        bar.update(len(results))
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()

    def shutdown(self) -> None:
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
