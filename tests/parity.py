"""The parity rule (DESIGN.md) and the two sides it compares: HF transformers generate and shardserve's LLM."""
from __future__ import annotations

from dataclasses import dataclass

import torch

TOP = 5


@dataclass
class Run:
    tokens: list[int]
    top5: list[set[int]]          # per generated position, the 5 most likely tokens


def check_parity(a: Run, b: Run, what: str = "") -> None:
    """Identical tokens, or at the first difference each side's token is in the other's top-5 (a float32
    near-tie), after which the continuations may legitimately differ. Never looser."""
    n = min(len(a.tokens), len(b.tokens))
    for i in range(n):
        if a.tokens[i] != b.tokens[i]:
            assert a.tokens[i] in b.top5[i] and b.tokens[i] in a.top5[i], (
                f"{what}: position {i}: {a.tokens[i]} vs {b.tokens[i]} is not a near-tie "
                f"(top-5 {sorted(a.top5[i])} vs {sorted(b.top5[i])})\n{a.tokens}\n{b.tokens}")
            return
    assert len(a.tokens) == len(b.tokens), f"{what}: lengths differ: {a.tokens} vs {b.tokens}"


def hf_greedy(model_path: str, prompts: list[list[int]], max_tokens: int, gguf_file: str | None = None,
              dtype: torch.dtype = torch.float32) -> list[Run]:
    """HF transformers greedy generate (float32 unless `dtype` says), one prompt at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, gguf_file=gguf_file, dtype=dtype).eval()
    runs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            tokens = out.sequences[0, len(ids):].tolist()
            top5 = [set(torch.topk(s[0], TOP).indices.tolist()) for s in out.scores]
            runs.append(Run(tokens, top5))
    return runs


def engine_runs(outputs) -> list[Run]:
    """RequestOutputs generated with logprobs=5 -> Runs."""
    runs = []
    for out in outputs:
        comp = out.outputs[0]
        top5 = [set(sorted(lp, key=lambda t: -lp[t].logprob)[:TOP]) for lp in comp.logprobs]
        runs.append(Run(list(comp.token_ids), top5))
    return runs
