"""Messages for bad input that name where the problem is: a config key given twice, a chat template that fails."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main
from qlora_requant.pipeline.config import load_config
from qlora_requant.quant.chat import render_prompt
from qlora_requant.quant.errors import InputError

from support import CHATML_TEMPLATE, write_config


@pytest.fixture
def config_path(tmp_path, tiny_base, tiny_adapter, text_files):
    return write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "out")


def replace_section(path, name: str, text: str) -> int:
    """Rewrite the config at `path` with section `name` written as `text` (YAML, at its end); returns the line
    number `text` starts on."""
    tree = yaml.safe_load(path.read_text())
    tree.pop(name)
    head = yaml.safe_dump(tree)
    path.write_text(head + text)
    return len(head.splitlines()) + 1


def validate_error(config, capsys) -> str:
    """The error `validate` prints for `config` (after datasets' progress bars), checked to exit 2 on one line."""
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    error = err[err.index("error: ") :]
    assert len(error.splitlines()) == 1, err
    return error


# A config key given twice


def test_a_key_given_twice_in_a_section_names_the_key_and_both_lines(config_path, tmp_path, capsys):
    start = replace_section(
        config_path,
        "requantize",
        "requantize:\n  bits: 4\n  group_size: 64\n  bits: 2\n"
        f"  calibration: {{path: {tmp_path}/none.txt, seq_len: 64}}\n",
    )
    err = validate_error(config_path, capsys)
    assert (
        f"{config_path}: not valid YAML: key 'bits' is given twice in one mapping (lines {start + 1} and {start + 3}); "
        "keep one of them"
    ) in err
    assert not (tmp_path / "out").exists()


def test_a_section_given_twice_names_it_and_both_lines(config_path, capsys):
    first = config_path.read_text().splitlines().index("requantize:") + 1
    last = len(config_path.read_text().splitlines()) + 1
    config_path.write_text(config_path.read_text() + "requantize:\n  bits: 2\n")
    err = validate_error(config_path, capsys)
    assert f"key 'requantize' is given twice in one mapping (lines {first} and {last})" in err


def test_keys_merged_with_yaml_merge_keys_may_be_overridden(config_path, text_files):
    replace_section(
        config_path,
        "evaluation",
        f"evaluation:\n  text: {{path: {text_files['eval']}}}\n  seq_len: 64\n  prompts:\n"
        "    - [&ask {role: user, content: 'What does len do?'}]\n"
        "    - [{<<: *ask, content: 'What does sorted do?'}]\n",
    )
    prompts = load_config(config_path).evaluation.prompts
    assert [(m.role, m.content) for p in prompts for m in p] == [
        ("user", "What does len do?"),
        ("user", "What does sorted do?"),
    ]


# A chat template that fails on a record, or does not parse

REFUSING_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] == 'refused' %}{{ raise_exception('no system role') }}{% endif %}"
    "{% endfor %}" + CHATML_TEMPLATE
)


