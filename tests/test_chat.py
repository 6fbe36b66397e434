"""Chat fine-tunes ship whole: the adapter folder's tokenizer, chat template and special token ids."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main

from support import CHATML_TEMPLATE, write_config

CONVERSATION = [{"role": "user", "content": "What does len() do?"}, {"role": "assistant", "content": "It counts."}]


@pytest.fixture(scope="module")
def templated_adapter(tmp_path_factory, tiny_adapter, tiny_base):
    """The tiny adapter with its fine-tune's tokenizer saved beside it: a chat template and an eos of its own."""
    from transformers import AutoTokenizer

    adapter = tmp_path_factory.mktemp("chat") / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = "<pad>"  # a token of the base vocabulary, so that no embedding needs resizing
    tokenizer.save_pretrained(adapter)
    return adapter


def rendered(folder) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).apply_chat_template(CONVERSATION, tokenize=False)


def test_the_adapters_tokenizer_is_released_with_the_model(tmp_path, tiny_base, templated_adapter, text_files):
    config = write_config(tmp_path / "run.yaml", tiny_base, templated_adapter, text_files, tmp_path / "run")
    assert main(["run", str(config)]) == EXIT_OK
    expected = rendered(templated_adapter)
    assert expected.startswith("<|im_start|>user\nWhat does len() do?<|im_end|>")
    for model in ("merged", "gptq"):
        folder = tmp_path / "run" / model
        assert (folder / "chat_template.jinja").read_bytes() == (templated_adapter / "chat_template.jinja").read_bytes()
        assert rendered(folder) == expected
        pad = json.loads((folder / "tokenizer_config.json").read_text())
        config_ids = json.loads((folder / "config.json").read_text())
        generation = json.loads((folder / "generation_config.json").read_text())
        assert pad["eos_token"] == "<pad>" and config_ids["eos_token_id"] == 2
        assert generation["eos_token_id"] == [2, 1]  # the fine-tune's eos first, the base's kept
    # Greedy generation with the released GPTQ model stops at the fine-tune's eos, in plain transformers.
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "run" / "gptq")!r}, dtype=torch.float32)
        print(model.generation_config.eos_token_id)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[2, 1]"


def test_the_base_tokenizer_can_be_chosen_and_adapters_must_agree(
    tmp_path, tiny_base, tiny_adapter, templated_adapter, text_files, capsys
):
    config = write_config(
        tmp_path / "run.yaml",
        tiny_base,
        templated_adapter,
        text_files,
        tmp_path / "run",
        adapter={"path": str(templated_adapter), "tokenizer": "base"},
    )
    assert main(["validate", str(config)]) == EXIT_OK
    other = tmp_path / "other"
    shutil.copytree(templated_adapter, other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    both = {"combination": "cat", "adapters": [{"path": str(templated_adapter)}, {"path": str(other)}]}
    config = write_config(tmp_path / "two.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run", adapter=both)
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"the adapters {templated_adapter} and {other} carry different tokenizers (vocabulary, special tokens or chat "
        "template); merge adapters trained with one tokenizer, or set adapter.tokenizer to the one to use"
    ) in capsys.readouterr().err
