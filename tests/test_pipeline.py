"""The whole pipeline on a tiny model through the CLI, and the GPTQ checkpoint in a fresh process."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora_requant.eval.compare import judge_gates
from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, main

from support import base_section, model_scores, random_adapter, save_model, tiny_llama, write_config

MODELS = ("base_nf4", "baseline", "merged", "gptq")
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_base, tiny_adapter, text_files):
    folder = tmp_path_factory.mktemp("pipeline")
    config = write_config(
        folder / "run.yaml",
        tiny_base,
        tiny_adapter,
        text_files,
        folder / "run",
        base=base_section(tiny_base, save_dequantized=True, model_id="tiny-llama"),
    )
    assert main(["run", str(config)]) == EXIT_OK
    return folder / "run"


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def test_report_scores_every_model_on_the_same_windows(report, run_dir, tokenizer):
    assert report["protocol"]["windows"] == 24 and report["protocol"]["tokens"] == 24 * 63
    vocab = len(tokenizer)
    for name in MODELS:
        scores = model_scores(run_dir, name)
        assert report["models"][name]["tokens"] == 24 * 63 and scores["window_tokens"] == [63] * 24
        assert len(scores["window_nll"]) == 24
        assert report["models"][name]["ppl"] == pytest.approx(math.exp(sum(scores["window_nll"]) / (24 * 63)))
        # A random-init LLaMA (weights ~ N(0, 0.02)) has nearly flat logits: each token costs about ln(vocab)
        # nats, a little more where the logits are not flat (a random model cannot beat uniform). Measured
        # 1.004-1.04 x the vocabulary of 512; dividing by the wrong token count gives ~0.91 x, a wrong NLL far out.
        assert 0.98 * vocab < report["models"][name]["ppl"] < 1.08 * vocab, (name, report["models"][name]["ppl"])
    for name, path in report["artifacts"].items():  # folders named relative to the run directory
        assert path == name and (run_dir / name / "config.json").is_file()
    # the baseline is kept as its hidden states at the scored tokens (float32) and its output layer, no log-probs
    kept = {path.name: path.stat().st_size for path in (run_dir / "evaluation" / "reference").iterdir()}
    assert kept["hidden.npy"] == 24 * 63 * 128 * 4 + 128  # tokens x hidden x 4 bytes + the .npy header
    assert set(kept) == {
        "hidden.npy",
        "output_layer.safetensors",
        "output_layer.json",
        "windows.safetensors",
        "reference.json",
        "scores.json",
    }
    assert sorted(p.name for p in (run_dir / "evaluation").iterdir()) == ["gptq", "merged", "reference"]


def test_merged_nll_matches_an_independent_computation(run_dir, tokenizer, text_files):
    """Every window of the merged model, scored here with plain transformers in fp32."""
    from transformers import AutoModelForCausalLM

    # The eval text's paragraphs (blank-line separated), each tokenized without special tokens and followed by
    # EOS, one stream; windows are its consecutive 64-token slices, and tokens 2..64 of each are scored.
    paragraphs = [p.rstrip("\n") for p in text_files["eval"].read_text().split("\n\n") if p.strip()]
    stream = []
    for paragraph in paragraphs:
        stream += tokenizer(paragraph, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= 24 * 64:
            break
    windows = torch.tensor(stream[: 24 * 64]).view(24, 64)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").sum(dim=1)
    recorded = model_scores(run_dir, "merged")["window_nll"]
    assert nll.tolist() == pytest.approx(recorded, rel=1e-4)  # measured: equal to 1e-8


def test_report_compares_token_distributions_with_intervals(report):
    merged, gptq, base = (report["models"][name] for name in ("merged", "gptq", "base_nf4"))
    # Measured: merged 3e-7 nats (fp16 rounding of the merged weights), GPTQ 1e-3, the base alone 0.05.
    assert merged["kl"] < 1e-5 and merged["top1_agreement"] > 0.99
    assert merged["kl"] < gptq["kl"] < 0.01 < base["kl"]
    assert base["top1_agreement"] < gptq["top1_agreement"] < 1
    for row in (merged, gptq, base):
        low, high = row["delta_pct_ci95"]
        assert low <= row["delta_pct"] <= high
    assert report["protocol"]["bootstrap_samples"] == 1000


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return ((new.double() - old.double()).norm() / old.double().norm()).item()


def test_report_says_where_the_loss_comes_from(report, run_dir, tiny_base):
    from safetensors.torch import load_file

    sources = report["loss_sources"]
    weights = {f"model.layers.{layer}.{module}.weight" for layer in (0, 1) for module in LINEARS}
    assert sorted((row["layer"], row["module"]) for row in sources["gptq_error"]) == sorted(
        (layer, module) for layer in (0, 1) for module in LINEARS
    )
    assert all(row["loss"] > 0 for row in sources["gptq_error"])  # 4 bits cannot reproduce any layer exactly
    # Both relative Frobenius errors, recomputed from the checkpoints: the bf16 base, its NF4 round trip
    # (dequantized/, fp32) and the merge (merged/, fp16).
    original = load_file(tiny_base / "model.safetensors")
    dequantized = load_file(run_dir / "dequantized" / "model.safetensors")
    merged = load_file(run_dir / "merged" / "model.safetensors")
    assert sources["nf4_roundtrip_error"].keys() == sources["merge_relative_change"].keys() == weights
    for key in weights:
        assert sources["nf4_roundtrip_error"][key] == pytest.approx(
            relative_change(dequantized[key], original[key]), rel=1e-5
        ), key
        assert sources["merge_relative_change"][key] == pytest.approx(
            relative_change(merged[key], dequantized[key]), rel=1e-5
        ), key


def test_generations_are_side_by_side(report, run_dir):
    outputs = report["generations"]["outputs"]
    assert list(outputs) == ["baseline", "merged", "gptq"]
    assert all(len(texts) == 2 for texts in outputs.values())
    assert outputs["merged"] == outputs["baseline"]  # greedy decoding: the merge changes no argmax here
    assert "## Greedy continuations" in (run_dir / "report.md").read_text()


def test_gptq_folder_has_a_model_card_the_hub_reads_claiming_no_more_than_the_run_measured(run_dir, report):
    from huggingface_hub import ModelCard

    from qlora_requant.eval.model_card import REPO_PLACEHOLDER, render_model_card
    from qlora_requant.eval.schema import Report

    card = ModelCard((run_dir / "gptq" / "README.md").read_text())
    data = card.data.to_dict()
    # no published merged model: a fine-tune of the base, not the base quantized; the base's card names no license
    assert (data["base_model"], data["base_model_relation"], data.get("license")) == ("tiny-llama", "finetune", None)
    assert "gptq" in data["tags"] and data["quantization"]["bits"] == 4 and data["quantization"]["dtype"] == "float16"
    assert data["qlora_requant"]["gptqmodel"] == report["versions"]["gptqmodel"]
    assert f"| gptq | GPTQ | {report['models']['gptq']['ppl']:.3f} |" in card.text
    assert "| baseline |" in card.text and "| base_nf4 |" not in card.text  # only the rows of this checkpoint
    assert (
        f'AutoModelForCausalLM.from_pretrained("{REPO_PLACEHOLDER}"' in card.text
        and "apply_chat_template" not in card.text
    )
    assert any("release.license is not set" in warning for warning in report["warnings"])

    typed = Report.model_validate(report)
    release = {
        "merged_model_id": "org/tiny-chat",
        "repo_id": "org/tiny-chat-{variant}",
        "license": "apache-2.0",
        "datasets": ["org/chats"],
    }
    published = typed.model_copy(update={"config": {**typed.config, "release": release}})
    published = published.model_copy(update={"license": "apache-2.0"})
    card = ModelCard(render_model_card(published, published.variants[0], chat=True))
    data = card.data.to_dict()
    assert (data["base_model"], data["base_model_relation"]) == ("org/tiny-chat", "quantized")
    assert (data["license"], data["datasets"]) == ("apache-2.0", ["org/chats"])
    assert 'from_pretrained("org/tiny-chat-gptq"' in card.text and "tokenizer.apply_chat_template(" in card.text
    assert REPO_PLACEHOLDER not in card.text


def test_gptq_checkpoint_carries_its_config_and_no_calibration_text(run_dir, text_files):
    quantization = json.loads((run_dir / "gptq" / "config.json").read_text())["quantization_config"]
    assert (quantization["quant_method"], quantization["bits"], quantization["group_size"]) == ("gptq", 4, 64)
    assert "dataset" not in quantization
    probe = max(text_files["calibration"].read_text().split("\n\n"), key=len)[:80]
    for path in (run_dir / "gptq").iterdir():
        assert probe.encode() not in path.read_bytes(), path.name


def test_gptq_loads_in_a_fresh_process_close_to_merged(run_dir):
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        ids = torch.arange(3, 67).unsqueeze(0)
        gptq = AutoModelForCausalLM.from_pretrained({str(run_dir / "gptq")!r}, dtype=torch.float32, device_map="cpu")
        merged = AutoModelForCausalLM.from_pretrained({str(run_dir / "merged")!r}, dtype=torch.float32)
        unadapted = AutoModelForCausalLM.from_pretrained({str(run_dir / "dequantized")!r}, dtype=torch.float32)
        with torch.no_grad():
            a, b, c = gptq(ids).logits, merged(ids).logits, unadapted(ids).logits
        spread = (b - b.mean()).norm()
        print(json.dumps({{"finite": bool(torch.isfinite(a).all()),
                          "gptq_error": ((a - b).norm() / spread).item(),
                          "adapter_effect": ((c - b).norm() / spread).item()}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["finite"]
    # 4-bit error on this random tiny model is ~0.25 of the logits' spread; the adapter moves them ~1.4.
    assert result["gptq_error"] < 0.5 and result["gptq_error"] < 0.5 * result["adapter_effect"], result


def test_report_command_rebuilds_reports_and_a_failed_gate_exits_3(run_dir, report, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run = json.loads((copy / "run.json").read_text())
    run["config"]["gate"] = {"max_ppl_increase_pct": 50.0, "max_kl": 1e-9, "min_top1_agreement": 0.5}
    (copy / "run.json").write_text(json.dumps(run))
    assert main(["report", str(copy)]) == EXIT_GATE_FAILED
    rebuilt = json.loads((copy / "report.json").read_text())
    assert rebuilt["gate"]["failed"] == ["max_kl"]
    kl = report["models"]["gptq"]["kl"]
    assert rebuilt["gate"]["message"] == f"GPTQ mean token KL {kl:#.3g} nats fails limit 1e-09 by {kl - 1e-9:.3g} nats"
    assert f"Release gate: FAIL: {rebuilt['gate']['message']}." in capsys.readouterr().out
    assert rebuilt["models"] == report["models"]  # same windows, same seed: same statistics
    run["config"]["gate"] = {"max_ppl_increase_pct": 50.0}
    (copy / "run.json").write_text(json.dumps(run))
    assert main(["report", str(copy)]) == EXIT_OK


def test_report_command_on_a_folder_without_results_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == EXIT_BAD_INPUT
    assert f"{tmp_path / 'run.json'}: missing" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent")]) == EXIT_BAD_INPUT
    assert f"{tmp_path / 'absent'}: not a folder; give the output_dir of a run" in capsys.readouterr().err


def test_report_command_on_an_interrupted_run_exits_2(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "stages" / "score_gptq.json").unlink()  # as when a re-run of its scoring was killed
    assert main(["report", str(copy)]) == EXIT_BAD_INPUT
    assert (
        f"{copy}: the score_gptq stage has no completed record (the run was interrupted or failed)"
        in capsys.readouterr().err
    )


def test_ppl_gate_is_judged_on_the_upper_bound_of_the_interval():
    compared = {"gptq": {"delta_pct": 1.5, "delta_pct_ci95": (0.8, 2.3), "kl": 0.01, "top1_agreement": 0.93}}
    assert judge_gates(compared, {"max_ppl_increase_pct": 2.5})["passed"]
    failed = judge_gates(compared, {"max_ppl_increase_pct": 2.0, "min_top1_agreement": 0.95})
    assert failed["failed"] == ["max_ppl_increase_pct", "min_top1_agreement"]
    assert failed["message"] == (
        "GPTQ PPL change +1.50% (95% CI +0.80%..+2.30%): upper bound +2.30% fails limit "
        "2.00% by 0.30 percentage points; GPTQ top-1 agreement 93.00% is below the minimum 95.00% "
        "by 2.00 percentage points"
    )
    assert judge_gates(compared, {}) == {
        "enabled": False,
        "passed": True,
        "checks": [],
        "failed": [],
        "message": "no gate configured",
    }


def test_adapter_for_another_base_exits_2_before_the_run_directory_is_touched(
    run_dir, tmp_path, tokenizer, tiny_base, text_files, capsys
):
    wider = save_model(tiny_llama(tokenizer, intermediate_size=384), tokenizer, tmp_path / "wider")
    adapter = random_adapter(wider, tmp_path / "wrong-adapter")
    fresh = write_config(tmp_path / "fresh.yaml", tiny_base, adapter, text_files, tmp_path / "run")
    assert main(["run", str(fresh)]) == EXIT_BAD_INPUT
    assert (
        f"{adapter}: delta for model.layers.0.mlp.down_proj.weight has shape (128, 384) but the base's is (128, 256); "
        "was the adapter trained on another base model?"
    ) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    finished = tmp_path / "finished"  # a complete run, re-run with the wrong adapter: nothing in it changes
    shutil.copytree(run_dir, finished)
    before = {p: p.read_bytes() for p in sorted(finished.rglob("*")) if p.is_file()}
    again = write_config(tmp_path / "again.yaml", tiny_base, adapter, text_files, finished)
    assert main(["run", str(again)]) == EXIT_BAD_INPUT
    assert {p: p.read_bytes() for p in sorted(finished.rglob("*")) if p.is_file()} == before


def test_weighted_adapters_run_end_to_end(tmp_path, tiny_base, text_files):
    adapters = [random_adapter(tiny_base, tmp_path / f"adapter{i}", seed=i, r=r) for i, r in enumerate((8, 4))]
    section = {
        "combination": "cat",
        "adapters": [{"path": str(adapters[0]), "weight": 0.6}, {"path": str(adapters[1]), "weight": 0.4}],
    }
    config = write_config(tmp_path / "run.yaml", tiny_base, adapters[0], text_files, tmp_path / "run", adapter=section)
    assert main(["run", str(config)]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    merged = report["models"]["merged"]  # the combination merged equals PEFT's combination unmerged (0.002%)
    assert abs(merged["delta_pct"]) < 0.05 and merged["kl"] < 1e-5 and merged["top1_agreement"] > 0.99
    assert report["stages"]["merge"]["modules_merged"] == 14


def test_both_merge_bases_are_scored_side_by_side(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    config = write_config(
        tmp_path / "run.yaml",
        tiny_base,
        tiny_adapter,
        text_files,
        tmp_path / "run",
        merge={"dtype": "float16", "merge_base": "nf4", "compare_merge_bases": True},
    )
    assert main(["run", str(config)]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["models"]) == ["base_nf4", "baseline", "merged", "gptq", "merged_original", "gptq_original"]
    assert report["artifacts"]["gptq_original"] == "gptq_original"
    # The NF4 base is the one the adapter was trained on: merged into it, the adapter reproduces the baseline
    # (KL 3e-7, fp16 rounding); merged into the original weights it carries the NF4 round-trip error of the base
    # as a difference (measured KL 3e-4), which GPTQ then adds to.
    models = report["models"]
    assert models["merged"]["kl"] < 1e-5 and models["merged_original"]["kl"] > 100 * models["merged"]["kl"]
    assert models["gptq_original"]["kl"] > models["merged_original"]["kl"]
    assert "GPTQ, merged into original weights" in capsys.readouterr().out


def test_original_merge_base_needs_a_16bit_checkpoint(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = tmp_path / "bnb4bit"
    AutoModelForCausalLM.from_pretrained(
        tiny_base, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    ).save_pretrained(quantized)
    config = write_config(
        tmp_path / "run.yaml", quantized, tiny_adapter, text_files, tmp_path / "run", merge={"merge_base": "original"}
    )
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert "merge.merge_base: original needs the original 16-bit weights" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(html_path, png_path, tmp_path) -> int:
    """Render a page in headless Chromium; the number of strongly coloured pixels in the screenshot."""
    from PIL import Image

    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--hide-scrollbars",
            "--window-size=1200,5000",
            f"--screenshot={png_path}",
            html_path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and png_path.is_file(), done.stderr[-2000:]
    hsv = Image.open(png_path).convert("RGB").convert("HSV")
    return sum(1 for _, saturation, value in hsv.getdata() if saturation > 100 and value > 60)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian package chromium; `make test` installs it when run as root)",
)
def test_html_report_plots_render_in_headless_chromium(run_dir, tmp_path):
    page = (run_dir / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3
    without_plots = tmp_path / "without-plots.html"
    without_plots.write_text(re.sub(r"<img [^>]*>", "", page))
    coloured = screenshot(run_dir / "report.html", tmp_path / "report.png", tmp_path)
    baseline = screenshot(without_plots, tmp_path / "without-plots.png", tmp_path)
    assert coloured > 10_000 and baseline < 2_000, (coloured, baseline)
