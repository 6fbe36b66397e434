"""The whole pipeline on a tiny model through the CLI, and the GPTQ checkpoint in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import base_section, random_adapter, save_model, tiny_llama, write_config
from eval.compare import compare_to_baseline, judge_gate
from pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main

MODELS = ("base_nf4", "baseline", "merged", "gptq")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_base, tiny_adapter, text_files):
    folder = tmp_path_factory.mktemp("pipeline")
    config = write_config(folder / "run.yaml", tiny_base, tiny_adapter, text_files, folder / "run",
                          base=base_section(tiny_base, save_dequantized=True))
    assert main(["run", str(config)]) == EXIT_OK
    return folder / "run"


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def test_report_scores_every_model_on_the_same_windows(report, run_dir):
    assert report["protocol"]["windows"] == 24 and report["protocol"]["tokens_per_window"] == 63
    for name in MODELS:
        assert report["models"][name]["tokens"] == 24 * 63
        assert 1 < report["models"][name]["ppl"] < 1e4
    for name, path in report["artifacts"].items():
        assert path == str(run_dir / name) and (run_dir / name / "config.json").is_file()
    results = json.loads((run_dir / "evaluation" / "results.json").read_text())
    assert all(len(results["models"][name]["window_nll"]) == 24 for name in MODELS)


def test_merged_model_matches_the_separate_adapter(report):
    assert abs(report["models"]["merged"]["delta_pct"]) < 0.5
    assert report["models"]["base_nf4"]["ppl"] != report["models"]["baseline"]["ppl"]


def test_run_directory_holds_reports_log_and_no_partial_output(run_dir, report):
    assert "| gptq | GPTQ |" in (run_dir / "report.md").read_text()
    assert "stage requantize: done" in (run_dir / "run.log").read_text()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert set(report["stages"]) == {"dequantize", "merge", "requantize", "evaluate"}
    assert report["stages"]["merge"]["base"]["quantized"] == 14
    assert all(0.05 < error < 0.2 for error in report["stages"]["merge"]["base"]["roundtrip_error"].values())
    assert all(stage["seconds"] > 0 and stage["peak_rss_mb"] > 0 for stage in report["stages"].values())


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
        gptq = AutoModelForCausalLM.from_pretrained({str(run_dir / 'gptq')!r}, dtype=torch.float32, device_map="cpu")
        merged = AutoModelForCausalLM.from_pretrained({str(run_dir / 'merged')!r}, dtype=torch.float32)
        unadapted = AutoModelForCausalLM.from_pretrained({str(run_dir / 'dequantized')!r}, dtype=torch.float32)
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


def test_gate_judges_the_gptq_change_against_the_limit():
    models = {name: {"ppl": ppl, "tokens": 10, "windows": 1}
              for name, ppl in (("base_nf4", 12.0), ("baseline", 10.0), ("merged", 10.0), ("gptq", 10.3))}
    compared = compare_to_baseline(models)
    assert compared["gptq"]["delta_pct"] == pytest.approx(3.0)
    assert judge_gate(compared, 5.0)["passed"]
    failed = judge_gate(compared, 2.0)
    assert not failed["passed"] and failed["message"] == "GPTQ PPL change +3.00% > limit 2.00%"


def test_adapter_for_another_base_exits_2_and_keeps_completed_stages(tmp_path, tokenizer, tiny_base, text_files,
                                                                     capsys):
    wider = save_model(tiny_llama(tokenizer, intermediate_size=384), tokenizer, tmp_path / "wider")
    adapter = random_adapter(wider, tmp_path / "wrong-adapter")
    config = write_config(tmp_path / "run.yaml", tiny_base, adapter, text_files, tmp_path / "run",
                          base=base_section(tiny_base, save_dequantized=True))
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert "was the adapter trained on another base model?" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["dequantized", "run.log"]
    assert (tmp_path / "run" / "dequantized" / "model.safetensors").is_file()


def test_weighted_adapters_run_end_to_end(tmp_path, tiny_base, text_files):
    adapters = [random_adapter(tiny_base, tmp_path / f"adapter{i}", seed=i, r=r) for i, r in enumerate((8, 4))]
    section = {"combination": "cat", "adapters": [{"path": str(adapters[0]), "weight": 0.6},
                                                   {"path": str(adapters[1]), "weight": 0.4}]}
    config = write_config(tmp_path / "run.yaml", tiny_base, adapters[0], text_files, tmp_path / "run",
                          adapter=section)
    assert main(["run", str(config)]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert abs(report["models"]["merged"]["delta_pct"]) < 0.5
    assert report["stages"]["merge"]["modules_merged"] == 14


def test_both_merge_bases_are_scored_side_by_side(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run",
                          merge={"dtype": "float16", "merge_base": "nf4", "compare_merge_bases": True})
    assert main(["run", str(config)]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["models"]) == ["base_nf4", "baseline", "merged", "gptq", "merged_original", "gptq_original"]
    assert report["artifacts"]["gptq_original"] == str(tmp_path / "run" / "gptq_original")
    assert report["models"]["merged_original"]["ppl"] != report["models"]["merged"]["ppl"]
    assert "GPTQ, merged into original weights" in capsys.readouterr().out


def test_original_merge_base_needs_a_16bit_checkpoint(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = tmp_path / "bnb4bit"
    AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                                         device_map="cpu").save_pretrained(quantized)
    config = write_config(tmp_path / "run.yaml", quantized, tiny_adapter, text_files, tmp_path / "run",
                          merge={"merge_base": "original"})
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert "merge.merge_base: original needs the original 16-bit weights" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
