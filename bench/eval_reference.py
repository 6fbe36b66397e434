"""The evaluate stage's baseline reference at Llama-3-8B's output geometry: the method before (the full next-token
distribution of every window position, stored as float32) against the compact one (the final hidden states at
the scored tokens, and the output layer that recomputes the distribution), side by side.

A model with Llama-3-8B's vocabulary (128256) and hidden size (4096) and one small decoder layer stands for the
baseline; a copy with noise on its decoder layer is the model scored against it. The models are built, and each
method runs, in a fresh process, so that a method's peak RSS is its own (Linux keeps a process's peak across
fork and exec). Printed: reference bytes (total and per scored token), peak RSS and
seconds of recording the baseline and scoring the other model, and the largest difference in per-window KL.

    .venv/bin/python bench/eval_reference.py [--windows 4] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB, HIDDEN = 128256, 4096  # Llama-3-8B's output geometry


def build_models(folder: Path) -> None:
    """The baseline and the other model, saved in bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder / "baseline")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".layers." in name:
                parameter.add_(0.02 * torch.randn_like(parameter))
    model.save_pretrained(folder / "other")


def windows_of(windows: int, seq_len: int):
    import torch

    from qlora_requant.eval.perplexity import Windows

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (windows, seq_len), generator=generator)
    return Windows(ids, torch.ones(windows, seq_len - 1, dtype=torch.bool))


def score_before(model, windows, batch_size: int, path: Path, record: bool) -> list[float]:
    """The method before the compact reference: whole-batch logits, every position's distribution stored."""
    import numpy as np
    import torch

    shape = (len(windows), windows.seq_len - 1, VOCAB)
    array = np.lib.format.open_memmap(path, mode="w+" if record else "r", dtype=np.float32, shape=shape)
    kl_per_window = []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            rows = slice(start, start + batch_size)
            log_probs = torch.log_softmax(model(input_ids=windows.input_ids[rows]).logits[:, :-1].float(), dim=-1)
            if record:
                array[rows] = log_probs.numpy()
                continue
            ref = torch.from_numpy(np.ascontiguousarray(array[rows]))
            kl_per_window += (ref.exp() * (ref - log_probs)).sum(dim=-1).double().sum(dim=1).tolist()
    return kl_per_window


def run_method(method: str, folder: Path, windows: int, seq_len: int, batch_size: int) -> dict:
    """One method, in this process: record the baseline, score the other model; its figures."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_requant.eval.perplexity import HiddenReference, score_windows

    data = windows_of(windows, seq_len)
    path = folder / f"{method}.npy"
    timings = {}
    kl = []
    for name in ("baseline", "other"):
        model = AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.bfloat16).eval()
        started = time.perf_counter()
        if method == "before":
            kl = score_before(model, data, batch_size, path, record=name == "baseline")
        else:
            if name == "baseline":
                reference = HiddenReference(path, int(data.scored_tokens().sum()))
            kl = score_windows(model, data, batch_size, reference, record=name == "baseline").get("kl", [])
        timings[name] = time.perf_counter() - started
        del model
    tokens = int(data.scored_tokens().sum())
    return {
        "reference_bytes": path.stat().st_size,
        "bytes_per_scored_token": path.stat().st_size / tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "record_seconds": timings["baseline"],
        "score_seconds": timings["other"],
        "window_kl": kl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--method", choices=("build", "before", "compact"), help=argparse.SUPPRESS)  # a child's part
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method == "build":
        build_models(args.folder)
        return
    if args.method:
        print(json.dumps(run_method(args.method, args.folder, args.windows, args.seq_len, args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, __file__, "--method", "build", "--folder", str(folder)], check=True)
        results = {}
        for method in ("before", "compact"):
            command = [sys.executable, __file__, "--method", method, "--folder", str(folder)]
            command += ["--windows", str(args.windows), "--seq-len", str(args.seq_len)]
            command += ["--batch-size", str(args.batch_size)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    before, compact = results["before"], results["compact"]
    tokens = args.windows * (args.seq_len - 1)
    print(f"vocab {VOCAB}, hidden {HIDDEN}; {args.windows} windows of {args.seq_len} tokens ({tokens} scored)")
    print(f"{'':34}{'before':>14}{'compact':>14}")
    rows = [
        ("reference file (MB)", lambda r: f"{r['reference_bytes'] / 1e6:.1f}"),
        ("bytes per scored token", lambda r: f"{r['bytes_per_scored_token']:.0f}"),
        ("peak RSS (MB)", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("record the baseline (s)", lambda r: f"{r['record_seconds']:.1f}"),
        ("score the other model (s)", lambda r: f"{r['score_seconds']:.1f}"),
    ]
    for label, cell in rows:
        print(f"{label:34}{cell(before):>14}{cell(compact):>14}")
    differences = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(before["window_kl"], compact["window_kl"])]
    print(f"largest relative difference of a window's KL: {max(differences):.2e}")
    print(
        f"mean token KL: before {sum(before['window_kl']) / tokens:.6g}, compact "
        f"{sum(compact['window_kl']) / tokens:.6g}"
    )


if __name__ == "__main__":
    main()
