"""`qlora-requant init BASE ADAPTER`: a commented config written from the folders, valid once its data is given."""

from __future__ import annotations

import shutil

import pytest
import yaml

from qlora_requant.pipeline.cli import DEMO_FIXTURE, EXIT_BAD_INPUT, EXIT_OK, main
from qlora_requant.pipeline.config import BaseSection
from qlora_requant.pipeline.demo import build_fixture
from qlora_requant.pipeline.tokenizer import copy_tokenizer

from support import save_4bit


def init(base, adapter, out, capsys) -> tuple[str, dict, str]:
    """Run init into `out`: the file's text, its YAML and what init said on the console."""
    assert main(["init", str(base), str(adapter), "-o", str(out)]) == EXIT_OK
    said = capsys.readouterr().err
    text = out.read_text()
    return text, yaml.safe_load(text), said


def validate_with(config, calibration, evaluation, capsys) -> tuple[int, str]:
    code = main(
        [
            "validate",
            str(config),
            "--set",
            f"requantize.calibration.path={calibration}",
            "--set",
            f"evaluation.text.path={evaluation}",
        ]
    )
    said = capsys.readouterr()
    return code, said.out + said.err


def test_init_on_the_demo_fixture_writes_a_chat_config_that_validates_once_its_data_is_given(tmp_path, capsys):
    build_fixture(DEMO_FIXTURE)  # cached: built once, as `make demo` builds it
    base, adapter = DEMO_FIXTURE / "base", DEMO_FIXTURE / "adapter"
    text, tree, said = init(base, adapter, tmp_path / "release.yaml", capsys)
    assert (tmp_path / base).resolve() == (tmp_path / tree["base"]["path"]).resolve()
    assert tree["output_dir"] == "runs/adapter" and tree["adapter"]["tokenizer"] == "auto"
    assert tree["base"]["dtype"] == "bfloat16"  # config.json's, marked as a guess of training's load dtype
    assert tree["base"]["bnb"] == {
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
        "quant_storage": "uint8",
    }
    assert tree["requantize"]["calibration"] == {
        "path": "data/calibration.jsonl",
        "format": "chat",
        "n_samples": 256,
        "seq_len": 512,
    }
    assert tree["evaluation"]["score"] == "assistant" and tree["evaluation"]["text"]["format"] == "chat"
    assert [variant["name"] for variant in tree["requantize"]["variants"]] == ["w4g128", "w4g128-gptaq", "w4g32"]
    assert tree["gate"] == {"max_ppl_increase_pct": 2.0, "max_kl": 0.05, "min_top1_agreement": 0.9}
    lines = text.splitlines()
    assert "# GUESSED: bnb_4bit_use_double_quant" in next(line for line in lines if "double_quant:" in line)
    assert "# FILL IN" in next(line for line in lines if "calibration.jsonl" in line)
    assert "2 tokens added to the base's vocabulary (<|im_start|>, <|im_end|>)" in text
    assert "some tokens' embedding rows trained (trainable_token_indices)" in text
    assert "the adapter folder's, with a chat template" in text
    assert said.startswith(f"{tmp_path / 'release.yaml'}: fill in requantize.calibration.path and evaluation.text.path")
    assert "base.bnb.quant_type" in said and "requantize.calibration.seq_len" in said

    code, errors = validate_with(tmp_path / "release.yaml", "missing.jsonl", DEMO_FIXTURE / "eval.jsonl", capsys)
    assert code == EXIT_BAD_INPUT and "requantize.calibration.path: path does not exist" in errors
    code, errors = validate_with(
        tmp_path / "release.yaml", DEMO_FIXTURE / "calibration.jsonl", DEMO_FIXTURE / "eval.jsonl", capsys
    )
    assert code == EXIT_OK, errors


def test_init_on_a_peft_chat_adapter_with_added_tokens_validates_once_its_data_is_given(
    chat_files, tiny_base, tmp_path, capsys
):
    text, tree, _ = init(tiny_base, chat_files["adapter"], tmp_path / "chat.yaml", capsys)
    assert tree["evaluation"]["score"] == "assistant" and "2 tokens added" in text
    assert tree["requantize"]["calibration"]["seq_len"] == 256  # the base's max_position_embeddings, below 2048
    code, errors = validate_with(tmp_path / "chat.yaml", chat_files["calibration"], chat_files["eval"], capsys)
    assert code == EXIT_OK, errors


def test_init_writes_several_adapters_as_a_combination(tiny_base, tiny_adapter, text_files, tmp_path, capsys):
    """PEFT saves several adapters as the default one at the top and the others in subfolders."""
    adapters = tmp_path / "adapters"
    shutil.copytree(tiny_adapter, adapters)
    shutil.copytree(tiny_adapter, adapters / "second")
    shutil.copytree(tiny_adapter, adapters / "checkpoint-500")  # a trainer's checkpoint, not an adapter to merge
    text, tree, said = init(tiny_base, adapters, tmp_path / "two.yaml", capsys)
    assert tree["adapter"]["combination"] == "cat"
    assert [entry["path"] for entry in tree["adapter"]["adapters"]] == ["adapters", "adapters/second"]
    assert "adapter.adapters.1.weight" in said and "training checkpoints beside it (1) are left out" in text
    assert tree["requantize"]["calibration"]["path"] == "data/calibration.txt" and "score" not in tree["evaluation"]
    code, errors = validate_with(tmp_path / "two.yaml", text_files["calibration"], text_files["eval"], capsys)
    assert code == EXIT_OK, errors


def test_a_base_saved_in_4bit_keeps_its_own_settings(tiny_base, tiny_adapter, text_files, tmp_path, capsys):
    """A 4-bit save carries the settings training loaded it with: none is guessed."""
    quantized = save_4bit(tiny_base, BaseSection(path=tiny_base, dtype="bfloat16"), tmp_path / "bnb4bit")
    copy_tokenizer(tiny_base, quantized)  # as a 4-bit save on the hub carries it
    text, tree, said = init(quantized, tiny_adapter, tmp_path / "4bit.yaml", capsys)
    assert "bnb" not in tree["base"] and "base.bnb" not in said
    assert "# bnb: read from the 4-bit checkpoint's quantization_config (nf4, double quant true)" in text
    code, errors = validate_with(tmp_path / "4bit.yaml", text_files["calibration"], text_files["eval"], capsys)
    assert code == EXIT_OK and "compute_dtype bfloat16 (the 4-bit checkpoint)" in errors, errors


def test_init_refuses_to_overwrite_a_file_and_names_a_folder_that_is_not_an_adapter(
    tiny_base, tiny_adapter, tmp_path, capsys
):
    existing = tmp_path / "mine.yaml"
    existing.write_text("my own notes\n")
    assert main(["init", str(tiny_base), str(tiny_adapter), "-o", str(existing)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"error: -o {existing}: exists; give a new file (init never overwrites one)\n"
    assert existing.read_text() == "my own notes\n"
    assert main(["init", str(tiny_base), str(tiny_base), "-o", str(tmp_path / "new.yaml")]) == EXIT_BAD_INPUT
    assert f"{tiny_base}: holds no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "new.yaml").exists()


@pytest.mark.parametrize("missing", ["base", "adapter"])
def test_init_names_a_missing_folder(tiny_base, tiny_adapter, tmp_path, capsys, missing):
    folders = {"base": tiny_base, "adapter": tiny_adapter, missing: tmp_path / "nowhere"}
    assert main(["init", str(folders["base"]), str(folders["adapter"])]) == EXIT_BAD_INPUT
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
