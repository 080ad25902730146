#!/usr/bin/env python3
"""Write the model-format fixtures for the differential tests of `vram_residency::format`.

Every file and every expected value here comes from the UPSTREAM writers and readers, never from
our Rust code:

- `tiny-v3.gguf`, `tiny-v3-align64.gguf`: written by `gguf.GGUFWriter`; their
  `*.expected.json` lists what `gguf.GGUFReader` reports.
- `tiny.safetensors`: written by `safetensors.numpy.save_file`; its `.expected.json` lists what
  `safetensors.safe_open` / `safetensors.deserialize` report.
- `ggml-quant-sizes.json`: `gguf.constants.GGML_QUANT_SIZES` (block size, type size per ggml type).
- `adversarial/`: damaged copies of the upstream-written files (bad magic, empty, huge header
  length, over the header cap, past the end of the file, overlapping and out-of-bounds tensors), and
  `adversarial/expected.json`: for each, the field and byte offset a refusal must name (computed here
  from the file's own bytes and the upstream reader's field positions) and whether the upstream
  reader refuses it too.
- `safetensors-dtypes.json`: every dtype the upstream safetensors reader knows (taken from its own
  "unknown variant" error) with its size in bits, measured by asking the upstream reader which
  byte length it accepts for a tensor of shape [8].

Usage (deterministic; rerun after upgrading the packages, then commit the diff):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install gguf safetensors numpy
    /tmp/venv/bin/python scripts/make-fixtures.py
"""

import json
import re
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import safetensors
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "crates" / "vram-residency" / "tests" / "fixtures"
MAX_FIXTURE_BYTES = 64 * 1024


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def versions() -> dict:
    return {
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def make_gguf(path: Path, alignment: int | None) -> None:
    writer = gguf.GGUFWriter(str(path), "tiny")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name("tiny fixture")
    writer.add_uint32("tiny.context_length", 128)
    writer.add_float32("tiny.rope_eps", 1e-5)
    writer.add_bool("tiny.use_parallel_residual", True)
    writer.add_int64("tiny.negative", -7)
    writer.add_string("tiny.long_description", "x" * 100 + " (a string longer than the summary)")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "world", "ünï"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, -3.0, -4.0])
    # A nested value: an array of arrays of int32.
    writer.add_key_value(
        "tiny.nested", [[1, 2], [3, 4, 5]], gguf.GGUFValueType.ARRAY
    )

    # numpy shapes are row-major; GGUF stores them reversed (ne[0] = last numpy axis).
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("blk.0.attn_norm.weight", np.linspace(-1, 1, 3).astype(np.float16))
    # Q8_0 from raw block bytes: 2 rows x 1 block (34 bytes: f16 scale + 32 int8) each.
    q8 = np.arange(2 * 34, dtype=np.uint8).reshape(2, 34)
    writer.add_tensor("blk.0.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ids", np.arange(6, dtype=np.int32).reshape(2, 3))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    tensors = [
        {
            "name": t.name,
            "dtype": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],  # ggml order: ne[0] first
            "offset": int(t.data_offset),
            "bytes": int(t.n_bytes),
        }
        for t in reader.tensors
    ]
    tensors.sort(key=lambda t: (t["offset"], t["name"]))
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    arrays = {}
    for key in keys:
        field = reader.fields[key]
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            element = field.types[1].name.lower() if len(field.types) > 1 else "?"
            element = {"int32": "i32", "uint32": "u32", "float32": "f32", "int64": "i64",
                       "uint64": "u64", "float64": "f64", "int8": "i8", "uint8": "u8",
                       "int16": "i16", "uint16": "u16"}.get(element, element)
            # parts: key length, key, value type, element type, element count, elements...
            # (field.data flattens nested arrays, so it is not the top-level count).
            count = int(field.parts[4][0])
            arrays[key] = f"array<{element}>[{count}]"
    write_json(
        path.with_name(path.name + ".expected.json"),
        {
            "reader": "gguf.GGUFReader",
            "versions": versions(),
            "format": "gguf",
            "version": version,
            "file_len": path.stat().st_size,
            "alignment": int(reader.alignment),
            "data_offset": int(reader.data_offset),
            "metadata_keys": keys,
            "array_summaries": arrays,
            "tensors": tensors,
        },
    )


