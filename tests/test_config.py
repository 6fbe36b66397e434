"""Config validation through the CLI: bad configs exit 2 with an error naming the key, writing nothing."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main
from qlora_requant.pipeline.config import ConfigError, apply_override, load_config

from support import write_config


@pytest.fixture
def config_path(tmp_path, tiny_base, tiny_adapter, text_files):
    return write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "out")


def overlap_refusal(text_path) -> str:
    """The refusal of an evaluation text that is the calibration text: every passage (paragraph of 8+ words,
    counted once) is shared."""
    paragraphs = {" ".join(p.split()) for p in re.split(r"\n\s*\n", text_path.read_text())}
    shared = sum(len(p.split()) >= 8 for p in paragraphs)
    return (
        f"error: evaluation.text ({text_path}) shares {shared} passage(s) with requantize.calibration; "
        "held-out text must not calibrate"
    )


def edit(path, change) -> None:
    tree = yaml.safe_load(path.read_text())
    change(tree)
    path.write_text(yaml.safe_dump(tree))


def test_valid_config_validates_and_lists_the_plan_and_the_models_of_a_job_array(config_path, tmp_path, capsys):
    assert main(["validate", str(config_path)]) == EXIT_OK
    assert capsys.readouterr().out == (
        f"{config_path}: valid; output_dir {tmp_path / 'out'}\n"
        "stages: merge, requantize, reference, score_merged, score_gptq\n"
        "models (--models, by name or index): 0 merged, 1 gptq\n"
        "GPTQ: gptq (4-bit, group 64)\n"
        "baseline, the base as training loaded it (bitsandbytes 4-bit): quant_type nf4 (default), blocksize 64 "
        "(default), double_quant true (default), compute_dtype float32 (config), quant_storage uint8 (default)\n"
    )
    assert main(["validate", str(config_path), "--list-models"]) == EXIT_OK
    assert capsys.readouterr().out == "merged\ngptq\n"
    edit(config_path, lambda tree: tree["base"].pop("bnb"))  # every bitsandbytes setting a default: said so
    variants = "requantize.variants=[{name: w3, bits: 3, dtype: bfloat16}]"
    assert main(["validate", str(config_path), "--set", variants]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "GPTQ: w3 (3-bit, group 64, dtype bfloat16)\n" in out and "compute_dtype bfloat16 (default)" in out
    assert "warning: base.bnb: no key is set, so the baseline loads the base with this tool's defaults" in err
    assert "warning: GPTQ calibrates on 16 samples; gptqmodel recommends at least 256" in err


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda t: t["requantize"].update(bitz=4), "requantize.bitz: unknown key"),
        (lambda t: t["requantize"].update(bits="four"), "requantize.bits: Input should be 2, 3, 4 or 8"),
        (lambda t: t["evaluation"].update(seq_len="long"), "evaluation.seq_len: Input should be a valid integer"),
        (lambda t: t["adapter"].update(path="no/such/adapter"), "adapter.path: path does not exist"),
        (lambda t: t.pop("base"), "base: Field required"),
        (lambda t: t["base"]["bnb"].update(blocksize=128), "base.bnb.blocksize: transformers always loads"),
        (lambda t: t["evaluation"]["text"].update(dataset="wikitext"), "evaluation.text: set exactly one of"),
        (lambda t: t["requantize"].update(group_size=0), "requantize.group_size: must be -1"),
    ],
)
def test_bad_config_exits_2_naming_the_key(config_path, tmp_path, capsys, change, expected):
    edit(config_path, change)
    assert main(["run", str(config_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    # One problem, on its own line under the file: "error: <config>: invalid config\n  <key>: <reason>".
    assert err.startswith(f"error: {config_path}: invalid config\n  {expected}") and len(err.splitlines()) == 2, err
    assert not (tmp_path / "out").exists()


def test_invalid_yaml_names_the_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("base: [unclosed\n")
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    assert f"{path}: not valid YAML" in capsys.readouterr().err


def test_relative_paths_resolve_against_the_config_file(tmp_path, tiny_base, tiny_adapter, text_files):
    path = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, "out")
    assert load_config(path).output_dir == tmp_path / "out"


def test_set_overrides_any_key(config_path):
    config = load_config(
        config_path, ["requantize.bits=3", "evaluation.max_windows=5", "gate.max_ppl_increase_pct=2.5"]
    )
    assert (config.requantize.bits, config.evaluation.max_windows, config.gate.max_ppl_increase_pct) == (3, 5, 2.5)


def test_set_paths_are_relative_to_the_working_directory_and_the_files_to_the_config(
    config_path, tmp_path, text_files, monkeypatch
):
    """As on any command line: `--set` paths from where the command runs, those in the file from the file's folder."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    shutil.copy(text_files["eval"], elsewhere / "data" / "eval.txt")
    edit(config_path, lambda tree: tree.update(output_dir="in-file-out"))
    monkeypatch.chdir(elsewhere)
    config = load_config(config_path, ["evaluation.text={path: data/eval.txt}"])
    assert config.evaluation.text.path == elsewhere / "data" / "eval.txt"
    assert config.output_dir == config_path.parent / "in-file-out"
    assert load_config(config_path, ["output_dir=runs/x"]).output_dir == elsewhere / "runs" / "x"


