"""Chat-format data and GPTQ variants: conversations rendered as the chat template renders them, calibration and
evaluation on them, every GPTQ setting value loading in plain transformers, and the release candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, main
from qlora_requant.pipeline.records import read_record
from qlora_requant.quant.chat import render_conversation
from qlora_requant.quant.errors import InputError

from support import chat_tokenizer, started_and_skipped, validate_report, write_config

# Four variants that cover every value of every GPTQ setting: bits 2/3/4/8, group_size -1/32/64/128, desc_act and
# sym true/false, and GPTAQ (the five release candidates run on the demo; see the closing note).
VARIANTS = [
    {"name": "w4g128", "bits": 4, "group_size": 128},
    {"name": "w2g64-act", "bits": 2, "group_size": 64, "desc_act": True},
    {"name": "w3g32-act-asym", "bits": 3, "group_size": 32, "desc_act": True, "sym": False},
    {"name": "w8pc-asym-gptaq", "bits": 8, "group_size": -1, "sym": False, "gptaq": True, "dtype": "bfloat16"},
]


def stored_dtypes(checkpoint: Path) -> tuple[str, set[str], set[str]]:
    """A GPTQ checkpoint's config.json dtype, and the dtypes its unquantized floating tensors and its scales are
    stored in (safetensors' names: F16, BF16, ...)."""
    from safetensors import safe_open

    plain, scales = set(), set()
    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(shard, "pt") as reader:
            for name in reader.keys():
                dtype = reader.get_slice(name).get_dtype()
                if dtype.startswith(("F", "BF")):
                    (scales if name.endswith(".scales") else plain).add(dtype)
    return json.loads((checkpoint / "config.json").read_text())["dtype"], plain, scales


def chat_config(folder: Path, tiny_base: Path, chat_files: dict[str, Path], **evaluation) -> Path:
    return write_config(
        folder / "run.yaml",
        tiny_base,
        chat_files["adapter"],
        chat_files,
        folder / "run",
        requantize={
            "bits": 4,
            "group_size": 128,
            "batch_size": 4,
            "calibration": {"path": str(chat_files["calibration"]), "format": "chat", "n_samples": 16, "seq_len": 96},
        },
        evaluation={
            "text": {"path": str(chat_files["eval"]), "format": "chat"},
            "seq_len": 96,
            "max_windows": 12,
            "score": "assistant",
            "prompts": ["def ", [{"role": "user", "content": "What does sorted do?"}]],
            "max_new_tokens": 4,
            **evaluation,
        },
        gate={"max_ppl_increase_pct": 5.0, "min_top1_agreement": 0.6},
    )


def test_a_conversation_renders_as_the_chat_template_with_its_assistant_turns_marked(tiny_base):
    tokenizer = chat_tokenizer(tiny_base)
    messages = [
        {"role": "user", "content": "What does len do?"},
        {"role": "assistant", "content": "Return the number of items."},
        {"role": "user", "content": "And sorted?"},
        {"role": "assistant", "content": "Return a new sorted list."},
    ]
    sample = render_conversation(tokenizer, messages, 256, assistant_tokens=True)
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    bos = tokenizer.bos_token_id
    assert sample.input_ids == ([bos] if bos is not None and rendered[0] != bos else []) + list(rendered)
    assistant = [token for token, marked in zip(sample.input_ids, sample.assistant) if marked]
    assert tokenizer.decode(assistant) == "Return the number of items.<|im_end|>\nReturn a new sorted list.<|im_end|>\n"
    cut = render_conversation(tokenizer, messages, 12, assistant_tokens=True)
    assert cut.input_ids == sample.input_ids[:12] and cut.assistant == sample.assistant[:12]
    # a template that renders an earlier turn differently once a later one follows (as thinking models drop
    # earlier reasoning): refused for assistant scoring, rendered as is otherwise
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] if loop.last else m['content'][:3]) + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(InputError, match="does not render a conversation as the prompt followed by the turns"):
        render_conversation(tokenizer, messages, 256, assistant_tokens=True)
    assert not any(render_conversation(tokenizer, messages, 256).assistant)


