"""A base whose config.json transformers cannot use or that disagrees with its weights, and safetensors headers
that lie (base shards and adapters): exit 2 in preflight, naming the file, key or tensor, before any run
directory is touched."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import __version__

from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main
from qlora_requant.pipeline.config import BaseSection
from qlora_requant.pipeline.safetensors_io import read_header
from qlora_requant.pipeline.stages.dequantize import DequantizedBase
from qlora_requant.quant.errors import InputError

from support import save_4bit, save_model, save_pickled, tiny_llama, write_config


def copy_base(tiny_base: Path, folder: Path, **changes) -> Path:
    """A copy of the tiny base with config.json keys changed (None removes a key)."""
    shutil.copytree(tiny_base, folder)
    edit_config(folder, **changes)
    return folder


def edit_config(folder: Path, **changes) -> None:
    """Change keys of a checkpoint folder's config.json (None removes a key)."""
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not None}
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_header(path: Path, edit: Callable[[dict], dict | None], extra_bytes: bytes = b"") -> None:
    """Rewrite a safetensors file's header as `edit` changes it (or as it returns it), keeping its data bytes and
    appending `extra_bytes`."""
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    header = edit(header) or header
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + blob[8 + length :] + extra_bytes)


def validate(tmp_path: Path, base: Path, adapter: Path, texts: dict[str, Path], capsys) -> tuple[int, str]:
    config = write_config(tmp_path / "run.yaml", base, adapter, texts, tmp_path / "run")
    code = main(["validate", str(config)])
    assert not (tmp_path / "run").exists()
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            dict(vocab_size=1024),
            "model.embed_tokens.weight is [512, 128] in the checkpoint, but transformers builds [1024, 128] from "
            "config.json (and 1 more tensor(s) differ); with vocab_size 512 (config.json says 1024) they would match",
        ),
        (
            dict(hidden_size=None),
            "model.embed_tokens.weight is [512, 128] in the checkpoint, but transformers builds [512, 4096] from "
            "config.json (and 20 more tensor(s) differ); with hidden_size 128 (not in config.json: transformers' "
            "default is 4096) they would match",
        ),
        (
            dict(num_attention_heads=8),
            "model.layers.0.self_attn.q_proj.weight is [128, 128] in the checkpoint, but transformers builds "
            "[256, 128] from config.json (and 3 more tensor(s) differ); with num_attention_heads 4 (config.json "
            "says 8) or head_dim 16 (config.json says 32) they would match",
        ),
        (
            dict(num_hidden_layers=4),
            "num_hidden_layers is 4, but the checkpoint holds tensors for 2 layer(s); set num_hidden_layers to the "
            "layers the weights hold",
        ),
        (dict(num_hidden_layers=10**9), "num_hidden_layers is 1000000000, but the checkpoint holds tensors for 2"),
        (
            dict(num_hidden_layers=1),
            "num_hidden_layers is 1, but the checkpoint also holds model.layers tensors for layer(s) 1; set "
            "num_hidden_layers to the layers the weights hold",
        ),
        (
            dict(num_hidden_layers=0),
            "num_hidden_layers is 0, but the checkpoint also holds model.layers tensors for layer(s) 0-1",
        ),
        (
            dict(vocab_size="512"),
            f"transformers {__version__} refuses it: Validation error for field 'vocab_size': TypeError: Field "
            "'vocab_size' expected int, got str (value: '512'); correct that key",
        ),
        (
            dict(pad_token_id=10_000),
            "transformers cannot build a causal language model from it (AssertionError: Padding_idx must be within "
            "num_embeddings); correct config.json",
        ),
    ],
    ids=["vocab", "no-hidden-size", "heads", "layers-4", "layers-1e9", "layers-1", "layers-0", "string", "unbuildable"],
)
def test_a_config_that_disagrees_with_the_weights_is_refused(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys, changes, expected
):
    base = copy_base(tiny_base, tmp_path / "base", **changes)
    code, error = validate(tmp_path, base, tiny_adapter, text_files, capsys)
    assert code == EXIT_BAD_INPUT
    assert f"error: {base / 'config.json'}: " in error and expected in error
    assert "or give the config.json the weights were saved with" in error


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            dict(model_type="foo"),
            f"model_type 'foo' is not an architecture transformers {__version__} knows (",
        ),
        (
            dict(model_type="lama"),
            f"model_type 'lama' is not an architecture transformers {__version__} knows (",
        ),
        (dict(model_type=None), "has no model_type, so transformers cannot tell its architecture; add model_type"),
    ],
    ids=["unknown", "misspelt", "none"],
)
def test_an_architecture_transformers_does_not_know_is_refused(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys, changes, expected
):
    base = copy_base(tiny_base, tmp_path / "base", **changes)
    code, error = validate(tmp_path, base, tiny_adapter, text_files, capsys)
    assert code == EXIT_BAD_INPUT
    assert f"error: {base / 'config.json'}: {expected}" in error
    assert "(its architectures LlamaForCausalLM is model_type 'llama')" in error
    if changes["model_type"] == "lama":
        assert "the closest it knows: llama," in error


