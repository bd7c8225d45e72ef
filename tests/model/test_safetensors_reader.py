"""The safetensors reader maps each file once and serves tensors as views of the map (one copy when loaded),
equal to what the safetensors library reads, aligned or not; a file that is not safetensors is named."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardserve.model.safetensors_reader import SafetensorsLazyTensor, open_safetensors


def test_tensors_equal_the_library_and_are_views_of_one_map(tmp_path):
    tensors = {"a": torch.randn(3).bfloat16(),           # 6 bytes: the float32 after it starts 2 bytes off
               "b": torch.randn(4, 5), "c": torch.arange(7, dtype=torch.int64), "e": torch.zeros(0, 4),
               "f": torch.randn(8, 6).half()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    handles = open_safetensors(str(tmp_path))
    assert set(handles) == set(tensors) and len({id(h) for h in handles.values()}) == 1
    reference = load_file(str(tmp_path / "model.safetensors"))
    mapped = handles["b"].bytes
    for name, want in reference.items():
        lazy = SafetensorsLazyTensor(handles[name], name)
        assert lazy.shape == tuple(want.shape) and lazy.dtype == want.dtype
        assert torch.equal(lazy.full(), want), name
        if want.dim() == 2 and want.shape[0]:
            assert torch.equal(lazy.narrow(1, 1, 3), want[:, 1:4]) and torch.equal(lazy.narrow(0, 1, 2), want[1:3])
        offset = handles[name].base + handles[name].entries[name]["data_offsets"][0]
        shares_map = lazy.full().untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr()
        assert shares_map == (offset % want.element_size() == 0), name   # a view of the map unless misaligned


@pytest.mark.parametrize("content", [b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt", b"\xff" * 16, b"\x02"])
def test_a_file_that_is_not_safetensors_is_named(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        open_safetensors(str(tmp_path))


def test_sharded_folder_follows_its_index(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "part-1.safetensors"))
    save_file({"y": torch.zeros(3)}, str(tmp_path / "part-2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}')
    handles = open_safetensors(str(tmp_path))
    assert os.path.basename(handles["y"].path) == "part-2.safetensors"
    assert torch.equal(SafetensorsLazyTensor(handles["y"], "y").full(), torch.zeros(3))
