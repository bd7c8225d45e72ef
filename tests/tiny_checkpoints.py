"""Builders of tiny seeded checkpoints (HF folders, a GGUF file) and the SmolLM2 HF conversion for tests."""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch

VOCAB = 1003                      # divisible by neither 2, 3 nor 4
# ids 0, 1, 2. Id 0 is spelled <|endoftext|> (the unk) because transformers' GGUF byte-level tokenizer
# conversion adds <|endoftext|> when the vocab lacks it, which would make the GGUF tokenizer 1004 long.
SPECIALS = ["<|endoftext|>", "<s>", "</s>"]
BOS_ID, EOS_ID = 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_TEXT = """
The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and predicts the
next one. Tensor parallelism splits each weight matrix across devices, while pipeline parallelism gives each
device a contiguous range of layers. The capital of France is Paris; the capital of Italy is Rome; the capital
of Japan is Tokyo. Once upon a time there was a little robot who wanted to learn how to paint the sea, the
sky and the mountains. Every morning it walked to the harbour, watched the boats, and counted the waves.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 appear in text, as do symbols such as + - * / = ( ) [ ] { }.
Hello, world! How are you today? I am fine, thank you. What is the weather like in London this week?
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
"""


def _training_corpus() -> list[str]:
    # Built-in English plus deterministic pseudo-words, so the trainer has enough pairs to fill the vocab.
    rng = random.Random(1234)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    lines = [l for l in _TEXT.strip().splitlines()] * 4
    for _ in range(400):
        words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 8))) for _ in range(12)]
        lines.append(" ".join(words))
    return lines


_TRAINED: dict[int, str] = {}  # vocab_size -> tokenizer.json text (training takes ~1 s; do it once)


def build_tokenizer(folder: str, vocab_size: int = VOCAB):
    """Train a byte-level BPE of exactly `vocab_size` entries and save it to `folder`; returns the HF tokenizer.

    Ids: <|endoftext|>=0 (unk), <s>=1, </s>=2, then the 256 byte-level symbols, then learned merges. encode() prepends <s>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size not in _TRAINED:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(_training_corpus(), trainer=trainer)
        assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", BOS_ID)])
        _TRAINED[vocab_size] = tok.to_str()
    tok = Tokenizer.from_str(_TRAINED[vocab_size])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>",
                                 clean_up_tokenization_spaces=False)
    hf.save_pretrained(folder)
    # Keep the chat template inside tokenizer_config.json (readable by transformers 4.x and 5.x alike).
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    if os.path.exists(os.path.join(folder, "chat_template.jinja")):
        os.remove(os.path.join(folder, "chat_template.jinja"))
    return hf


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded init, larger than HF's 0.02 so greedy logits are peaked (ties rare) and greedy text varies.

    Matrices ~ N(0, (gain / sqrt(in_features))^2) with gain 2 (lm_head 4: logits std ~4); embeddings N(0, 1);
    norm weights 1 + N(0, 0.2^2); biases N(0, 0.3^2). The output rows of the special tokens (<|endoftext|>, <s>, </s>)
    are shrunk so greedy generation rarely stops at </s> or emits specials.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 2 and "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))                       # rows ~ N(0, 1)
            elif p.dim() == 2:
                gain = 4.0 if name.startswith("lm_head") else 2.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[1] ** 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:                                                                 # q/k/v biases (Qwen2)
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        out = model.get_output_embeddings().weight                                # [vocab, hidden] (tied: = embed)
        out[: len(SPECIALS)] *= 0.25


def _save_model(model, folder: str) -> str:
    model.config.bos_token_id, model.config.eos_token_id = BOS_ID, EOS_ID
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = BOS_ID, EOS_ID
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer(folder)
    return folder


_COMMON = dict(hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=512,
               rms_norm_eps=1e-6, bos_token_id=BOS_ID, eos_token_id=EOS_ID, dtype="float32")


def build_llama_gqa(folder: str, rope_scaling: bool = True) -> str:
    """Llama, 5 layers, 4 heads / 2 kv heads, head_dim 16, intermediate 136, vocab 1003, llama3 rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(num_hidden_layers=5, num_key_value_heads=2, head_dim=16, intermediate_size=136,
                      tie_word_embeddings=False, rope_parameters=rope, **_COMMON)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    _init_weights(model, seed=1)
    return _save_model(model, folder)


def build_llama_bf16(folder: str) -> str:
    """llama_gqa's weights (plain RoPE) stored as bfloat16 safetensors: dtype "auto" runs it in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=5, num_key_value_heads=2, head_dim=16, intermediate_size=136,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      **{**_COMMON, "dtype": "bfloat16"})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    _init_weights(model, seed=1)
    return _save_model(model.to(torch.bfloat16), folder)


def build_llama_blocks(folder: str) -> str:
    """Llama whose every matrix splits into whole 256-wide blocks on 2 TP ranks (for quantized GGUF twins):
    2 layers, hidden 512, 4 heads / 2 kv heads, head_dim 128, intermediate 1024, vocab 1003, plain RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, head_dim=128, intermediate_size=1024,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      **{**_COMMON, "hidden_size": 512})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    _init_weights(model, seed=4)
    return _save_model(model, folder)