def test_set_rejects_malformed_assignments():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override({}, "requantize.bits")
    with pytest.raises(ConfigError, match="'bits' is not a section"):
        apply_override({"requantize": {"bits": 4}}, "requantize.bits.x=1")
    with pytest.raises(ConfigError, match=r"--set 'evaluation.prompts=\[': the value is not valid YAML"):
        apply_override({"evaluation": {}}, "evaluation.prompts=[")


def test_output_inside_an_input_is_refused(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    path = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tiny_adapter / "run")
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    assert (
        f"error: output_dir {tiny_adapter / 'run'} is inside adapter.path {tiny_adapter}; choose another "
        "output_dir" in capsys.readouterr().err
    )
    assert not (tiny_adapter / "run").exists()


def test_eval_text_overlapping_calibration_is_refused(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    texts = {"calibration": text_files["calibration"], "eval": text_files["calibration"]}
    path = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, texts, tmp_path / "out")
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    assert overlap_refusal(text_files["calibration"]) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, expected", [("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), (1234, 1234)])
def test_max_shard_size_accepts_units(config_path, value, expected):
    assert load_config(config_path, [f"max_shard_size={value}"]).max_shard_size == expected


def test_max_shard_size_default_and_bad_unit(config_path):
    assert load_config(config_path).max_shard_size == 10**9
    with pytest.raises(ConfigError, match="max_shard_size: '5 parsecs' is not a size"):
        load_config(config_path, ["max_shard_size=5 parsecs"])


def test_text_too_short_for_one_window_is_refused_before_anything_runs(config_path, tmp_path, tokenizer, capsys):
    sentence = "Far too short to fill one evaluation window of sixty-four tokens."
    short = tmp_path / "short.txt"
    short.write_text(sentence + "\n")
    edit(config_path, lambda t: t["evaluation"]["text"].update(path=str(short)))
    assert main(["run", str(config_path)]) == EXIT_BAD_INPUT
    tokens = len(tokenizer(sentence, add_special_tokens=False)["input_ids"]) + 1  # and the EOS that ends it
    assert (
        f"error: {short} (evaluation.seq_len=64): {tokens} tokens, fewer than the 64 needed" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_validate_reads_the_inputs_too(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    texts = {"calibration": text_files["calibration"], "eval": text_files["calibration"]}
    path = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, texts, tmp_path / "out")
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    assert overlap_refusal(text_files["calibration"]) in capsys.readouterr().err


def test_broken_adapter_config_and_base_without_tokenizer_exit_2(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    path = write_config(tmp_path / "run.yaml", tiny_base, adapter, text_files, tmp_path / "out")
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    assert f"{adapter / 'adapter_config.json'}: not valid JSON" in capsys.readouterr().err

    base = tmp_path / "no-tokenizer"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_base / name, base)
    path = write_config(tmp_path / "run2.yaml", base, tiny_adapter, text_files, tmp_path / "out2")
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    assert f"{base}: has no tokenizer files" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_set_indexes_lists():
    tree = {"adapter": {"adapters": [{"path": "a"}, {"path": "b"}]}}
    apply_override(tree, "adapter.adapters.1.weight=0.3")
    assert tree["adapter"]["adapters"][1] == {"path": "b", "weight": 0.3}
    with pytest.raises(ConfigError, match="'2' is not an index of that list"):
        apply_override(tree, "adapter.adapters.2.weight=1")
