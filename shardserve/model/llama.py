"""Llama-family decoder (Llama, Llama-3, Mistral, Qwen2): TP-aware layers, this PP stage's layer range.

The model file holds no collective: all communication lives in the layer classes. Layers owned by other
pipeline stages are `PPMissingLayer` placeholders, so global layer indices and weight names match the
checkpoint on every stage.
"""
from __future__ import annotations

import torch
from torch import nn

from shardserve.distributed.parallel_state import ParallelContext
from shardserve.model.forward_batch import ForwardBatch
from shardserve.model.layers.native_decoder import NativeDecoder
from shardserve.model.layers.activation import silu_and_mul
from shardserve.model.layers.attention import PagedAttention
from shardserve.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.model.layers.norm import RMSNorm
from shardserve.model.layers.rotary import RotaryEmbedding
from shardserve.model.layers.sharding import shard_range
from shardserve.model.spec import ModelSpec


class PPMissingLayer(nn.Identity):
    """Stands in for a module another pipeline stage owns; holds no parameters."""


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: ParallelContext, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads,
                                          ctx.tp, bias=spec.attention_bias, dtype=dtype)
        heads = self.qkv_proj.heads
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, ctx.tp, dtype=dtype,
                                        shard=(heads.q_start * spec.head_dim, heads.q_count * spec.head_dim))
        self.rotary = rotary
        self.attn = PagedAttention(heads.q_count, heads.kv_count, spec.head_dim, spec.head_dim ** -0.5)
        self.head_dim = spec.head_dim

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_split, dim=-1)
        t = x.shape[0]
        q, k = self.rotary(batch.positions, q.view(t, -1, self.head_dim), k.view(t, -1, self.head_dim))
        return self.o_proj(self.attn(q, k, v.view(t, -1, self.head_dim), batch))


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        shard = shard_range(spec.intermediate_size, ctx.tp.size, ctx.tp.rank_in_group, spec.mlp_split_unit)
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2, ctx.tp,
                                                       dtype=dtype, shards=[shard, shard])
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, ctx.tp, dtype=dtype, shard=shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.gate_up_proj.silu_and_mul(x)
        if act is not None:
            return self.down_proj(act)
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: ParallelContext, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(spec, ctx, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(spec, ctx, dtype)

    def forward(self, x, residual, batch: ForwardBatch):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: ParallelContext, layer_range: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.first_stage, self.last_stage = ctx.pp.is_first, ctx.pp.is_last
        self.start_layer, self.end_layer = layer_range
        self.embed_tokens = (VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, ctx.tp, dtype)
                             if self.first_stage else PPMissingLayer())
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(spec, ctx, rotary, dtype) if self.start_layer <= i < self.end_layer
            else PPMissingLayer() for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype) if self.last_stage else PPMissingLayer()
        self.own_layers = tuple(self.layers[self.start_layer:self.end_layer])   # sliced once, not per step
        self.tp = ctx.tp
        self.native: NativeDecoder | None = None               # chosen after loading, once the weights are packed

    def process_weights_after_loading(self) -> None:
        """Run this stage's layers in one C call per step where their methods allow it (float32 panels)."""
        supported = NativeDecoder.supports(self.own_layers)
        self.native = NativeDecoder(self.own_layers, self.tp) if supported else None

    def forward(self, batch: ForwardBatch, intermediate: dict[str, torch.Tensor] | None):
        """First stage: token ids -> hidden; others: {"hidden_states", "residual"} [T, hidden] from the
        previous stage. Returns the final normed hidden states (last stage; only the rows at
        batch.logits_indices are guaranteed, the one-call decoder skips the others' last layer) or the hand-off
        dict."""
        if self.first_stage:
            x, residual = self.embed_tokens(batch.input_ids), None
        else:
            x, residual = intermediate["hidden_states"], intermediate["residual"]
        if self.native is not None:
            x, residual = self.native.run(x, residual, batch, sampled_only=self.last_stage)
        else:
            for layer in self.own_layers:
                x, residual = layer(x, residual, batch)
        if not self.last_stage:
            return {"hidden_states": x, "residual": residual}
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint sub-matrix name -> (fused parameter name, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, layer_range: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec, ctx, layer_range, dtype)
        self.lm_head = (ParallelLMHead(spec.vocab_size, spec.hidden_size, ctx.tp, dtype)
                        if ctx.pp.is_last else PPMissingLayer())

    def forward(self, batch: ForwardBatch, intermediate: dict[str, torch.Tensor] | None = None):
        return self.model(batch, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[S, hidden] -> [S, vocab] float32 logits on tp_rank 0; None on the other TP ranks."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[S, hidden] -> [S] int64 argmax of compute_logits' rows, without gathering them; tp_rank 0, else None."""
        return self.lm_head.greedy(hidden)

    def ties_on_this_rank(self) -> bool:
        """Tied embeddings, and this rank holds both the embedding and the LM head (the first stage is the last)."""
        return (self.spec.tie_word_embeddings and isinstance(self.model.embed_tokens, VocabParallelEmbedding)
                and isinstance(self.lm_head, ParallelLMHead))

    def process_weights_after_loading(self) -> None:
        """Tied embeddings on a rank holding both ends: the embedding reads the LM head's rows (one copy), where
        the head keeps them as loaded (blocks, or dense without a packed copy) or in bf16 panels it can look rows
        up in. Runs after the children's."""
        if not self.ties_on_this_rank():
            return
        embed, head = self.model.embed_tokens, self.lm_head
        lookup = head.method.row_lookup(head)
        if lookup is not None and embed.format == "dense":
            if torch.equal(lookup(torch.arange(embed.weight.shape[0])), embed.weight):
                embed.read_rows_from(lookup)
        elif (embed.weight.shape == head.weight.shape and embed.weight.dtype == head.weight.dtype
                and torch.equal(embed.weight, head.weight)):
            embed.weight.data = head.weight.data

    def checkpoint_aliases(self) -> dict[str, str]:
        """Checkpoint names that feed an extra parameter: tied embeddings load the LM head too."""
        if self.spec.tie_word_embeddings and isinstance(self.lm_head, ParallelLMHead):
            return {"model.embed_tokens.weight": "lm_head.weight"}
        return {}
