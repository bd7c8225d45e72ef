"""Tokenizers (HF folder or GGUF), chat templates and an incremental detokenizer for streaming.

The tokenizer is a FastTokenizer (the `tokenizers` package alone, token for token what transformers builds) where
one can be built: an HF tokenizer.json of the generic class, or a GGUF byte-level BPE vocab. Others (a
sentencepiece GGUF vocab, a tokenizer class transformers rebuilds in code) fall back to transformers, logged.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from typing import Any

from shardserve.model.spec import ModelSpec

log = logging.getLogger(__name__)
_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def _disk_cache_dir(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "shardserve", "tokenizers", key)


def _transformers_gguf_tokenizer(gguf_path: str):
    """Convert the GGUF tokenizer with transformers (~3.5 s for SmolLM2), cached on disk (~0.3 s to reload)."""
    from transformers import AutoTokenizer

    cache = _disk_cache_dir(gguf_path)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:  # a corrupt cache entry: rebuild it below
            shutil.rmtree(cache, ignore_errors=True)
    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    try:  # best effort: a read-only home only costs the conversion time next run
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache), prefix=".tmp-")
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except OSError:
        pass
    return tok


def build_tokenizer(spec: ModelSpec, use_transformers: bool = False):
    """A new tokenizer for the checkpoint: a FastTokenizer when one reproduces transformers' (unless
    `use_transformers`), else transformers' AutoTokenizer."""
    if spec.format == "gguf":
        if not use_transformers:
            from shardserve.model.tokenizer_files import gguf_tokenizer
            from shardserve.model.gguf_metadata import read_gguf_metadata
            tok, why = gguf_tokenizer(read_gguf_metadata(spec.weights_path))
            if tok is not None:
                return tok
            log.info("tokenizer of %s: built with transformers (%s)", spec.weights_path, why)
        return _transformers_gguf_tokenizer(spec.weights_path)
    folder = spec.weights_path
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{folder} has no tokenizer.json (or tokenizer.model); add the model's "
                                "tokenizer files to the folder, or pass prompt_token_ids instead of text")
    if not use_transformers:
        from shardserve.model.tokenizer_files import hf_folder_tokenizer
        tok, why = hf_folder_tokenizer(folder)
        if tok is not None:
            return tok
        log.info("tokenizer of %s: built with transformers (%s)", folder, why)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def load_tokenizer(spec: ModelSpec):
    """The checkpoint's tokenizer (folder files or the GGUF's embedded vocab), built once per path."""
    key = (spec.format, spec.weights_path)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    tok = build_tokenizer(spec)
    with _LOCK:
        _CACHE.setdefault(key, tok)
        return _CACHE[key]


def apply_chat_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Render `messages` with the model's chat template and tokenize it (special tokens are in the text)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template (no chat_template in tokenizer_config.json / "
                         "chat_template.jinja or the GGUF's tokenizer.chat_template); use generate() with a "
                         "plain prompt, or add a chat template to the tokenizer files")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    # the template already writes bos / control tokens as text; do not add them again
    return list(tokenizer.encode(text, add_special_tokens=False))


# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: decode from a few prompt tokens back so the first
# output token's leading space / merge with the prompt comes out as in a full decode.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas without ever splitting a multi-byte UTF-8 character.

    Invariant (as vLLM's detokenize_incrementally): ids[prefix_offset:read_offset] has already been emitted;
    each step decodes ids[prefix_offset:] and emits what extends decode(ids[prefix_offset:read_offset]),
    unless it ends in U+FFFD (an incomplete byte sequence), in which case it waits for more tokens.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)  # prompt + output ids
        self._prefix_offset = max(len(self._ids) - _PROMPT_CONTEXT, 0)
        self._read_offset = len(self._ids)
        self.output_token_ids: list[int] = []
        self.text = ""                                  # all output text emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> str:
        """Add one generated token; return only the text it completed ('' while a character is partial)."""
        self._ids.append(int(token_id))
        self.output_token_ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: emit any held-back text (an incomplete character decodes as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta
