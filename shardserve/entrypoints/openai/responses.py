"""Shapes OpenAI response bodies (full and streamed chunks) from RequestOutputs."""
from __future__ import annotations

import time

from shardserve.core.outputs import CompletionOutput, RequestOutput


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer, comp: CompletionOutput, start: int, text_offset: int) -> dict | None:
    """Legacy completions logprobs for tokens [start:] of the output."""
    if comp.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tok, entry in zip(comp.token_ids[start:], comp.logprobs[start:]):
        piece = tokenizer.decode([tok])
        tokens.append(piece)
        lps.append(entry[tok].logprob)
        tops.append({tokenizer.decode([t]): lp.logprob for t, lp in entry.items() if lp.rank is not None})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, comp: CompletionOutput, start: int, top_n: int) -> dict | None:
    if comp.logprobs is None:
        return None
    content = []
    for tok, entry in zip(comp.token_ids[start:], comp.logprobs[start:]):
        piece = tokenizer.decode([tok])
        ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None), key=lambda x: x[1].rank)
        content.append({"token": piece, "logprob": entry[tok].logprob, "bytes": list(piece.encode()),
                        "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": lp.logprob,
                                          "bytes": list(tokenizer.decode([t]).encode())} for t, lp in ranked[:top_n]]})
    return {"content": content}


def base(kind: str, request_id: str, model: str) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model}


def completion_choice(index: int, text: str, logprobs, finish_reason) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": None}


def chat_choice(index: int, text: str, logprobs, finish_reason, delta: bool) -> dict:
    key = "delta" if delta else "message"
    message = {"role": "assistant", "content": text}
    return {"index": index, key: message, "logprobs": logprobs, "finish_reason": finish_reason}


def count_tokens(outputs: list[RequestOutput]) -> tuple[int, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return prompt, completion
