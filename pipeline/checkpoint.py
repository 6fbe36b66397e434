"""Hugging Face checkpoint folders on disk: reading tensors shard by shard, writing shards, side files.

Only safetensors are read. A stage rewrites a checkpoint with `rewrite_checkpoint`, which keeps
the input's shard layout and writes the index file when there is more than one shard.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quant.errors import InputError

CONFIG = "config.json"
SINGLE_SHARD = "model.safetensors"
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def read_model_config(model_dir: Path) -> dict:
    """config.json of a checkpoint folder, or an InputError naming what is missing."""
    path = model_dir / CONFIG
    if not path.is_file():
        raise InputError(f"{path}: not found; expected a Hugging Face checkpoint folder with config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, in index order."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / SINGLE_SHARD).is_file():
        shards = [model_dir / SINGLE_SHARD]
    else:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {pickles[0]}: convert it to safetensors first)" if pickles else ""
        raise InputError(f"{model_dir}: no {SINGLE_SHARD} or {INDEX}{hint}")
    for shard in shards:
        if not shard.is_file():
            raise InputError(f"{shard}: listed in {INDEX} but missing")
    return shards


class CheckpointReader:
    """Random access to the tensors of a sharded safetensors checkpoint, one tensor at a time."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.shards = shard_files(model_dir)
        self._handles = {}
        self.shard_keys: dict[Path, list[str]] = {}
        self._shard_of: dict[str, Path] = {}
        for shard in self.shards:
            keys = list(self._handle(shard).keys())
            self.shard_keys[shard] = keys
            self._shard_of.update(dict.fromkeys(keys, shard))

    def _handle(self, shard: Path):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(shard, framework="pt")
            except (SafetensorError, OSError) as exc:
                raise InputError(f"{shard}: cannot be read as safetensors ({exc}); re-download or re-save it") from None
        return self._handles[shard]

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def get(self, key: str) -> torch.Tensor:
        shard = self._shard_of[key]
        try:
            return self._handle(shard).get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{shard}: tensor {key!r} cannot be read ({exc}); the file may be truncated") from None


TensorTransform = Callable[[str, CheckpointReader], dict[str, torch.Tensor]]


def rewrite_checkpoint(reader: CheckpointReader, out_dir: Path, transform: TensorTransform) -> int:
    """Write `transform(key, reader)` for every input tensor into shards named like the input's.

    `transform` returns the output tensors for one input key (none to drop it). Returns the
    number of tensors written.
    """
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for shard in reader.shards:
        tensors: dict[str, torch.Tensor] = {}
        for key in reader.shard_keys[shard]:
            tensors.update(transform(key, reader))
        if not tensors:
            continue
        save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / shard.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    elif weight_map and next(iter(weight_map.values())) != SINGLE_SHARD:
        (out_dir / next(iter(weight_map.values()))).rename(out_dir / SINGLE_SHARD)
    return len(weight_map)


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


def dtype_of(name: str) -> torch.dtype:
    """torch dtype from its name ('bfloat16' or 'torch.bfloat16')."""
    return getattr(torch, name.removeprefix("torch."))