def templated_adapter(adapter, tiny_base, folder, template: str, in_config: bool = False):
    """A copy of `adapter` with the base's tokenizer and `template` saved beside it: as chat_template.jinja, or
    (`in_config`) as tokenizer_config.json's chat_template key, as older transformers saved it."""
    from transformers import AutoTokenizer

    shutil.copytree(adapter, folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    if in_config:
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def write_chats(path, refused: int | None = None, count: int = 10):
    """`count` conversations, record number `refused` (counted from 1) one the refusing template refuses."""
    records = [
        {
            "messages": [
                {"role": "user", "content": "refused" if number == refused else f"What does function {number} do?"},
                {"role": "assistant", "content": f"Function {number} returns the {number}th item of a list."},
            ]
        }
        for number in range(1, count + 1)
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def chat_run_config(tmp_path, tiny_base, adapter, text_files, calibration=None, evaluation=None, prompts=()):
    """A config calibrating and evaluating on the chat files given (plain text where None)."""
    source = {"path": str(calibration), "format": "chat"} if calibration else {"path": str(text_files["calibration"])}
    text = {"path": str(evaluation), "format": "chat"} if evaluation else {"path": str(text_files["eval"])}
    return write_config(
        tmp_path / "run.yaml",
        tiny_base,
        adapter,
        text_files,
        tmp_path / "out",
        requantize={"bits": 4, "group_size": 64, "calibration": {**source, "n_samples": 16, "seq_len": 64}},
        evaluation={"text": text, "seq_len": 64, "max_windows": 8, "prompts": ["The quick", *prompts]},
    )


@pytest.mark.parametrize("part", ["calibration", "evaluation"])
def test_a_record_the_template_refuses_names_the_file_the_record_and_the_template(
    tmp_path, tiny_base, tiny_adapter, text_files, capsys, part
):
    adapter = templated_adapter(tiny_adapter, tiny_base, tmp_path / "adapter", REFUSING_TEMPLATE)
    data = write_chats(tmp_path / f"{part}.jsonl", refused=7)
    config = chat_run_config(tmp_path, tiny_base, adapter, text_files, **{part: data})
    err = validate_error(config, capsys)
    assert err == (
        f"error: {data}: record 7: the chat template ({adapter / 'chat_template.jinja'}) failed: no system role; "
        "fix the template or the record\n"
    )
    config = chat_run_config(tmp_path, tiny_base, adapter, text_files, **{part: write_chats(data)})
    assert main(["validate", str(config)]) == EXIT_OK


def test_a_template_that_does_not_parse_names_its_line(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    broken = "{% for m in messages %}{{ m['content'] }}\n{{ m['role'] }\n{% endfor %}"
    adapter = templated_adapter(tiny_adapter, tiny_base, tmp_path / "adapter", broken)
    data = write_chats(tmp_path / "eval.jsonl")
    err = validate_error(chat_run_config(tmp_path, tiny_base, adapter, text_files, evaluation=data), capsys)
    assert err == (
        f"error: {data}: record 1: the chat template ({adapter / 'chat_template.jinja'}) failed: syntax error on "
        "line 2: unexpected '}'; fix the template or the record\n"
    )


def test_a_template_in_tokenizer_config_is_named_there(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    adapter = templated_adapter(tiny_adapter, tiny_base, tmp_path / "adapter", REFUSING_TEMPLATE, in_config=True)
    data = write_chats(tmp_path / "eval.jsonl", refused=3)
    err = validate_error(chat_run_config(tmp_path, tiny_base, adapter, text_files, evaluation=data), capsys)
    assert f"{data}: record 3: the chat template ({adapter / 'tokenizer_config.json'}, key chat_template) failed" in err


def test_a_prompt_the_template_refuses_is_named_by_its_key(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    adapter = templated_adapter(tiny_adapter, tiny_base, tmp_path / "adapter", REFUSING_TEMPLATE)
    prompt = [{"role": "user", "content": "refused"}]
    err = validate_error(chat_run_config(tmp_path, tiny_base, adapter, text_files, prompts=[prompt]), capsys)
    assert err == (
        f"error: evaluation.prompts.1: the chat template ({adapter / 'chat_template.jinja'}) failed: no system role; "
        "fix the template or the prompt\n"
    )


def test_a_long_template_error_is_shortened(tmp_path, tiny_base, tiny_adapter):
    from transformers import AutoTokenizer

    reason = "a system message must come first " * 10
    template = "{{ raise_exception('" + reason + "') }}"
    adapter = templated_adapter(tiny_adapter, tiny_base, tmp_path / "adapter", template)
    with pytest.raises(InputError) as refusal:
        render_prompt(AutoTokenizer.from_pretrained(adapter), [{"role": "user", "content": "hi"}], "here")
    quoted = str(refusal.value).split(" failed: ")[1].removesuffix("; fix the template or the prompt")
    assert len(quoted) <= 120 and quoted.endswith("…") and reason.startswith(quoted.removesuffix("…"))