def make_safetensors(path: Path) -> None:
    tensors = {
        "embed.weight": np.arange(32, dtype=np.float32).reshape(4, 8),
        "norm.weight": np.linspace(-1, 1, 8).astype(np.float16),
        "positions": np.arange(5, dtype=np.int64),
        "scale": np.array(0.5, dtype=np.float32),  # a scalar: shape []
        "empty": np.zeros((0, 4), dtype=np.float32),  # zero bytes
    }
    metadata = {"format": "np", "note": "tiny fixture"}
    # Upstream serialises __metadata__ from a Rust HashMap, so its key order is random: write
    # until it comes out sorted, to keep the fixture byte-for-byte reproducible.
    for _ in range(256):
        save_file(tensors, str(path), metadata=metadata)
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        data_start = 8 + n
        header = json.loads(raw[8:data_start])
        if list(header["__metadata__"]) == sorted(metadata):
            break
    else:
        sys.exit("could not get a deterministic safetensors header")
    upstream = {name: info for name, info in safetensors.deserialize(raw)}
    expected = []
    with safetensors.safe_open(str(path), "np") as f:
        metadata = f.metadata()
        cursor = 0
        # offset_keys() is the upstream reader's offset order; upstream validates that the
        # tensors tile the data section, so the running sum of byte lengths is each offset.
        for name in f.offset_keys():
            s = f.get_slice(name)
            data = bytes(upstream[name]["data"])
            begin, end = header[name]["data_offsets"]
            assert begin == cursor and end - begin == len(data), name
            assert raw[data_start + begin : data_start + end] == data, name
            expected.append(
                {
                    "name": name,
                    "dtype": s.get_dtype(),
                    "shape": [int(d) for d in s.get_shape()],
                    "offset": data_start + cursor,
                    "bytes": len(data),
                }
            )
            cursor += len(data)
    expected.sort(key=lambda t: (t["offset"], t["name"]))
    write_json(
        path.with_name(path.name + ".expected.json"),
        {
            "reader": "safetensors.safe_open + safetensors.deserialize",
            "versions": versions(),
            "format": "safetensors",
            "file_len": len(raw),
            "data_offset": data_start,
            "metadata": metadata,
            "tensors": expected,
        },
    )


def safetensors_file(dtype: str, shape: list, length: int) -> bytes:
    header = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, length]}})
    header = header.encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * length


def upstream_accepts(raw: bytes) -> bool:
    try:
        safetensors.deserialize(raw)
        return True
    except Exception:  # the binding raises SafetensorError for every invalid header
        return False


def make_safetensors_dtypes(path: Path) -> None:
    try:
        safetensors.deserialize(safetensors_file("NOT_A_DTYPE", [8], 8))
        sys.exit("upstream accepted an unknown dtype")
    except Exception as e:
        message = str(e)
    names = re.findall(r"`([A-Z0-9_]+)`", message.split("expected one of", 1)[1])
    assert names, message
    bits = {}
    for name in names:
        # With shape [8], the byte length upstream accepts equals the size in bits.
        accepted = [n for n in range(0, 65) if upstream_accepts(safetensors_file(name, [8], n))]
        assert len(accepted) == 1, (name, accepted)
        bits[name] = accepted[0]
    write_json(path, {"versions": versions(), "bits": bits, "order": names})


def upstream_gguf_error(path: Path) -> str | None:
    try:
        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:  # the reader maps tensor data lazily; touch every tensor
            np.asarray(t.data).sum()
        return None
    except Exception as error:  # noqa: BLE001 - any refusal counts; its text is recorded
        return f"{type(error).__name__}: {error}"[:200]


def upstream_safetensors_error(raw: bytes) -> str | None:
    try:
        safetensors.deserialize(raw)
        return None
    except Exception as error:  # noqa: BLE001 - the binding raises SafetensorError
        return f"{type(error).__name__}: {error}"[:200]


