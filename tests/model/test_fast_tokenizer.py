"""FastTokenizer (the `tokenizers` package alone) against transformers' tokenizer, token for token and text for text."""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from shardserve.model.fast_tokenizer import FastTokenizer
from shardserve.model.spec import ModelSpec
from shardserve.model.spec_reader import read_model_spec
from shardserve.model.tokenizer import build_tokenizer, load_tokenizer

CASES = ["llama_gqa", "mistral", "tiny_gguf", "smollm2_gguf", "smollm2_hf", "byte_fallback", "gguf_variant"]
TEXTS = [
    "", " ", "Hello world, the capital of France is Paris.",
    "Emoji 😀👍🏽 and flags 🇫🇷🇯🇵, a family 👨‍👩‍👧 (ZWJ) in a row",
    "日本語のテキストと中文字符, ünïcödé ok, Ελληνικά, русский, العربية, עברית",
    "  leading spaces\n\nnew lines\tand tabs  ",
    "runs:     five\n\n\n\nfour\t\t\ttabs\r\nCRLF   ",
    "e\u0301 vs \u00e9 (NFD / NFC), \u200b zero width, \ufeff BOM, \u00a0 nbsp, \u2028 line sep",
    "control \x00\x01\x1f\x7f bytes, a lone \ufffd replacement char, ĠĠ Ċ byte-level letters",
    "specials in text: <s>bos</s> <|endoftext|> <|im_start|>user\nhi<|im_end|> <|im_end|><|im_end|>",
    "code:\n    def f(x):\n        return x ** 2  # comment\n\tif a != b: pass",
    "numbers 0 1 12 123 1234 3.14159 -42 1e-5 2024-12-06 $1,000,000.00 100%",
    "it's they're we've I'm you'll he'd DON'T",
    "x" * 300 + " " + "ab " * 100,
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 😀"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and  3 + 3?\n"}, {"role": "assistant", "content": "6", "name": None}],
]


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory) -> str:
    """A Llama-2-style folder: BPE with byte_fallback (<0xNN> tokens for what the vocab lacks), Metaspace-like
    normalizer, ByteFallback / Fuse / Strip decoder, <s> added by the template, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "\u2581": 259}
    for ch in letters + letters.upper() + ".,!?'0123456789":
        vocab[ch] = len(vocab)
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("i", "n"), ("\u2581", "a"), ("o", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("byte_fallback")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                                          "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
                            ).save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(folder)


@pytest.fixture(scope="module")
def gguf_variant(tiny_gguf, tmp_path_factory) -> str:
    """tiny_gguf's vocab and merges with the other GGUF paths: a llama-bpe pre-tokenizer split, a user-defined
    token (added, not special), a control token outside the byte alphabet (not added), EOS added, no BOS flag."""
    import gguf
    from shardserve.model.gguf_metadata import parse_gguf_metadata
    meta = parse_gguf_metadata(tiny_gguf)
    tokens = meta.get("tokenizer.ggml.tokens").tolist() + ["<think>", "<|ctrl 1|>"]
    types = meta.get("tokenizer.ggml.token_type").tolist() + [4, 3]
    path = str(tmp_path_factory.mktemp("gguf_variant") / "variant.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                   (w.add_feed_forward_length, 16), (w.add_head_count, 2)):
        add(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(meta.get("tokenizer.ggml.merges").tolist())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_eos_token(True)
    w.add_chat_template(meta.get("tokenizer.chat_template"))
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@functools.lru_cache(maxsize=None)
def _pair(path: str) -> tuple[FastTokenizer, object]:
    if path.endswith(".gguf") or os.path.isfile(os.path.join(path, "model.safetensors")):
        spec = read_model_spec(path)
    else:                                   # a tokenizer-only folder
        spec = ModelSpec("LlamaForCausalLM", 1, 1, 1, 1, 1, 1, 1, 1e-5, 1e4, None, 1, False, False, "float32", None,
                         (), "safetensors", path)
    return build_tokenizer(spec), build_tokenizer(spec, use_transformers=True)


@pytest.fixture(params=CASES)
def pair(request):
    return _pair(request.getfixturevalue(request.param))


def test_same_backend_and_special_tokens(pair):
    """The backend transformers builds, serialized, is the one built here; so are the special tokens."""
    fast, hf = pair
    assert isinstance(fast, FastTokenizer) and not isinstance(hf, FastTokenizer)
    assert json.loads(fast.backend_tokenizer.to_str()) == json.loads(hf.backend_tokenizer.to_str())
    assert len(fast) == len(hf) and fast.vocab_size == hf.vocab_size and fast.get_vocab() == hf.get_vocab()
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id",
                 "unk_token_id", "special_tokens_map", "all_special_tokens", "all_special_ids", "chat_template"):
        assert getattr(fast, attr) == getattr(hf, attr), attr


def test_encode_decode_equal(pair):
    fast, hf = pair
    for text in TEXTS:
        for add in (True, False):
            ids = fast.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
            assert fast(text, add_special_tokens=add)["input_ids"] == ids
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    rng = random.Random(0)
    for _ in range(50):     # arbitrary ids: specials, and byte pieces that end inside a UTF-8 character (U+FFFD)
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
        assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert fast.decode(5) == hf.decode(5)
    assert fast.batch_decode([[5, 6], [7]]) == hf.batch_decode([[5, 6], [7]])


def test_chat_template_equal(pair):
    fast, hf = pair
    for chat in CHATS:
        for gen in (True, False):
            text = fast.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert text == hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False), (chat, gen)
            assert fast.apply_chat_template(chat, add_generation_prompt=gen) == \
                hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
    # the template's globals: raise_exception, tojson (no HTML escaping), namespace; kwargs reach the template
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}"
                "{% endfor %}{{ ns.n }}{{ bos_token }}{{ extra }}{% if boom %}{{ raise_exception('no') }}{% endif %}")
    chat = [{"role": "user", "content": "<b>&'\"é"}]
    assert fast.apply_chat_template(chat, chat_template=template, tokenize=False, extra="!") == \
        hf.apply_chat_template(chat, chat_template=template, tokenize=False, extra="!")
    import jinja2
    with pytest.raises(jinja2.TemplateError, match="no"):
        fast.apply_chat_template(chat, chat_template=template, tokenize=False, boom=True)


def test_smollm2_default_system_prompt(smollm2_gguf):
    tok = load_tokenizer(read_model_spec(smollm2_gguf))
    assert isinstance(tok, FastTokenizer)
    text = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_fallback_to_transformers_is_logged(qwen2, tmp_path):
    """qwen2 folders (transformers substitutes its own class) and sentencepiece GGUF vocabs go to transformers."""
    import gguf
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("shardserve.model.tokenizer")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        tok = build_tokenizer(read_model_spec(qwen2))
        assert not isinstance(tok, FastTokenizer) and tok.encode("Hi") == _pair(qwen2)[1].encode("Hi")
        path = str(tmp_path / "spm.gguf")
        w = gguf.GGUFWriter(path, "llama")
        for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                       (w.add_feed_forward_length, 16), (w.add_head_count, 2)):
            add(v)
        tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab"] + [f"<0x{i:02X}>" for i in range(256)]
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0] + [0.0] * 256)
        w.add_token_types([2, 3, 3, 1, 1, 1, 1, 1] + [6] * 256)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        tok = build_tokenizer(read_model_spec(path))
        assert not isinstance(tok, FastTokenizer) and tok.encode("ab a")[0] == 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    messages = [r.getMessage() for r in records]
    assert any("qwen2" in m and "built with transformers" in m for m in messages), messages
    assert any("tokenizer.ggml.model 'llama'" in m for m in messages), messages


@pytest.mark.timeout(120)
def test_no_transformers_import(smollm2_gguf, llama_gqa):
    """Building, encoding, decoding and chat templating import neither transformers nor torch."""
    code = ("import sys\nfrom shardserve.model.spec_reader import read_model_spec\n"
            "from shardserve.model.tokenizer import load_tokenizer, apply_chat_template\n"
            "for path in sys.argv[1:]:\n"
            "    tok = load_tokenizer(read_model_spec(path))\n"
            "    tok.decode(tok.encode('Hello'))\n"
            "    apply_chat_template(tok, [{'role': 'user', 'content': 'Hi'}])\n"
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, smollm2_gguf, llama_gqa], capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_byte_fallback_pieces(byte_fallback):
    """Characters the vocab lacks become their UTF-8 bytes (<0xNN>) and decode back whole."""
    fast, hf = _pair(byte_fallback)
    ids = fast.encode("é 😀", add_special_tokens=False)
    assert [fast.convert_ids_to_tokens(i) for i in ids] == ["\u2581", "<0xC3>", "<0xA9>", "\u2581", "<0xF0>", "<0x9F>",
                                                          "<0x98>", "<0x80>"]
    assert fast.decode(ids) == hf.decode(ids) == "é 😀" and fast.decode(ids[:3]) == "é"
    assert fast.decode(ids[:-1]) == hf.decode(ids[:-1])      # a character cut short


def test_encode_releases_the_gil(smollm2_gguf):
    """A huge prompt tokenized in a worker thread leaves other threads (the server's event loop) running, as
    transformers' tokenizer does (tokenizers' encode_batch releases the GIL; its encode does not)."""
    import threading
    import time
    tok = load_tokenizer(read_model_spec(smollm2_gguf))
    gaps, done = [], threading.Event()

    def tick():
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    t0 = time.perf_counter()
    try:
        tok.encode("hello world, " * 200_000)
    finally:
        done.set()
        ticker.join()
    took = time.perf_counter() - t0
    assert took > 0.3, took                      # long enough for a held GIL to show
    assert max(gaps) < took / 2, (max(gaps), took)


def test_gguf_variant_paths(gguf_variant):
    fast, _ = _pair(gguf_variant)
    ids = fast.encode("a <think> b", add_special_tokens=True)
    assert ids[-1] == fast.eos_token_id and fast.convert_tokens_to_ids("<think>") in ids
    assert "<|ctrl 1|>" not in fast.get_vocab()


def test_pre_tokenizer_splits_match_transformers():
    """The tokenizer.ggml.pre -> split table is transformers' (a new transformers may add names: copy them)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from shardserve.model.tokenizer_files import GGUF_PRE_TOKENIZER_SPLITS
    assert GGUF_PRE_TOKENIZER_SPLITS == mapping.GGUF_PRE_TOKENIZER_SPLITS