# TRL's ChatML with {% generation %} blocks: the mask starts right after "<|im_start|>assistant", newline included.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant' }}"
    "{% generation %}{{ '\\n' + message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_with_generation_blocks_scores_exactly_the_tokens_they_mark(tiny_base):
    """As TRL's assistant_only_loss trains: transformers' assistant tokens mask, the newline after the role
    included; the same template without the blocks marks each turn from the generation prompt on."""
    tokenizer = chat_tokenizer(tiny_base)
    tokenizer.chat_template = GENERATION_TEMPLATE
    messages = [
        {"role": "user", "content": "What does len do?"},
        {"role": "assistant", "content": "Return the number of items."},
    ]
    sample = render_conversation(tokenizer, messages, 256, assistant_tokens=True)
    library = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    offset = len(sample.input_ids) - len(library["input_ids"])  # BOS, when the template writes none
    assert sample.input_ids[offset:] == list(library["input_ids"])
    assert sample.assistant == [False] * offset + [bool(flag) for flag in library["assistant_masks"]]
    marked = tokenizer.decode([token for token, flag in zip(sample.input_ids, sample.assistant) if flag])
    assert marked == "\nReturn the number of items.<|im_end|>"
    tokenizer.chat_template = GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    turns = render_conversation(tokenizer, messages, 256, assistant_tokens=True)
    assert turns.input_ids == sample.input_ids
    marked = tokenizer.decode([token for token, flag in zip(turns.input_ids, turns.assistant) if flag])
    assert marked == "Return the number of items.<|im_end|>\n"


