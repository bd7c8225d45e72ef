"""GGUF header, metadata and tensor table, parsed once with struct/numpy over a memory map (no tensor data read)."""
from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32                   # general.alignment when the file does not say
_STRING, _ARRAY = 8, 9
# GGUF value type -> (struct code, numpy dtype) for the fixed-size types
_FIXED = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
          5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
          12: ("d", np.float64)}

# How many times this process parsed a GGUF file's metadata. The driver parses once and ships the spec (tensor
# table included) to the workers, which map only the tensor data: a worker's count stays 0.
parse_count = 0


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes lie in the file and how they are stored."""
    name: str
    ggml_type: int                       # GGMLQuantizationType value: 0 F32, 1 F16, 3 Q4_1, 8 Q8_0, 30 BF16, ...
    dims: tuple[int, ...]                # GGUF order: innermost (ne0 = in_features) first
    offset: int                          # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch order: [out, in] for a matrix."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        """The GGML type name as stored: "F32", "BF16", "Q4_1", ..."""
        import gguf
        return gguf.GGMLQuantizationType(self.ggml_type).name


class StringArray:
    """A GGUF array of strings (a vocab, a merge table) left as bytes until asked for: `len()` and `index()`
    need no decoding; `tolist()` decodes every element once (what a tokenizer needs)."""

    def __init__(self, blob: bytes, starts: np.ndarray, end: int, byte_order: str = "<"):
        self._blob, self._starts, self._end = blob, starts, end     # starts[i]: offset of item i's uint64 length
        self._order = byte_order
        self._decoded: list[str] | None = None

    def __len__(self) -> int:
        return len(self._starts)

    def tolist(self) -> list[str]:
        if self._decoded is None:
            ends = np.append(self._starts[1:], self._end).tolist()
            blob = self._blob
            self._decoded = [blob[s + 8:e].decode("utf-8") for s, e in zip(self._starts.tolist(), ends)]
        return self._decoded

    def index(self, text: str) -> int | None:
        """Position of the element equal to `text`, or None (a byte search: nothing decoded)."""
        if not len(self._starts):
            return None
        raw = text.encode("utf-8")
        needle = struct.pack(self._order + "Q", len(raw)) + raw       # the item as stored: length, then bytes
        pos = self._blob.find(needle, int(self._starts[0]), self._end)
        while pos >= 0:
            i = int(np.searchsorted(self._starts, pos))
            if i < len(self._starts) and self._starts[i] == pos:
                return i
            pos = self._blob.find(needle, pos + 1, self._end)
        return None


@dataclass
class GGUFMetadata:
    """A GGUF file's metadata (scalars as Python values, numeric arrays as numpy arrays, string arrays as
    StringArray) and its tensor table."""
    path: str
    version: int
    fields: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]
    data_offset: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def read_gguf_metadata(path: str) -> GGUFMetadata:
    """The metadata of `path`, parsed once per process and file version (size, mtime)."""
    st = os.stat(path)
    return _read_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFMetadata:
    return parse_gguf_metadata(path)


def parse_gguf_metadata(path: str) -> GGUFMetadata:
    """Parse the header, every metadata key and the tensor table of a GGUF file (v2 / v3, either byte order)."""
    global parse_count
    parse_count += 1
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        e = "<"
        version = struct.unpack_from("<I", mm, 4)[0]
        if version & 0xFFFF == 0:                   # written on a big-endian machine
            e, version = ">", struct.unpack_from(">I", mm, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
        n_tensors, n_kv = struct.unpack_from(e + "QQ", mm, 8)
        parser = _Parser(mm, e)
        pos, fields = 24, {}
        for _ in range(n_kv):
            key, pos = parser.string(pos)
            (vtype,), pos = struct.unpack_from(e + "I", mm, pos), pos + 4
            fields[key], pos = parser.value(vtype, pos)
        raw_tensors = []
        for _ in range(n_tensors):
            name, pos = parser.string(pos)
            (n_dims,) = struct.unpack_from(e + "I", mm, pos)
            dims = struct.unpack_from(f"{e}{n_dims}Q", mm, pos + 4)
            ggml_type, offset = struct.unpack_from(e + "IQ", mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            raw_tensors.append((name, ggml_type, tuple(int(d) for d in dims), offset))
        blob = mm[:pos]                             # the metadata bytes outlive the map (lazy string arrays)
    parser.finish(blob, fields)
    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = -(-pos // alignment) * alignment
    tensors, names = [], set()
    for name, ggml_type, dims, offset in raw_tensors:
        if name in names:
            raise ValueError(f"{path}: tensor {name} appears twice in the tensor table")
        names.add(name)
        tensors.append(GGUFTensorInfo(name, ggml_type, dims, data_offset + offset, _n_bytes(ggml_type, dims)))
    return GGUFMetadata(path, version, fields, tuple(tensors), data_offset)


def _n_bytes(ggml_type: int, dims: tuple[int, ...]) -> int:
    import gguf
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return int(np.prod(dims, dtype=np.int64)) * type_size // block


class _Parser:
    """Reads values at offsets of the mapped file; string arrays are only walked (their item offsets kept)."""

    def __init__(self, mm: mmap.mmap, e: str):
        self.mm, self.e = mm, e
        self._q = struct.Struct(e + "Q").unpack_from
        self._pending: list[tuple[str, int, int, np.ndarray, int]] = []     # string arrays to wrap at the end

    def string(self, pos: int) -> tuple[str, int]:
        (n,) = self._q(self.mm, pos)
        return self.mm[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

    def value(self, vtype: int, pos: int) -> tuple[Any, int]:
        if vtype in _FIXED:
            code, dtype = _FIXED[vtype]
            return struct.unpack_from(self.e + code, self.mm, pos)[0], pos + np.dtype(dtype).itemsize
        if vtype == _STRING:
            return self.string(pos)
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {pos}")
        itype, count = struct.unpack_from(self.e + "IQ", self.mm, pos)
        pos += 12
        if itype in _FIXED:
            dtype = np.dtype(_FIXED[itype][1]).newbyteorder(self.e)
            end = pos + count * dtype.itemsize
            return np.frombuffer(self.mm[pos:end], dtype=dtype).astype(dtype.newbyteorder("="), copy=False), end
        if itype == _STRING:
            q, mm = self._q, self.mm
            starts = [0] * count
            for i in range(count):                  # variable-length items: walk the lengths, decode nothing
                starts[i] = pos
                pos += 8 + q(mm, pos)[0]
            return _PendingStrings(np.array(starts, dtype=np.int64), pos), pos
        if itype == _ARRAY:                          # arrays of arrays: none in llama files; read them whole
            items = []
            for _ in range(count):
                item, pos = self.value(_ARRAY, pos)
                items.append(item)
            return items, pos
        raise ValueError(f"unknown GGUF array item type {itype} at byte {pos}")

    def finish(self, blob: bytes, fields: dict) -> None:
        def wrap(v):
            if isinstance(v, _PendingStrings):
                return StringArray(blob, v.starts, v.end, self.e)
            if isinstance(v, list):
                return [wrap(x) for x in v]
            return v
        for key, v in fields.items():
            fields[key] = wrap(v)


@dataclass
class _PendingStrings:
    starts: np.ndarray
    end: int
