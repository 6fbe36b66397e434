"""The safetensors file format, read and written without memory maps or extra copies.

safetensors' own `safe_open` memory-maps a file, so every page a reader touches counts as resident
memory until the file is closed, and `save_file` copies each tensor into a bytes object first.
Streaming a model bigger than RAM needs neither: tensors are read with one positioned read into
their own buffer, and written straight from their memory. The layout (an 8-byte little-endian
header length, a JSON header padded to 8 bytes, then the raw data) is safetensors' documented one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from qlora_requant.quant.errors import InputError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors file ({name: {dtype, shape, data_offsets}}) and where data starts.

    Refuses what safetensors itself refuses to load: a header that is not an object of well-formed
    entries, a byte range that does not hold its tensor's shape and dtype, and tensors that overlap,
    leave gaps, or stop short of the end of the file or lie past it.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little") if size >= 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise InputError(f"{path}: not a safetensors file (bad header length); re-download or re-save it")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: safetensors header is not valid JSON; re-download or re-save it") from None
    if not isinstance(header, dict):
        raise InputError(
            f"{path}: safetensors header is a JSON {type(header).__name__}, not an object; re-download or re-save it"
        )
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise InputError(
            f"{path}: safetensors __metadata__ is {metadata!r}, not an object of strings; re-download or re-save it"
        )
    for name, entry in header.items():
        problem = entry_problem(entry)
        if problem:
            raise InputError(f"{path}: tensor {name!r} {problem}; the header is corrupt: re-download or re-save it")
    check_layout(path, header, size - 8 - length)
    return header, 8 + length


def _is_count(value: object) -> bool:
    """A JSON integer >= 0 (not a float, not a boolean)."""
    return type(value) is int and value >= 0


def entry_problem(entry: object) -> str | None:
    """What is wrong with one tensor entry of a safetensors header, or None."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object with dtype, shape and data_offsets"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        return f"has dtype {dtype!r}, not one of {', '.join(DTYPES)}"
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        return f"has shape {shape!r}, not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(offset) for offset in offsets):
        return f"has data_offsets {offsets!r}, not two non-negative integers"
    begin, end = offsets
    if begin > end:
        return f"has data_offsets {offsets} that end before they begin"
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        return f"is {dtype} {shape} ({nbytes} bytes), but its data_offsets {offsets} span {end - begin} bytes"
    return None


def check_layout(path: Path, header: dict[str, dict], data_bytes: int) -> None:
    """Refuse tensors that lie past the end of the data, overlap, leave gaps, or leave bytes after the last."""
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        if stop > data_bytes:
            raise InputError(
                f"{path}: tensor {name!r} lies past the end of the file; the file may be truncated: "
                "re-download or re-save it"
            )
        if begin != end:
            raise InputError(
                f"{path}: tensor {name!r} starts at data byte {begin}, but the tensors before it end at {end} "
                f"({'overlapping them' if begin < end else 'leaving a gap'}); the header is corrupt: "
                "re-download or re-save it"
            )
        end = stop
    if end != data_bytes:
        raise InputError(
            f"{path}: {data_bytes - end} bytes after the last tensor's data that no tensor covers; the header is "
            "corrupt: re-download or re-save it"
        )


def read_tensor(path: Path, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor, read into memory of its own."""
    begin, end = entry["data_offsets"]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb") as file:
        file.seek(data_start + begin)
        if file.readinto(buffer.numpy()) != end - begin:
            raise InputError(f"{path}: ended early while reading a tensor; the file may be truncated")
    return buffer.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as one safetensors file, each straight from its memory; fsync before returning."""
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as file:
        file.write(len(blob).to_bytes(8, "little"))
        file.write(blob)
        for tensor in tensors.values():
            file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        file.flush()
        os.fsync(file.fileno())