NORM = "model.norm.weight"  # BF16 [128] in the tiny base: 256 bytes


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda h: [h], "safetensors header is a JSON list, not an object"),
        (lambda h: {**h, "__metadata__": {"format": 1}}, "safetensors __metadata__ is {'format': 1}, not an object"),
        (lambda h: {**h, NORM: [1]}, "tensor 'model.norm.weight' is a JSON list, not an object"),
        (lambda h: h[NORM].update(dtype="F4"), "tensor 'model.norm.weight' has dtype 'F4', not one of F64,"),
        (lambda h: h[NORM].update(shape=[-128]), "tensor 'model.norm.weight' has shape [-128], not a list of"),
        (lambda h: h[NORM].update(shape="128"), "tensor 'model.norm.weight' has shape '128', not a list of"),
        (lambda h: h[NORM].update(shape=[64]), "tensor 'model.norm.weight' is BF16 [64] (128 bytes), but its"),
        (lambda h: h[NORM].update(dtype="F32"), "tensor 'model.norm.weight' is F32 [128] (512 bytes), but its"),
        (
            lambda h: h[NORM].update(data_offsets=h[NORM]["data_offsets"][::-1]),
            "that end before they begin",
        ),
        (lambda h: h[NORM].update(data_offsets=[-2, 254]), "has data_offsets [-2, 254], not two non-negative"),
        (lambda h: h[NORM].update(data_offsets=[0.0, 256]), "has data_offsets [0.0, 256], not two non-negative"),
        (
            lambda h: h[NORM].update(data_offsets=[0, 256]),
            "starts at data byte 0, but the tensors before it end at 256 (overlapping them)",
        ),
    ],
    ids=[
        "list",
        "metadata",
        "entry",
        "dtype",
        "negative-shape",
        "shape-string",
        "shape-bytes",
        "dtype-bytes",
        "reversed",
        "negative-offset",
        "float-offset",
        "overlap",
    ],
)
def test_a_lying_safetensors_header_is_refused(tmp_path, tiny_base, edit, expected):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_base / "model.safetensors", path)
    rewrite_header(path, edit)
    with pytest.raises(InputError) as refused:
        read_header(path)
    assert str(refused.value).startswith(f"{path}: ") and expected in str(refused.value)
    assert str(refused.value).endswith("re-download or re-save it")


def test_bytes_no_tensor_covers_are_refused(tmp_path, tiny_base):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_base / "model.safetensors", path)
    rewrite_header(path, lambda h: None, extra_bytes=bytes(8))
    with pytest.raises(InputError, match="8 bytes after the last tensor's data that no tensor covers"):
        read_header(path)
    header = read_header(tiny_base / "model.safetensors")[0]
    last = max(header, key=lambda name: header[name]["data_offsets"])
    begin, end = header[last]["data_offsets"]
    rewrite_header(path, lambda h: h[last].update(data_offsets=[begin + 8, end + 8]))
    with pytest.raises(InputError) as refused:
        read_header(path)
    assert (
        f"tensor {last!r} starts at data byte {begin + 8}, but the tensors before it end at {begin} (leaving a gap)"
        in str(refused.value)
    )


