"""Chat fine-tunes ship whole: the adapter folder's tokenizer, chat template and special token ids."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora_requant.pipeline.checkpoint import CheckpointReader, read_model_config
from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main
from qlora_requant.pipeline.config import AdapterSection
from qlora_requant.pipeline.stages.merge import load_adapter, merge_checkpoint, untrained_new_rows
from qlora_requant.pipeline.tokenizer import carry_tokenizer

from support import (
    CHAT_LAYOUTS,
    CHAT_TOKENS,
    CHATML_TEMPLATE,
    chat_adapter,
    chat_lora_config,
    chat_tokenizer,
    peft_merged_resized,
    peft_reference_logits,
    resized_base,
    save_model,
    tiny_llama,
    write_config,
)

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


@pytest.fixture(scope="module")
def chat_bases(tmp_path_factory, tokenizer):
    """fp32 tiny bases (vocabulary 512), untied and tied, to fine-tune with added tokens."""
    folder = tmp_path_factory.mktemp("chat-bases")
    return {
        tied: save_model(
            tiny_llama(tokenizer, tie_word_embeddings=tied), tokenizer, folder / f"tied-{tied}", dtype=torch.float32
        )
        for tied in (False, True)
    }


def merged_from(base, adapter, out):
    """What the merge stage writes, merging straight into the fp32 base."""
    reader, model_config = CheckpointReader(base), read_model_config(base)
    out.mkdir()
    merge_checkpoint(
        reader, model_config, load_adapter(AdapterSection(path=adapter), reader, model_config), torch.float32, out
    )
    carry_tokenizer(out, adapter)
    return out


# Every layout, tied and untied, with the resized embedding layers saved (PEFT's "auto"); the vocabulary padded to a
# multiple of 64 on the layouts TRL and axolotl write; TRL's dict form on a tied base also without saved layers.
TRL_TIED = ("trl", True)
LAYOUT_CASES = (
    [
        (layout, tied, None, "auto")
        for layout in CHAT_LAYOUTS
        for tied in (False, True)
        if (layout, tied) != ("trl", True)
    ]
    + [(layout, tied, 64, "auto") for layout in ("trainable_tokens", "modules_to_save") for tied in (False, True)]
    + [("trainable_tokens_dict", True, 64, "auto"), ("trl", False, 64, "auto")]
    + [("trainable_tokens_dict", True, None, False)]
)  # TRL's layout on a tied base is refused: see test_trl_on_a_tied_base_with_lm_head_saved_is_refused


@pytest.mark.parametrize("layout, tied, pad_to_multiple_of, save_embedding_layers", LAYOUT_CASES)
def test_every_saved_layout_merges_to_the_model_as_trained(
    tmp_path, chat_bases, layout, tied, pad_to_multiple_of, save_embedding_layers
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = chat_bases[tied]
    adapter = chat_adapter(
        base,
        tmp_path / "adapter",
        layout,
        tied,
        pad_to_multiple_of=pad_to_multiple_of,
        save_embedding_layers=save_embedding_layers,
    )
    merged = merged_from(base, adapter, tmp_path / "merged")
    ids = AutoTokenizer.from_pretrained(merged).apply_chat_template(
        CONVERSATION, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert ids.max() >= 512  # the added tokens are in the text
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    rows = 576 if pad_to_multiple_of else 514
    assert model.config.vocab_size == rows and model.get_input_embeddings().num_embeddings == rows
    with torch.no_grad():
        ours = model(ids).logits
    expected = peft_reference_logits(base, adapter, ids, pad_to_multiple_of=pad_to_multiple_of)
    assert (ours - expected).abs().max().item() < 1e-4
    if not (tied and layout == "embedding_lora"):  # there PEFT merges the embedding delta into the shared head
        peft_model = peft_merged_resized(base, adapter, pad_to_multiple_of=pad_to_multiple_of)
        peft = peft_model.state_dict()
        ours_tensors = {k: v for k, v in model.state_dict().items() if k in peft}
        assert ours_tensors.keys() == peft.keys()
        assert all((v - peft[k]).abs().max().item() <= 1e-5 for k, v in ours_tensors.items())
        # The head is tied (one tensor) in the merged checkpoint exactly when it is in PEFT's merged model.
        peft_tied = peft_model.get_output_embeddings().weight is peft_model.get_input_embeddings().weight
        assert model.config.tie_word_embeddings == peft_tied
    # A tied head stays tied only when the fine-tune kept it equal to the embedding (trainable tokens do).
    assert model.config.tie_word_embeddings == (tied and layout.startswith("trainable_tokens"))


def test_added_tokens_whose_rows_training_left_untouched_are_a_warning_naming_them(
    tmp_path, chat_bases, text_files, capsys
):
    """TRL's trainable tokens on an untied base train the new input rows only: the head's rows for <|im_end|> stay
    as the resize made them, and the model cannot learn to end its turn. Layouts that train them warn of nothing."""
    untrained = {}
    for layout, tied in (
        ("trainable_tokens", False),
        ("trl", False),
        ("trainable_tokens", True),
        ("modules_to_save", False),
        ("embedding_lora", False),
    ):
        base = chat_bases[tied]
        adapter = chat_adapter(base, tmp_path / f"{layout}-{tied}", layout, tied, pad_to_multiple_of=64)
        reader, model_config = CheckpointReader(base), read_model_config(base)
        lora = load_adapter(AdapterSection(path=adapter), reader, model_config)
        untrained[layout, tied] = untrained_new_rows(lora, reader, model_config)
    padding = list(range(514, 576))  # rows past the 514 tokens, that pad_to_multiple_of added: no token reads them
    assert untrained.pop(("trainable_tokens", False)) == {
        "lm_head.weight": list(range(512, 576)),
        "model.embed_tokens.weight": padding,
    }
    assert all(rows == padding for layers in untrained.values() for rows in layers.values())
    config = write_config(
        tmp_path / "run.yaml", chat_bases[False], tmp_path / "trainable_tokens-False", text_files, tmp_path / "run"
    )
    assert main(["validate", str(config)]) == EXIT_OK
    assert "(lm_head.weight: <|im_start|>, <|im_end|>): the model cannot learn to emit" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_a_chat_fine_tune_with_added_tokens_runs_end_to_end(tmp_path, chat_bases, text_files, tied):
    base = chat_bases[tied]
    layout = "trainable_tokens_dict" if tied else "modules_to_save"
    adapter = chat_adapter(base, tmp_path / "adapter", layout, tied)
    config = write_config(tmp_path / "run.yaml", base, adapter, text_files, tmp_path / "run")
    assert main(["run", str(config)]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    merged = report["models"]["merged"]
    assert abs(merged["delta_pct"]) < 0.5 and merged["kl"] < 1e-3, merged
    for model in ("merged", "gptq"):
        assert rendered(tmp_path / "run" / model) == rendered(adapter)
        assert json.loads((tmp_path / "run" / model / "config.json").read_text())["vocab_size"] == 514


def test_added_tokens_without_saved_rows_are_refused_naming_the_cause(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys
):
    from support import chat_tokenizer

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    chat_tokenizer(tiny_base).save_pretrained(adapter)
    config = write_config(tmp_path / "run.yaml", tiny_base, adapter, text_files, tmp_path / "run")
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"{adapter}: the fine-tune added 2 token(s) (its tokenizer has 514, the base's vocabulary 512) but the "
        "adapter saved no embedding rows for them; save the adapter with the resized embeddings"
    ) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_adapter_naming_another_base_is_a_warning_and_raw_state_dicts_are_refused(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys
):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": "org/other"}))
    config = write_config(tmp_path / "run.yaml", tiny_base, adapter, text_files, tmp_path / "run")
    assert main(["validate", str(config)]) == EXIT_OK
    assert (
        f"{adapter}: the adapter was trained on 'org/other' and is merged into {tiny_base}; check that they are the "
        "same model"
    ) in capsys.readouterr().err

    weights = adapter / "adapter_model.safetensors"
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(weights).items()}, weights)
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"{weights}: its keys carry an adapter name (e.g. 'base_model.model.model.layers.0.mlp.down_proj.lora_A."
        "default.weight'): it is a raw state_dict() of the PEFT model, not what save_pretrained writes"
    ) in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_a_chat_fine_tune_of_a_base_saved_in_4bit_runs_end_to_end(tmp_path, chat_bases, tokenizer, text_files, tied):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = chat_bases[tied]
    adapter = chat_adapter(base, tmp_path / "adapter", "trainable_tokens_dict" if tied else "trl", tied)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    four_bit = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization, dtype=torch.float32, device_map="cpu"
    )
    base_4bit = save_model(four_bit, tokenizer, tmp_path / "base-4bit", dtype=None)
    config = write_config(
        tmp_path / "run.yaml", base_4bit, adapter, text_files, tmp_path / "run", base={"path": str(base_4bit)}
    )
    assert main(["run", str(config)]) == EXIT_OK
    merged = json.loads((tmp_path / "run" / "report.json").read_text())["models"]["merged"]
    assert abs(merged["delta_pct"]) < 0.05 and merged["kl"] < 1e-5, merged
    assert rendered(tmp_path / "run" / "gptq") == rendered(adapter)


def test_trl_on_a_tied_base_with_lm_head_saved_is_refused(tmp_path, chat_bases, text_files, capsys):
    """TRL adds lm_head to modules_to_save; on a tied base PEFT then wraps it in a tied token adapter it cannot run."""
    from peft import get_peft_model

    tokenizer = chat_tokenizer(chat_bases[True])
    model = resized_base(chat_bases[True], len(tokenizer))
    peft_model = get_peft_model(model, chat_lora_config("trl", True, tokenizer.convert_tokens_to_ids(CHAT_TOKENS)))
    with pytest.raises(ValueError, match="TrainableTokensLayer wraps an unknown layer type"):
        peft_model(input_ids=torch.tensor([[1, 2]]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    config = write_config(tmp_path / "run.yaml", chat_bases[True], adapter, text_files, tmp_path / "run")
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"{adapter / 'adapter_config.json'}: lm_head is in modules_to_save and, since the base ties its embeddings, "
        "PEFT also gives it a token adapter tied to the embedding's"
    ) in capsys.readouterr().err


def test_added_rows_neither_saved_nor_trained_are_refused(tmp_path, chat_bases, text_files, capsys):
    """Saved without its embedding layers, a resized embedding is rebuilt from the trained rows only when they
    cover every added row: here the first added token's row is neither saved nor trained."""
    from safetensors.torch import load_file, save_file

    adapter = chat_adapter(
        chat_bases[True], tmp_path / "adapter", "trainable_tokens_dict", True, save_embedding_layers=False
    )
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    save_file({**tensors, key: tensors[key][1:].contiguous()}, weights)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["trainable_token_indices"] = {"embed_tokens": [513]}
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    config = write_config(tmp_path / "run.yaml", chat_bases[True], adapter, text_files, tmp_path / "run")
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    assert (
        "the fine-tune resized model.embed_tokens.weight to 514 rows, but rows 512..512 were neither saved nor trained"
    ) in capsys.readouterr().err