def test_chat_data_and_every_gptq_setting_run_and_the_smallest_passing_variant_is_the_candidate(
    tmp_path, tiny_base, chat_files, capsys
):
    config = chat_config(tmp_path, tiny_base, chat_files)
    variants = json.dumps(VARIANTS).replace('"', "")
    code = main(["run", str(config), "--set", f"requantize.variants={variants}"])
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    validate_report(run / "report.json")
    assert report["protocol"]["assistant_tokens"] == "assistant turns"  # ChatML without generation blocks: said so
    assert "the chat template marks none" in (run / "report.md").read_text()

    # every variant is its own checkpoint, checked in a fresh process with plain transformers against the merge
    assert [v["name"] for v in report["variants"]] == [v["name"] for v in VARIANTS]
    for variant, asked in zip(report["variants"], VARIANTS):
        check = read_record(run / "stages" / f"requantize_{variant['name']}.json")["summary"]
        assert check["check_relative_error"] < 1.0 and (run / variant["model"] / "README.md").is_file()
        format_settings = {key: value for key, value in asked.items() if key not in ("name", "dtype")}
        assert {key: variant[key] for key in format_settings} == format_settings
        # released in the merged dtype (float16) unless the variant asks for another; computed exactly (float32 on
        # CPU for a float16 merge), the GPTQ format's scales in float16
        release = asked.get("dtype", "float16")
        stored = {"float16": "F16", "bfloat16": "BF16"}[release]
        assert stored_dtypes(run / variant["model"]) == (release, {stored}, {"F16"})
        assert (check["dtype"], check["compute_dtype"]) == (release, "float32")
        assert len((run / variant["model"] / "quant_log.csv").read_text().splitlines()) > 1  # GPTAQ's too
        assert variant["size_bytes"] > 0 and variant["model"] == f"gptq_{variant['name']}"
    sizes = {v["name"]: v["size_bytes"] for v in report["variants"]}
    assert sizes["w2g64-act"] < sizes["w3g32-act-asym"] < sizes["w4g128"] < sizes["w8pc-asym-gptaq"]
    serves = {v["name"]: v["serves_on"] for v in report["variants"]}
    assert serves["w4g128"]["vLLM"] == "gptq_marlin" and "ExLlamaV2" in serves["w4g128"]
    assert serves["w8pc-asym-gptaq"]["vLLM"].startswith("gptq (") and "ExLlamaV2" not in serves["w8pc-asym-gptaq"]
    assert "TGI" not in serves["w3g32-act-asym"] and "TGI" in serves["w2g64-act"]

    passing = [v for v in report["variants"] if v["gates_passed"]]
    expected = min(passing, key=lambda v: (v["size_bytes"], v["kl"]))["name"] if passing else None
    assert report["release_candidate"] == expected
    release = next(v for v in report["variants"] if v["name"] == (expected or VARIANTS[0]["name"]))
    sources = report["loss_sources"]  # the per-module loss shown is the release's, named as such
    assert sources["gptq_variant"] == release["model"] and sources["gptq_error"]
    assert ("GPTAQ's per-module loss" in sources["gptq_note"]) == release["gptaq"]
    assert f"Largest GPTQ errors of {release['model']}" in (run / "report.md").read_text()
    assert code == (EXIT_OK if passing else EXIT_GATE_FAILED)
    assert "release candidate" in capsys.readouterr().out

    # a variant removed from the config: its checkpoint and scores leave the run, which says so; added back, only
    # its GPTQ and its scoring run
    removed, fewer = VARIANTS[-1]["name"], json.dumps(VARIANTS[:-1]).replace('"', "")
    log = (run / "run.log").read_text()
    assert main(["run", str(config), "--set", f"requantize.variants={fewer}"]) in (EXIT_OK, EXIT_GATE_FAILED)
    console = capsys.readouterr().err
    for stage, folder in (
        (f"requantize_{removed}", f"gptq_{removed}"),
        (f"score_gptq_{removed}", f"evaluation/gptq_{removed}"),
    ):
        assert f"stage {stage}: no longer in the plan; removed what it wrote ({folder})" in console
        assert not (run / folder).exists()
    assert started_and_skipped((run / "run.log").read_text()[len(log) :])[0] == []
    assert [v["name"] for v in json.loads((run / "report.json").read_text())["variants"]] == [
        v["name"] for v in VARIANTS[:-1]
    ]
    log = (run / "run.log").read_text()
    assert main(["run", str(config), "--set", f"requantize.variants={variants}"]) == code
    started = started_and_skipped((run / "run.log").read_text()[len(log) :])[0]
    assert started == [f"requantize_{removed}", f"score_gptq_{removed}"]

    # chat data: one conversation per window, the assistant turns scored; scoring all tokens scores more
    protocol = report["protocol"]
    assert (protocol["kind"], protocol["score"], protocol["windows"]) == ("conversations", "assistant", 12)
    assert main(["run", str(config), "--set", f"requantize.variants={variants}", "--set", "evaluation.score=all"]) in (
        EXIT_OK,
        EXIT_GATE_FAILED,
    )
    everything = json.loads((run / "report.json").read_text())["protocol"]
    assert everything["windows"] == 12 and everything["tokens"] > protocol["tokens"]

    # published files name inputs, never this machine's paths
    for name in ("report.json", "report.md", "report.html", "gptq_w4g128/README.md"):
        assert str(tmp_path) not in (run / name).read_text(), name

    # no variant passes: exit 3 names the one that came closest and what it lacks; every variant's verdict is shown
    record = json.loads((run / "run.json").read_text())
    record["config"]["gate"] = {"max_kl": 1e-9, "min_top1_agreement": 0.0}  # KL fails everywhere, top-1 nowhere
    (run / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["report", str(run)]) == EXIT_GATE_FAILED
    out = capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    closest = min(report["variants"], key=lambda v: v["kl"])["name"]  # each fails the KL gate alone: the lowest KL
    assert report["release_candidate"] is None and report["closest_variant"] == closest
    verdict = f"Release gate: FAIL: no variant passes every gate; the closest, {closest}, lacks: GPTQ {closest} mean"
    assert verdict in out
    assert all(f"  {v['name']}: FAILS 1 of 2 gates: " in out for v in report["variants"])
    page = (run / "report.html").read_text()
    assert "<h2>Release gates</h2>" in page and "<h2>Artifacts</h2>" in page and "FAIL by" in page
    assert "| w4g128 | min_top1_agreement | top-1 agreement, at least | 0% |" in (run / "report.md").read_text()


def test_bad_variants_and_chat_settings_exit_2_naming_the_key(tmp_path, tiny_base, chat_files, text_files, capsys):
    config = chat_config(tmp_path, tiny_base, chat_files)
    cases = [
        ("requantize.variants=[{name: a}, {name: a, bits: 3}]", "variants.1.name 'a' is taken"),
        ("requantize.variants=[{name: original}]", "reserved"),
        ("requantize.variants=[{name: x, group_size: 0}]", "variants.0 (x): group_size"),
        ("requantize.rotation=hadamard", "rotation 'hadamard' is not supported"),
        ("requantize.variants=[{name: x, act_group_aware: true, desc_act: true}]", "act_group_aware needs"),
        ("evaluation.text.format=text", "score: assistant needs chat data"),
        (f"evaluation.text.path={text_files['eval']}", "format: chat needs records"),
        ("evaluation.text.messages_field=conversation", "has no field 'conversation'"),
        ("evaluation.seq_len=6", "no conversation has a token to score (score: assistant)"),
    ]
    for override, message in cases:
        assert main(["run", str(config), "--set", override]) == EXIT_BAD_INPUT, override
        assert message in capsys.readouterr().err, override
    assert not (tmp_path / "run").exists()
