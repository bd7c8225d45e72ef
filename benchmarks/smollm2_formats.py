"""Write F32 / BF16 / Q8_0 GGUF variants of the embedded SmolLM2 (Q4_1) by dequantizing and re-encoding every tensor.

    .venv/bin/python benchmarks/smollm2_formats.py [--out DIR] [--formats F32 BF16 Q8_0] [--verify]

Every tensor is dequantized from the shipped Q4_1 file (gguf.quants.dequantize) and re-encoded: F32 as is, BF16
(round to nearest even) and Q8_0 by gguf.quants.quantize. Tensors stored as F32 in the source (the 1-D norm weights)
stay F32 in every variant, as llama.cpp's converter keeps them. All KV metadata (tokenizer arrays, chat template,
...) is copied unchanged except general.file_type; GGUFWriter writes general.architecture itself. The variants
therefore hold the Q4_1 model's values (F32 exactly), not the original bf16 checkpoint's: they measure the cost of
the storage formats on the same function, not of the Q4_1 quantization.

--verify re-reads each written file and checks its tensors against the dequantized source (F32: bit-equal; BF16:
equal to the source rounded to bf16; Q8_0: equal to quantize->dequantize of the source), then loads the F32 file in
shardserve and checks it greedily answers "What is the capital of France?" as the Q4_1 file does (mentioning Paris).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

FORMATS = ("F32", "BF16", "Q8_0")
SKIP_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.file_type")
QUESTION = "What is the capital of France?"


def default_out_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "shardserve", "models")


def _types(fmt: str):
    import gguf

    qtype = {"F32": gguf.GGMLQuantizationType.F32, "BF16": gguf.GGMLQuantizationType.BF16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}[fmt]
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[fmt]
    return qtype, ftype


def variant_path(src: str, fmt: str, out_dir: str) -> str:
    base = os.path.basename(src)
    stem = base.rsplit(".", 2)[0] if base.count(".") >= 2 else base.rsplit(".", 1)[0]   # drop ".Q4_1.gguf"
    return os.path.join(out_dir, f"{stem}.{fmt}.gguf")


def encode(values: np.ndarray, fmt: str, source_is_f32: bool) -> tuple[np.ndarray, object]:
    """values [rows, cols] float32 -> (array to write, its GGML type). Source-F32 tensors (norms) stay F32."""
    import gguf

    qtype, _ = _types(fmt)
    if fmt == "F32" or source_is_f32:
        return np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype), qtype


def write_variant(src: str, fmt: str, out_path: str) -> str:
    """Write one variant of the GGUF at `src` to `out_path` (metadata copied, tensors re-encoded)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    _, ftype = _types(fmt)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    tmp = out_path + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        if name in SKIP_FIELDS:
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(int(ftype))
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)                 # [rows, cols] float32 (numpy order)
        data, qtype = encode(values, fmt, t.tensor_type == gguf.GGMLQuantizationType.F32)
        writer.add_tensor(t.name, data, raw_dtype=None if qtype == gguf.GGMLQuantizationType.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return out_path


def verify_tensors(src: str, fmt: str, path: str) -> int:
    """Checks every tensor of `path` against the dequantized source; returns the number of tensors checked."""
    import gguf

    a, b = gguf.GGUFReader(src), gguf.GGUFReader(path)
    fa = {k: f.contents() for k, f in a.fields.items() if k not in SKIP_FIELDS}
    fb = {k: f.contents() for k, f in b.fields.items() if k not in SKIP_FIELDS}
    differ = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    assert not differ, f"{path}: metadata differs in {differ}"
    assert b.fields["general.file_type"].contents() == int(_types(fmt)[1])
    tb = {t.name: t for t in b.tensors}
    assert [t.name for t in a.tensors] == list(tb), f"{path}: tensor names differ"
    for t in a.tensors:
        src_vals = gguf.quants.dequantize(t.data, t.tensor_type)
        got = gguf.quants.dequantize(tb[t.name].data, tb[t.name].tensor_type).reshape(src_vals.shape)
        if fmt == "F32" or t.tensor_type == gguf.GGMLQuantizationType.F32:
            want = src_vals
        else:
            qtype = _types(fmt)[0]
            want = gguf.quants.dequantize(gguf.quants.quantize(src_vals, qtype), qtype).reshape(src_vals.shape)
        assert np.array_equal(got, want), f"{path}: {t.name} differs from the dequantized source"
    return len(a.tensors)


def answer(path: str) -> str:
    from shardserve import LLM, SamplingParams

    with LLM(model=path, max_model_len=256, kv_cache_memory=64 << 20) as llm:
        out = llm.chat([{"role": "user", "content": QUESTION}], SamplingParams(temperature=0.0, max_tokens=24),
                       use_tqdm=False)
    return out[0].outputs[0].text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=None, help="source GGUF (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--out", default=default_out_dir(), help="output directory (default %(default)s)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--force", action="store_true", help="rewrite files that already exist")
    ap.add_argument("--verify", action="store_true", help="check tensors, metadata and the F32 file's answer")
    args = ap.parse_args(argv)
    if args.src is None:
        from shardserve.model.checkpoint import default_model_path
        args.src = default_model_path()
    rows = []
    for fmt in args.formats:
        path = variant_path(args.src, fmt, args.out)
        t0 = time.perf_counter()
        if args.force or not os.path.exists(path):
            write_variant(args.src, fmt, path)
        rows.append((fmt, path, os.path.getsize(path), time.perf_counter() - t0))
    print(f"{'format':<6} {'MiB':>8} {'seconds':>8}  path")
    for fmt, path, size, secs in rows:
        print(f"{fmt:<6} {size / 2**20:>8.1f} {secs:>8.1f}  {path}")
    if args.verify:
        for fmt, path, _, _ in rows:
            print(f"{fmt}: {verify_tensors(args.src, fmt, path)} tensors and the metadata match the source")
        if "F32" in args.formats:
            want, got = answer(args.src), answer(variant_path(args.src, "F32", args.out))
            print(f"Q4_1 answers: {want!r}\nF32  answers: {got!r}")
            if got != want or "Paris" not in got:
                print("FAIL: the F32 variant does not answer as the Q4_1 source", file=sys.stderr)
                return 1
            print("F32 variant answers as the source and mentions Paris")
    return 0


if __name__ == "__main__":
    sys.exit(main())