def test_every_base_shard_and_the_adapter_are_checked_in_preflight(
    tmp_path, tokenizer, tiny_base, tiny_adapter, text_files, capsys
):
    base = save_model(tiny_llama(tokenizer), tokenizer, tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) > 2
    first = next(iter(read_header(shards[-1])[0]))
    rewrite_header(shards[-1], lambda h: h[first].update(shape=[1, *h[first]["shape"]], dtype="F32"))
    code, error = validate(tmp_path, base, tiny_adapter, text_files, capsys)
    assert code == EXIT_BAD_INPUT and f"error: {shards[-1]}: tensor {first!r} is F32 [1, " in error

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    name = next(iter(read_header(weights)[0]))
    rewrite_header(weights, lambda h: h[name].update(shape=[h[name]["shape"][0] * 2, *h[name]["shape"][1:]]))
    code, error = validate(tmp_path, tiny_base, adapter, text_files, capsys)
    assert code == EXIT_BAD_INPUT and f"error: {weights}: tensor {name!r} is " in error


def test_a_4bit_base_is_compared_through_its_recorded_shapes(tmp_path, tiny_base):
    section = BaseSection(path=tiny_base, dtype="bfloat16")
    quantized = save_4bit(tiny_base, section, tmp_path / "bnb4bit")
    assert DequantizedBase(BaseSection(path=quantized)).shape("model.layers.0.mlp.gate_proj.weight") == (256, 128)
    edit_config(quantized, intermediate_size=512)
    with pytest.raises(InputError) as refused:
        DequantizedBase(BaseSection(path=quantized))
    assert (
        "model.layers.0.mlp.gate_proj.weight is [256, 128] in the checkpoint, but transformers builds [512, 128] "
        "from config.json (and 5 more tensor(s) differ); with intermediate_size 256 (config.json says 512)"
    ) in str(refused.value)


def test_a_pickled_base_is_read_and_checked_against_its_config(tmp_path, tiny_base):
    base = save_pickled(tiny_base, tmp_path / "pickled")
    section = BaseSection(path=base, dtype="bfloat16")
    assert DequantizedBase(section, allow_pickle=True).shape("model.embed_tokens.weight") == (512, 128)
    edit_config(base, vocab_size=1024)
    with pytest.raises(InputError, match=r"with vocab_size 512 \(config.json says 1024\) they would match"):
        DequantizedBase(section, allow_pickle=True)


def test_a_previous_run_is_left_as_it_was(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    base = copy_base(tiny_base, tmp_path / "base")
    run_dir = tmp_path / "run"
    config = str(write_config(tmp_path / "run.yaml", base, tiny_adapter, text_files, run_dir))
    assert main(["run", config, "--stages", "merge"]) == EXIT_OK
    before = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    good_config, good_shard = (base / "config.json").read_bytes(), (base / "model.safetensors").read_bytes()
    damages = {
        "vocab_size 512 (config.json says 1024)": lambda: edit_config(base, vocab_size=1024),
        "model_type 'foo' is not an architecture": lambda: edit_config(base, model_type="foo"),
        "tensor 'model.norm.weight' is F32 [128]": lambda: rewrite_header(
            base / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F32")
        ),
    }
    for expected, damage in damages.items():
        damage()
        capsys.readouterr()
        assert main(["run", config]) == EXIT_BAD_INPUT
        assert expected in capsys.readouterr().err
        after = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
        assert after == before
        (base / "config.json").write_bytes(good_config)
        (base / "model.safetensors").write_bytes(good_shard)
