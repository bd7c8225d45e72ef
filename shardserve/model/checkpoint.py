"""CheckpointReader: HF-named lazy access to the tensors of a safetensors folder or a GGUF file."""
from __future__ import annotations

from typing import Any

from shardserve.model.gguf_reader import GGUFLazyTensor, PermutedVector, gguf_to_hf_name, map_tensors, spec_tensor_table
from shardserve.model.lazy_tensors import LazyTensor
from shardserve.model.safetensors_reader import SafetensorsLazyTensor, open_safetensors
from shardserve.model.spec import ModelSpec
# where the names imported from this module before the split live now
from shardserve.model.spec_reader import default_model_path, read_model_spec  # noqa: F401

_QK = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias")


class CheckpointReader:
    """HF-named lazy access to a checkpoint's tensors; nothing is read until a slice is asked for.

    When embeddings are tied and no lm_head.weight is stored, names() omits it but
    get("lm_head.weight") returns the embedding tensor. A GGUF file is located through the tensor table in the
    spec (read once by the driver): opening it here maps the tensor data and parses no metadata.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._tensors: dict[str, Any] = {}  # HF name -> MappedSafetensors, or (GGUFTensorInfo, mapped bytes)
        if spec.format == "gguf":
            mapped = map_tensors(spec.weights_path, spec_tensor_table(spec))
            for gguf_name, entry in mapped.items():
                hf = gguf_to_hf_name(gguf_name)
                if hf is not None:
                    self._tensors[hf] = entry
        elif spec.format == "safetensors":
            self._tensors = open_safetensors(spec.weights_path)
        else:
            raise ValueError(f"unknown checkpoint format {spec.format!r}; expected 'safetensors' or 'gguf'")

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> LazyTensor:
        if name not in self._tensors:
            if name == "lm_head.weight" and "model.embed_tokens.weight" in self._tensors:
                return self.get("model.embed_tokens.weight")  # tied embeddings
            raise KeyError(f"{name} is not in the checkpoint at {self.spec.weights_path}")
        if self.spec.format == "safetensors":
            return SafetensorsLazyTensor(self._tensors[name], name)
        permuted = self.spec.head_dim if name.endswith(_QK) else None
        info, data = self._tensors[name]
        if permuted is not None and len(info.dims) == 1:
            return PermutedVector(GGUFLazyTensor(info, data), permuted)
        return GGUFLazyTensor(info, data, permuted)

    def tensor_format(self, name: str) -> str:
        """How `name` is stored: a GGML type name for GGUF ("F32", "Q8_0", ...), "dense" for safetensors."""
        if self.spec.format == "safetensors":
            return "dense"
        if name not in self._tensors and name == "lm_head.weight":
            name = "model.embed_tokens.weight"                 # tied embeddings
        return self._tensors[name][0].type_name

    def close(self) -> None:
        self._tensors.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_checkpoint(spec: ModelSpec) -> CheckpointReader:
    """Open the checkpoint that `spec` describes for lazy, sliced reads."""
    return CheckpointReader(spec)
