"""Hugging Face checkpoint folders on disk: reading tensors one at a time, writing shards, side files.

Safetensors are read (PyTorch pickles only with allow_pickle). A stage rewrites a checkpoint
with `rewrite_checkpoint`, which streams tensors from the input shards into output shards of a
maximum size, with the index file when there is more than one shard.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from qlora_requant.pipeline.config import DEFAULT_MAX_SHARD_BYTES
from qlora_requant.pipeline.progress import progress
from qlora_requant.pipeline.safetensors_io import DTYPES, read_header, read_tensor, write_file
from qlora_requant.quant.errors import InputError
from qlora_requant.quant.json_files import read_json_object

CONFIG = "config.json"
SINGLE_SHARD = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SHARD = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def read_model_config(model_dir: Path) -> dict:
    """config.json of a checkpoint folder, or an InputError naming what is missing."""
    path = model_dir / CONFIG
    if not path.is_file():
        raise InputError(f"{path}: not found; expected a Hugging Face checkpoint folder with config.json")
    return read_json_object(path)


def shard_files(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors shards of a checkpoint, in index order; with `allow_pickle`, PyTorch pickle
    shards (pytorch_model*.bin) when the folder has no safetensors."""
    index = model_dir / INDEX
    if allow_pickle and not index.is_file() and not (model_dir / SINGLE_SHARD).is_file():
        index = model_dir / PICKLE_INDEX
        if not index.is_file() and (model_dir / PICKLE_SHARD).is_file():
            return [model_dir / PICKLE_SHARD]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(
                f"{index}: not a valid index (JSON with a weight_map); re-download or re-save it"
            ) from None
        shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / SINGLE_SHARD).is_file():
        shards = [model_dir / SINGLE_SHARD]
    else:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (
            f" (found {pickles[0]}: convert it to safetensors, or set allow_pickle: true if you trust it)"
            if pickles
            else ""
        )
        raise InputError(
            f"{model_dir}: no {SINGLE_SHARD} or {INDEX}{hint}; give a Hugging Face checkpoint "
            "folder saved with safetensors"
        )
    for shard in shards:
        if not shard.is_file():
            raise InputError(f"{shard}: listed in {index.name} but missing")
    return shards


def tensor_names(model_dir: Path) -> list[str]:
    """The tensor names in a safetensors checkpoint's shard headers (no tensor is read); [] for a checkpoint saved
    as PyTorch pickles only."""
    if not (model_dir / INDEX).is_file() and not (model_dir / SINGLE_SHARD).is_file():
        return []
    return [name for shard in shard_files(model_dir) for name in read_header(shard)[0]]


class CheckpointReader:
    """Random access to the tensors of a sharded safetensors checkpoint, one tensor at a time.

    Each tensor is read into memory of its own (no memory map), so reading a whole checkpoint keeps
    no more than the tensors the caller holds. With `allow_pickle`, a checkpoint saved only as
    PyTorch pickles is read too: with torch's weights-only unpickler, memory-mapped.
    """

    def __init__(self, model_dir: Path, allow_pickle: bool = False):
        self.model_dir = model_dir
        self.shards = shard_files(model_dir, allow_pickle)
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        for shard in self.shards:
            if shard.suffix == ".bin":
                self._pickled.update(_load_pickle(shard))
                continue
            header, data_start = read_header(shard)
            self._entries.update({name: (shard, entry, data_start) for name, entry in header.items()})

    def __contains__(self, key: str) -> bool:
        return key in self._entries or key in self._pickled

    def keys(self) -> list[str]:
        return list(self._entries) + list(self._pickled)

    def get(self, key: str) -> torch.Tensor:
        if key in self._pickled:
            return self._pickled[key].clone()
        return read_tensor(*self._entries[key])

    def shape(self, key: str) -> torch.Size:
        """A tensor's shape, from the file header (nothing is read)."""
        if key in self._pickled:
            return self._pickled[key].shape
        return torch.Size(self._entries[key][1]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """A tensor's dtype, from the file header (nothing is read)."""
        if key in self._pickled:
            return self._pickled[key].dtype
        return DTYPES[self._entries[key][1]["dtype"]]


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch pickle of tensors, memory-mapped, through the weights-only unpickler (no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe pickle
        raise InputError(
            f"{path}: cannot be read as a weights-only PyTorch pickle ({type(exc).__name__}: "
            f"{exc}); convert it to safetensors"
        ) from None


def release_freed_memory() -> None:
    """Hand memory freed by Python back to the OS (glibc keeps it otherwise); no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TensorSource(Protocol):
    """What the streaming stages read from: a CheckpointReader, or a view computing tensors on demand."""

    model_dir: Path

    def __contains__(self, key: str) -> bool: ...
    def keys(self) -> list[str]: ...
    def get(self, key: str) -> torch.Tensor: ...
    def shape(self, key: str) -> torch.Size: ...


TensorTransform = Callable[[str, TensorSource], dict[str, torch.Tensor]]


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (a larger tensor gets
    a shard of its own), named and indexed as transformers names them. Holds one shard in memory."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shard_keys: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        write_file(self._buffer, self.out_dir / f"shard-{len(self._shard_keys)}.partial", metadata={"format": "pt"})
        self._shard_keys.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0
        release_freed_memory()

    def close(self) -> int:
        """Write the last shard, give shards their final names and the index; return the tensor count."""
        if self._buffer:
            self._flush()
        count = len(self._shard_keys)
        names = (
            [SINGLE_SHARD] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map = {}
        for i, (name, keys) in enumerate(zip(names, self._shard_keys)):
            (self.out_dir / f"shard-{i}.partial").rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return len(weight_map)


def rewrite_checkpoint(
    reader: TensorSource,
    out_dir: Path,
    transform: TensorTransform,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    what: str = "rewrite",
) -> int:
    """Write `transform(key, reader)` for every input tensor, one tensor at a time, into shards.

    `transform` returns the output tensors for one input key (none to drop it). Returns the
    number of tensors written. Progress is reported under the name `what`.
    """
    writer = ShardWriter(out_dir, max_shard_bytes)
    for key in progress(reader.keys(), what, "tensors"):
        for name, tensor in transform(key, reader).items():
            writer.add(name, tensor)
        release_freed_memory()  # the transform's temporaries, before the next tensor's
    return writer.close()


def side_files(model_dir: Path) -> Iterator[Path]:
    """Files of a checkpoint folder other than weights, index and config (tokenizer, generation config)."""
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in (CONFIG, INDEX) and not path.name.endswith(WEIGHT_SUFFIXES):
            yield path


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer and generation files from one checkpoint folder to another."""
    for path in side_files(src):
        shutil.copy2(path, dst / path.name)


def write_model_config(config: dict, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json for a plain 16-bit checkpoint: no quantization_config, dtype recorded."""
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def dtype_of(name: str, where: str = "config.json") -> torch.dtype:
    """torch dtype from its name ('bfloat16' or 'torch.bfloat16')."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"{where}: {name!r} is not a torch dtype")
    return dtype


def checkpoint_dtype(model_config: dict, where: Path) -> torch.dtype:
    """The dtype a checkpoint's config.json records ('dtype', or the older 'torch_dtype')."""
    name = model_config.get("dtype") or model_config.get("torch_dtype")
    if name is None:
        raise InputError(f"{where}: records no dtype; set base.dtype (or merge.dtype) in the config")
    return dtype_of(name, str(where))


def is_bnb_4bit(model_config: dict) -> bool:
    """Whether config.json describes a checkpoint saved in bitsandbytes 4-bit form."""
    return bool(model_config.get("quantization_config", {}).get("load_in_4bit"))