def make_adversarial(out: Path) -> None:
    """Damaged models: each must be refused, naming the field and the byte offset listed."""
    out.mkdir(exist_ok=True)
    cases = []

    def add(name: str, data: bytes, fmt: str, candidates: list, upstream: str | None) -> None:
        (out / name).write_bytes(data)
        cases.append(
            {
                "file": name,
                "format": fmt,
                # The refusal must name one of these (field, offset) pairs.
                "expect_one_of": [{"field": f, "offset": o} for f, o in candidates],
                "upstream_refuses": upstream is not None,
                "upstream_error": upstream,
            }
        )

    # --- safetensors, from the upstream-written tiny.safetensors ---
    st = (OUT / "tiny.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", st[:8])
    header = json.loads(st[8 : 8 + n])

    def with_header_len(value: int) -> bytes:
        return struct.pack("<Q", value) + st[8:]

    for name, value in [
        ("st-header-len-huge.safetensors", 1 << 60),
        ("st-header-len-over-cap.safetensors", 100 * 1024 * 1024 + 1),
        ("st-header-len-past-eof.safetensors", len(st)),
    ]:
        data = with_header_len(value)
        add(name, data, "safetensors", [("header_len", 0)], upstream_safetensors_error(data))

    def rewrite(mutate) -> tuple[bytes, bytes]:
        h = json.loads(json.dumps(header))
        mutate(h)
        text = json.dumps(h, separators=(",", ":")).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        return struct.pack("<Q", len(text)) + text + st[8 + n :], text

    # Overlap: the tensor that follows another one moved 8 bytes back, into it (same length, so
    # the first thing wrong in offset order is the overlap, not a gap).
    by_begin = sorted(
        (k for k in header if k != "__metadata__" and header[k]["data_offsets"][1] > header[k]["data_offsets"][0]),
        key=lambda k: header[k]["data_offsets"][0],
    )
    before, moved = by_begin[0], by_begin[1]
    b, e = header[moved]["data_offsets"]
    data, text = rewrite(lambda h: h[moved].__setitem__("data_offsets", [b - 8, e - 8]))
    candidates = [
        (f'header["{k}"].data_offsets', 8 + text.index(f'"{k}":'.encode()))
        for k in (moved, before)
    ]
    add("st-overlap.safetensors", data, "safetensors", candidates, upstream_safetensors_error(data))

    # Out of bounds: "scale" ends 4 bytes past the data section.
    data_len = len(st) - 8 - n
    data, text = rewrite(
        lambda h: h["scale"].__setitem__("data_offsets", [data_len, data_len + 4])
    )
    at = 8 + text.index(b'"scale":')
    add(
        "st-out-of-bounds.safetensors",
        data,
        "safetensors",
        [('header["scale"].data_offsets', at)],
        upstream_safetensors_error(data),
    )

    # --- GGUF, from the upstream-written tiny-v3.gguf ---
    gg = (OUT / "tiny-v3.gguf").read_bytes()
    bad = bytearray(gg)
    bad[3:4] = b"X"
    (out / "gguf-bad-magic.gguf").write_bytes(bad)
    add(
        "gguf-bad-magic.gguf",
        bytes(bad),
        "gguf",
        [("magic", 0)],
        upstream_gguf_error(out / "gguf-bad-magic.gguf"),
    )
    (out / "empty.gguf").write_bytes(b"")
    add("empty.gguf", b"", "gguf", [("magic", 0)], upstream_gguf_error(out / "empty.gguf"))

    # Tensor offsets: where each tensor_info's offset field lies, from the upstream reader's parts.
    reader = gguf.GGUFReader(str(OUT / "tiny-v3.gguf"))
    infos = []
    for index, t in enumerate(reader.tensors):
        field = t.field
        offset_at = field.offset + sum(int(p.nbytes) for p in field.parts[:-1])
        (relative,) = struct.unpack_from("<Q", gg, offset_at)
        assert relative == int(t.data_offset) - int(reader.data_offset), t.name
        infos.append((index, offset_at, relative, int(t.n_bytes)))
    nonempty = [i for i in infos if i[3] > 0]
    first, second = nonempty[0], nonempty[1]

    # Overlap: the second tensor placed at the first one's offset (still aligned).
    data = bytearray(gg)
    struct.pack_into("<Q", data, second[1], first[2])
    (out / "gguf-overlap.gguf").write_bytes(data)
    add(
        "gguf-overlap.gguf",
        bytes(data),
        "gguf",
        [(f"tensor_info[{i[0]}].offset", i[1]) for i in (first, second)],
        upstream_gguf_error(out / "gguf-overlap.gguf"),
    )

    # Out of bounds: the last tensor moved one alignment unit past the end of the file.
    last = max(infos, key=lambda i: i[2])
    past = (len(gg) - int(reader.data_offset) + int(reader.alignment)) // int(reader.alignment)
    data = bytearray(gg)
    struct.pack_into("<Q", data, last[1], past * int(reader.alignment))
    (out / "gguf-out-of-bounds.gguf").write_bytes(data)
    add(
        "gguf-out-of-bounds.gguf",
        bytes(data),
        "gguf",
        [(f"tensor_info[{last[0]}].offset", last[1])],
        upstream_gguf_error(out / "gguf-out-of-bounds.gguf"),
    )

    write_json(out / "expected.json", {"versions": versions(), "cases": cases})


def make_quant_sizes(path: Path) -> None:
    sizes = {
        t.name: {"id": int(t.value), "block_size": int(b), "type_size": int(s)}
        for t, (b, s) in gguf.constants.GGML_QUANT_SIZES.items()
    }
    write_json(path, {"versions": versions(), "types": sizes})


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    make_gguf(OUT / "tiny-v3.gguf", None)
    make_gguf(OUT / "tiny-v3-align64.gguf", 64)
    make_safetensors(OUT / "tiny.safetensors")
    make_safetensors_dtypes(OUT / "safetensors-dtypes.json")
    make_quant_sizes(OUT / "ggml-quant-sizes.json")
    make_adversarial(OUT / "adversarial")
    for f in sorted(OUT.iterdir()):
        size = f.stat().st_size
        assert size < MAX_FIXTURE_BYTES, f"{f.name} is {size} bytes"
        print(f"{size:6d}  {f.relative_to(OUT.parent.parent.parent.parent)}")


if __name__ == "__main__":
    main()
