"""Building a FastTokenizer from tokenizer files (HF tokenizer.json folders, GGUF byte-level BPE vocabs).

Built the way transformers 5 builds its TokenizersBackend, step for step (the same added tokens, flags and post
processor), so encode / decode / chat templates agree token for token, without importing transformers (~1.3 s).
A builder returns (None, reason) for what it cannot reproduce; the caller then falls back to transformers.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

from shardserve.model.fast_tokenizer import NAMED_SPECIALS, FastTokenizer
from shardserve.model.gguf_metadata import GGUFMetadata

_GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")     # tokenizer.json used as saved
_GENERIC_MODEL_TYPES = ("llama", "mistral")       # model types AutoTokenizer leaves to such a class (checked: 5.x)
_CONTROL, _USER_DEFINED = 3, 4                                          # GGUF token types

# transformers' integrations/gguf/gguf_tokenizer_mapping.py: tokenizer.ggml.pre -> the split its merges were
# learned on (other pre-tokenizer names keep GPT-2's ByteLevel regex)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    "tekken": _TEKKEN,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}



# ---------------------------------------------------------------------------------------------------

def _template_processing(backend, special: dict, add_bos: bool, add_eos: bool) -> None:
    """TokenizersBackend.update_post_processor: [bos] $A [eos] (pair: ... [bos] $B [eos])."""
    from tokenizers import processors
    bos, eos = special.get("bos_token"), special.get("eos_token")
    bos, eos = (None if bos is None else str(bos)), (None if eos is None else str(eos))
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    specials = []
    if add_bos:
        specials.append((bos, _id_or_unk(backend, bos, special)))
    if add_eos:
        specials.append((eos, _id_or_unk(backend, eos, special)))
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _id_or_unk(backend, token: str, special: dict) -> int | None:
    index = backend.token_to_id(token)
    if index is None and special.get("unk_token") is not None:
        index = backend.token_to_id(str(special["unk_token"]))
    return index


def _finish(backend, special: dict, extra: list, added_decoder: list, should_update: bool, add_bos: bool,
            add_eos: bool) -> None:
    """TokenizersBackend.__init__ after the backend exists, then _post_init: add the configured added tokens and
    the special tokens missing from the backend, (re)build the post processor, re-add every special token as
    special and unnormalized."""
    from tokenizers import AddedToken
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    to_add = list(added_decoder)
    encoder = present | {str(t) for t in to_add}
    for value in [*special.values(), *extra]:
        if value is not None and str(value) not in encoder and value not in to_add:
            to_add.append(value)
    if to_add:
        named = {str(v) for v in special.values() if v}
        tokens = []
        for t in to_add:
            if isinstance(t, str):
                t = AddedToken(t, special=True)
            elif not t.special and str(t) in named:
                t.special = True
            tokens.append(t)
        backend.add_tokens(tokens)
    if should_update:
        _template_processing(backend, special, add_bos, add_eos)
    post = [v if isinstance(v, AddedToken) else AddedToken(v, special=True, normalized=False)
            for v in [*special.values(), *extra] if v is not None]
    if post:
        backend.add_special_tokens(post)
    if should_update:
        _template_processing(backend, special, add_bos, add_eos)


def _added_token(value: Any):
    """A special token as tokenizer_config.json spells it: a string, or a serialized AddedToken."""
    from tokenizers import AddedToken
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "__type"}
        return AddedToken(**value)
    return value


def hf_folder_tokenizer(folder: str) -> tuple[FastTokenizer | None, str]:
    """The tokenizer of an HF folder as transformers' AutoTokenizer loads it where that is tokenizer.json used as
    saved: tokenizer_class PreTrainedTokenizerFast / TokenizersBackend and model_type llama or mistral (for qwen2
    and others AutoTokenizer rebuilds the pipeline in code); (None, why not) otherwise."""
    from tokenizers import Tokenizer
    tj, tc = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(tj):
        return None, "no tokenizer.json"
    if not os.path.isfile(tc):
        return None, "no tokenizer_config.json (transformers picks a class from config.json)"
    with open(tc, encoding="utf-8") as f:
        config = json.load(f)
    cls = config.pop("tokenizer_class", None)
    if cls not in _GENERIC_CLASSES:
        return None, f"tokenizer_class {cls!r} (transformers rebuilds its pipeline in code)"
    model_type = _model_type(folder)
    if model_type not in _GENERIC_MODEL_TYPES:
        return None, f"model_type {model_type!r} (transformers may substitute its own tokenizer class)"
    for key in ("auto_map", "fix_mistral_regex", "fast_tokenizer_files"):
        if key in config:
            return None, f"tokenizer_config.json sets {key}"
    for name in ("added_tokens.json", "tekken.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return None, f"{name} (a layout transformers converts)"
    config.pop("add_bos_token", None)                   # ignored by transformers when tokenizer.json exists
    config.pop("add_eos_token", None)
    templates = _chat_templates(folder, config.pop("chat_template", None))
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    own = [k for k, v in config.items() if k.endswith("_token") and k not in NAMED_SPECIALS
           and isinstance(v, (str, dict))]
    if isinstance(config.get("extra_special_tokens"), dict) or own:
        return None, f"model-specific special tokens ({', '.join(own) or 'extra_special_tokens'})"
    backend = Tokenizer.from_file(tj)
    if "added_tokens_decoder" in config:
        added = {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
    else:                                               # transformers 5 saves them in tokenizer.json only
        _merge_special_tokens_map(folder, config)
        added = dict(backend.get_added_tokens_decoder())
    by_text = {str(t): t for t in added.values()}
    special = {}
    for name in NAMED_SPECIALS:
        value = _added_token(config.get(name))
        if value is not None:
            special[name] = by_text.get(str(value), value)
    extra = [_added_token(t) for t in config.get("extra_special_tokens") or []]
    backend.no_truncation()                             # transformers' encode() turns both off on every call
    backend.no_padding()
    if config.get("split_special_tokens"):
        backend.encode_special_tokens = True
    _finish(backend, special, extra, [added[i] for i in sorted(added)], backend.post_processor is None, False, False)
    return FastTokenizer(backend, special, extra, templates, bool(config.get("clean_up_tokenization_spaces", False)),
                         folder), ""


def _model_type(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def _merge_special_tokens_map(folder: str, config: dict) -> None:
    """transformers' legacy special_tokens_map.json: its named tokens (special) and extra tokens join the config."""
    from tokenizers import AddedToken
    path = os.path.join(folder, "special_tokens_map.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        tokens = json.load(f)
    if "additional_special_tokens" in tokens and not tokens.get("extra_special_tokens"):
        tokens["extra_special_tokens"] = tokens.pop("additional_special_tokens")
    for key, value in tokens.items():
        if key == "extra_special_tokens" and isinstance(value, list):
            merged = list(config.get("extra_special_tokens") or [])
            for t in value:
                if isinstance(t, dict):
                    t = AddedToken(**{k: v for k, v in t.items() if k != "special"}, special=True)
                if t not in merged:
                    merged.append(t)
            value = merged
        elif isinstance(value, dict):
            value = AddedToken(**{k: v for k, v in value.items() if k not in ("special", "__type")}, special=True)
        config[key] = value


def _chat_templates(folder: str, from_config: Any) -> Any:
    """chat_template.jinja (and additional_chat_templates/*.jinja) win over tokenizer_config.json's entry."""
    templates = {}
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            templates["default"] = f.read()
    extra_dir = os.path.join(folder, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    templates[name.removesuffix(".jinja")] = f.read()
    if len(templates) == 1 and "default" in templates:
        return templates["default"]
    if templates:
        return templates
    if isinstance(from_config, (list, tuple)):
        return {t["name"]: t["template"] for t in from_config}
    return from_config


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: every byte spelled as a printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def gguf_tokenizer(meta: GGUFMetadata) -> tuple[FastTokenizer | None, str]:
    """A GGUF file's byte-level BPE vocab (tokenizer.ggml.model "gpt2") built as transformers' GGUF converter builds
    it; (None, why not) for other tokenizer models (sentencepiece "llama", "t5", ...)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        return None, f"tokenizer.ggml.model {model!r} (only byte-level BPE 'gpt2' is built without transformers)"
    if meta.get("tokenizer.ggml.tokens") is None or meta.get("tokenizer.ggml.merges") is None:
        return None, "no tokenizer.ggml.tokens / merges"
    tokens = meta.get("tokenizer.ggml.tokens").tolist()
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges").tolist()]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # GPT2Tokenizer(vocab, merges): its default bos / eos / unk <|endoftext|>, no BOS in the template
    _finish(backend, dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>"), [], [], True, False,
            False)
    types = meta.get("tokenizer.ggml.token_type")
    types = [] if types is None else types.tolist()
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == _CONTROL and set(t) <= alphabet]
    if control:
        backend.add_special_tokens(control)
    present = backend.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == _USER_DEFINED and t in present]
    if user:
        backend.add_tokens(user)
    split = GGUF_PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        special[name] = tokens[index] if index is not None else None
    flags = meta.get("tokenizer.ggml.add_bos_token"), meta.get("tokenizer.ggml.add_eos_token")
    explicit = any(f is not None for f in flags)      # transformers rebuilds the post processor only then
    add_bos, add_eos = bool(flags[0]), bool(flags[1])
    _finish(backend, special, [], [], explicit, add_bos, add_eos)
    special = {k: v for k, v in special.items() if v is not None}
    return FastTokenizer(backend, special, [], meta.get("tokenizer.chat_template"), False, meta.path,
                         add_bos and "bos_token" in special, add_eos and "eos_token" in special), ""
