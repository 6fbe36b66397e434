"""Benchmark: wall time and peak RSS of dequantize + merge on a multi-GB checkpoint, four routes.

  (a) this tool's merge stage, which dequantizes the NF4 base on the fly and streams tensor by
      tensor into bounded shards, then hashes its inputs and outputs for the stage's manifest
      (as `qlora-requant run` does)
  (b) the whole-model route a user would write: transformers load_in_4bit -> model.dequantize()
      -> PEFT merge_and_unload -> save_pretrained
  (c) a plain copy of the base checkpoint's bytes (the I/O floor)
  (d) the same copy, fsynced: the floor for writing a checkpoint durably, as (a) does

Each route runs in its own process and reports its own peak RSS (VmHWM: unlike ru_maxrss, it does
not inherit the parent's memory from before exec). Usage:
    .venv/bin/python bench/merge_memory.py [--work-dir DIR] [--layers 18] [--max-shard-size 200MB]
The generated checkpoint (random init, bf16, ~2.1 GB with the defaults) is kept in the work dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
LLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=16,
    tie_word_embeddings=False,
)
RANK = 64
SHARD_BYTES = 500 * 10**6


def make_checkpoint(out_dir: Path, layers: int, **llama) -> dict:
    """A random-init bf16 LLaMA written shard by shard (never whole in memory) plus a rank-64 adapter; `llama`
    overrides the LLAMA shape (a smaller vocab_size, say)."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = out_dir / "base", out_dir / "adapter"
    if (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
        return json.loads((out_dir / "sizes.json").read_text())
    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **{**LLAMA, **llama})
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    base.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map, sizes = {}, {"largest_tensor_bytes": 0, "total_bytes": 0}

    def flush() -> None:
        name = f"model-{len(shards):05d}.safetensors"
        save_file(shards[-1], base / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards.append({})

    for name, shape in shapes.items():
        tensor = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=generator) * 0.02
        tensor = tensor.to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shards[-1] and sum(t.numel() * 2 for t in shards[-1].values()) + nbytes > SHARD_BYTES:
            flush()
        shards[-1][name] = tensor
        sizes["largest_tensor_bytes"] = max(sizes["largest_tensor_bytes"], nbytes)
        sizes["total_bytes"] += nbytes
    flush()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sizes["total_bytes"]}, "weight_map": weight_map})
    )
    config.save_pretrained(base)

    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM")
    lora.save_pretrained(adapter)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("_proj.weight"):
            prefix = f"base_model.model.{name.removesuffix('.weight')}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, shape[1], generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(shape[0], RANK, generator=generator) * 0.01
    save_file(tensors, adapter / "adapter_model.safetensors")
    sizes["shards"] = len(shards) - 1
    sizes["adapter_bytes"] = sum(t.numel() * 4 for t in tensors.values())
    (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return sizes


ROUTE_TOOL = """
import sys
from pathlib import Path
from qlora_requant.pipeline.config import AdapterSection, BaseSection
from qlora_requant.pipeline.stages.dequantize import DequantizedBase
from qlora_requant.pipeline.stages.merge import load_adapter, merge_checkpoint
work, out, shard = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
(out / "merged").mkdir(parents=True)
from qlora_requant.pipeline.manifest import file_records
base = DequantizedBase(BaseSection(path=work / "base", dtype="bfloat16"))
adapter = load_adapter(AdapterSection(path=work / "adapter"), base, base.model_config)
merge_checkpoint(base, base.model_config, adapter, base.dtype, out / "merged", shard)
for folder in (work / "base", work / "adapter", out / "merged"):
    file_records(folder)
"""

ROUTE_WHOLE_MODEL = """
import sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
work, out = Path(sys.argv[1]), Path(sys.argv[2])
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=quantization, dtype=torch.bfloat16,
                                             device_map="cpu")
model = model.dequantize()
model = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload()
model.save_pretrained(out / "merged")
"""

ROUTE_COPY = """
import shutil, sys
from pathlib import Path
shutil.copytree(Path(sys.argv[1]) / "base", Path(sys.argv[2]) / "copy")
"""

ROUTE_DURABLE_COPY = (
    ROUTE_COPY
    + """
import os
for path in (Path(sys.argv[2]) / "copy").iterdir():
    descriptor = os.open(path, os.O_RDONLY)
    os.fsync(descriptor)
    os.close(descriptor)
"""
)


REPORT_PEAK = """
import re
print("VmHWM_kB", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def measure(script: str, *args: str) -> dict:
    """Run `script` in a fresh Python process; its wall time and peak RSS."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script + REPORT_PEAK, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"route failed with exit status {done.returncode}:\n{done.stderr[-3000:]}")
    peak_kb = int(done.stdout.split("VmHWM_kB")[-1].split()[0])
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def warm_page_cache(work_dir: Path) -> None:
    """Read the inputs once, so that every route starts from the same (cached) page-cache state."""
    for path in sorted(work_dir.rglob("*.safetensors")):
        with path.open("rb") as file:
            while file.read(1 << 24):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-merge-memory")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--max-shard-size", default="200MB", help="output shard size for route (a)")
    args = parser.parse_args()
    from qlora_requant.pipeline.config import parse_size

    sizes = make_checkpoint(args.work_dir, args.layers)
    print(
        f"checkpoint: {sizes['total_bytes'] / 1e9:.2f} GB in {sizes['shards']} shards, largest tensor "
        f"{sizes['largest_tensor_bytes'] / 1e6:.0f} MB, rank-{RANK} adapter {sizes['adapter_bytes'] / 1e6:.0f} MB"
    )
    warm_page_cache(args.work_dir)
    results = {}
    for name, script, extra in (
        ("(a) qlora-requant dequantize+merge", ROUTE_TOOL, [str(parse_size(args.max_shard_size))]),
        ("(b) load_in_4bit+dequantize+PEFT merge", ROUTE_WHOLE_MODEL, []),
        ("(c) plain copy (I/O floor)", ROUTE_COPY, []),
        ("(d) copy + fsync (durable I/O floor)", ROUTE_DURABLE_COPY, []),
    ):
        out = args.work_dir / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        results[name] = measure(script, str(args.work_dir), str(out), *extra)
        shutil.rmtree(out, ignore_errors=True)
        print(
            f"{name:42s} {results[name]['seconds']:8.1f} s {results[name]['peak_rss_mb']:9.0f} MB peak RSS", flush=True
        )
    a, b, c, d = results.values()
    largest_mb = sizes["largest_tensor_bytes"] / 2**20
    print(
        f"\npeak RSS a/b = {a['peak_rss_mb'] / b['peak_rss_mb']:.2f} (target <= 0.25); "
        f"a - largest tensor = {a['peak_rss_mb'] - largest_mb:.0f} MB (target < 1024)"
    )
    print(
        f"wall time a/c = {a['seconds'] / c['seconds']:.2f} (target <= 1.5); a/b = {a['seconds'] / b['seconds']:.2f} "
        f"(target < 1); a/d = {a['seconds'] / d['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