def build_qwen2(folder: str) -> str:
    """Qwen2, 4 layers, 4 heads / 2 kv heads, intermediate 128, vocab 1003, tied embeddings, qkv bias."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(num_hidden_layers=4, num_key_value_heads=2, intermediate_size=128,
                      tie_word_embeddings=True, use_sliding_window=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_COMMON)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    _init_weights(model, seed=2)
    return _save_model(model, folder)


def build_mistral(folder: str) -> str:
    """Mistral, 3 layers, 4 heads / 1 kv head, intermediate 96, vocab 1003, no sliding window."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(num_hidden_layers=3, num_key_value_heads=1, intermediate_size=96, sliding_window=None,
                        tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_COMMON)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).float()
    _init_weights(model, seed=3)
    return _save_model(model, folder)


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------

def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (rotate-half -> interleaved RoPE order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, *mod, leaf = hf.split(".")
    return f"blk.{i}.{_HF_TO_GGUF_LAYER['.'.join(mod)]}.{leaf}"


def quantize_for_gguf(t: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """A float32 tensor as GGUF type `qtype` ("F32", "Q8_0", "Q4_0", "Q4_K", ...): (data, GGML type). Like
    llama-quantize, 1-D tensors and matrices whose rows are not whole blocks stay F32."""
    import gguf
    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if qtype == "F32" or t.ndim != 2 or t.shape[1] % block:
        return t, gguf.GGMLQuantizationType.F32
    if qtype.endswith("_K"):
        from kquants import quantize_k
        return quantize_k(t, qtype), kind
    return gguf.quants.quantize(t, kind), kind


@functools.lru_cache(maxsize=None)
def quantized_gguf(hf_folder: str, qtype: str) -> str:
    """The HF folder written once as a GGUF of `qtype`, beside the folder."""
    out = os.path.join(os.path.dirname(hf_folder), f"{os.path.basename(hf_folder)}.{qtype}.gguf")
    return write_gguf_from_hf(hf_folder, out, qtype)


def write_gguf_from_hf(hf_folder: str, out_file: str, qtype: str = "F32") -> str:
    """Write an HF Llama folder (float32) as a llama GGUF of `qtype` (quantize_for_gguf), with q/k permuted and
    the tokenizer embedded.

    GGUF metadata cannot express the llama3 rope_scaling dict (llama.cpp stores a rope_freqs tensor
    instead); it is dropped, so pair this file with a folder built with rope_scaling=False.
    """
    import gguf
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    with open(os.path.join(hf_folder, "config.json")) as f:
        cfg = json.load(f)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    state = load_file(os.path.join(hf_folder, "model.safetensors"))

    w = gguf.GGUFWriter(out_file, "llama")
    w.add_name("tiny-llama-gqa")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    # tokenizer: gpt2 (byte-level BPE) fields
    tj = json.loads(Tokenizer.from_file(os.path.join(hf_folder, "tokenizer.json")).to_str())
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    assert None not in tokens and len(tokens) == cfg["vocab_size"]
    special = {t["id"] for t in tj["added_tokens"] if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    for name in sorted(state, key=lambda n: (not n.startswith("model.embed"), n)):
        t = state[name].float().numpy()
        if name.endswith("q_proj.weight"):
            t = permute_for_gguf(t, heads)
        elif name.endswith("k_proj.weight"):
            t = permute_for_gguf(t, kv)
        data, kind = quantize_for_gguf(np.ascontiguousarray(t), qtype)
        w.add_tensor(_gguf_name(name), data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


# ----------------------------------------------------------------------------------------------
# SmolLM2 GGUF -> HF folder (slow: ~20 s; cached on disk)
# ----------------------------------------------------------------------------------------------

def smollm2_hf_folder(gguf_path: str, cache_root: str | None = None) -> str:
    """The SmolLM2 GGUF dequantized by transformers into an HF float32 safetensors folder (+ tokenizer).

    Cached under ~/.cache/shardserve/test-checkpoints keyed by the GGUF's size and mtime.
    """
    st = os.stat(gguf_path)
    root = cache_root or os.path.join(os.path.expanduser("~"), ".cache", "shardserve", "test-checkpoints")
    folder = os.path.join(root, f"smollm2-135m-instruct-{st.st_size}-{st.st_mtime_ns}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".building-")
    try:
        d, f = os.path.split(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        # the weights are plain float32 now; drop the GGUF quantizer so save_pretrained accepts the model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
