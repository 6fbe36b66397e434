"""A first config for a fine-tune, written from what its folders say (`qlora-requant init BASE ADAPTER`).

What the folders record is written as found, with where it came from: the base's dtype (config.json), whether it
is a 4-bit save, the adapter's base model, its LoRA settings, the fine-tune's tokenizer and chat template, tokens
it added, LoRA on experts, other adapters in the folder. What they cannot say is marked GUESSED with what to check
(the bitsandbytes settings training loaded the base with above all), and the data paths are marked FILL IN: the
config validates once those point at real files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qlora_requant.pipeline.checkpoint import is_bnb_4bit, read_model_config
from qlora_requant.pipeline.tokenizer import has_chat_template, has_tokenizer, load_tokenizer
from qlora_requant.quant.errors import InputError
from qlora_requant.quant.merge import ADAPTER_CONFIG, read_adapter_config

COMMENT_COLUMN = 40
SEQ_LEN = 2048  # the sequence length guessed for calibration and evaluation, at most the base's context
CALIBRATION_SAMPLES = 256  # gptqmodel's recommended minimum
SIXTEEN_BIT = ("float16", "bfloat16")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
FILL_IN = {
    "requantize.calibration.path": "data/calibration",
    "evaluation.text.path": "data/eval",
}


@dataclass
class StarterConfig:
    """A config's text, and what its reader must do before running it."""

    text: str
    fill_in: list[str] = field(default_factory=list)  # keys with placeholder paths
    guessed: list[str] = field(default_factory=list)  # keys whose values the folders could not give


@dataclass
class _Writer:
    """YAML lines with aligned comments, noting the keys to fill in and those guessed."""

    config: StarterConfig
    lines: list[str] = field(default_factory=list)

    def key(self, key: str, value: object = None, note: str = "", *, indent: int = 0, guessed: str = "") -> None:
        """`key: value  # note`; a section header when value is None. `guessed` is the dotted key, marked GUESSED."""
        text = f"{'  ' * indent}{key.rsplit('.', 1)[-1]}:" + ("" if value is None else f" {_scalar(value)}")
        if guessed:
            self.config.guessed.append(guessed)
            note = f"GUESSED: {note}"
        self.lines.append(f"{text:<{COMMENT_COLUMN - 2}}  # {note}" if note else text)

    def comment(self, text: str, indent: int = 0, note: str = "") -> None:
        """A comment line; `note` aligned with the keys' notes (a key left out, with what it means)."""
        line = f"{'  ' * indent}# {text}"
        self.lines.append(f"{line:<{COMMENT_COLUMN - 2}}  # {note}" if note else line)

    def blank(self) -> None:
        self.lines.append("")


def starter_config(base: Path, adapter: Path, config_dir: Path | None = None) -> StarterConfig:
    """The config for merging `adapter` into `base` and releasing it as GPTQ, as far as their folders say.

    `config_dir`: the folder the config will be saved in (its paths are written relative to it); None: absolute.
    """
    base, adapter = Path(base).resolve(), Path(adapter).resolve()
    model_config = read_model_config(base)
    adapters = _adapter_folders(adapter)
    adapter_config = read_adapter_config(adapters[0][1])
    tokenizer_dir = adapter if has_tokenizer(adapter) else base
    chat = has_chat_template(tokenizer_dir)
    config = StarterConfig(text="")
    out = _Writer(config)

    def path(folder: Path) -> str:
        return str(folder) if config_dir is None else os.path.relpath(folder, config_dir.resolve())

    out.comment(f"qlora-requant config for {adapter.name} on {base.name}, written by `qlora-requant init`.")
    out.comment("FILL IN: paths to give before `qlora-requant validate` passes. GUESSED: what the folders do not")
    out.comment("record: check each against your training run. Every key: README.md, Config reference.")
    out.comment("Paths are relative to this file.")
    out.key("output_dir", path((config_dir or Path.cwd()) / "runs" / adapter.name), "the run directory")
    out.blank()
    _base_section(out, base, path(base), model_config, adapter_config)
    out.blank()
    _adapter_section(out, adapter, adapters, adapter_config, tokenizer_dir, base, chat, path)
    out.blank()
    release_dtype = _dtype(model_config) if _dtype(model_config) in SIXTEEN_BIT else "float16"
    out.key("merge")
    out.key("merge.dtype", release_dtype, "the merged checkpoint's, which GPTQ reads and the release ships", indent=1)
    out.blank()
    seq_len = min(SEQ_LEN, int(model_config.get("max_position_embeddings") or SEQ_LEN))
    _requantize_section(out, chat, seq_len)
    out.blank()
    _evaluation_section(out, chat, seq_len)
    out.blank()
    _gate_section(out)
    out.blank()
    out.comment("release:", 0, "what the GPTQ folders' model cards say")
    out.comment("  repo_id: my-org/my-model-{variant}", 0, "the Hub repository each GPTQ checkpoint is published to")
    out.comment("  license: apache-2.0", 0, "default: the base's model card's license")
    out.comment("  datasets: [my-org/my-chats]", 0, "the fine-tune's training data")
    config.text = "\n".join(out.lines) + "\n"
    return config


def _base_section(out: _Writer, base: Path, where: str, model_config: dict, adapter_config: dict) -> None:
    out.key("base")
    out.key("base.path", where, indent=1)
    named = adapter_config.get("base_model_name_or_path") or ""
    if HUB_ID.fullmatch(named) and not Path(named).exists():
        out.key("base.model_id", named, "the adapter's base_model_name_or_path (adapter_config.json)", indent=1)
    else:
        out.comment("model_id: my-org/base", 1, f"the base's Hub id, for the model card (the adapter names {named!r})")
    dtype = _dtype(model_config)
    if dtype is None:
        out.key(
            "base.dtype",
            "bfloat16",
            "config.json records none; set the dtype training loaded the base in",
            indent=1,
            guessed="base.dtype",
        )
    else:
        out.key(
            "base.dtype",
            dtype,
            "config.json's; set the dtype training loaded the base in (torch_dtype)",
            indent=1,
            guessed="base.dtype",
        )
    if is_bnb_4bit(model_config):
        settings = model_config["quantization_config"]
        out.comment(
            f"bnb: read from the 4-bit checkpoint's quantization_config ({settings.get('bnb_4bit_quant_type', 'fp4')}, "
            f"double quant {str(settings.get('bnb_4bit_use_double_quant', False)).lower()})",
            1,
        )
        return
    out.key("base.bnb", note="GUESSED: the QLoRA recipe; set each as training's BitsAndBytesConfig had it", indent=1)
    compute = dtype if dtype in SIXTEEN_BIT else "bfloat16"
    for key, value, name in (
        ("quant_type", "nf4", "bnb_4bit_quant_type"),
        ("double_quant", True, "bnb_4bit_use_double_quant"),
        ("compute_dtype", compute, "bnb_4bit_compute_dtype"),
        ("quant_storage", "uint8", "bnb_4bit_quant_storage (bfloat16 with FSDP)"),
    ):
        out.key(f"base.bnb.{key}", value, name, indent=2, guessed=f"base.bnb.{key}")


def _adapter_section(
    out: _Writer,
    adapter: Path,
    adapters: list[tuple[str, Path]],
    adapter_config: dict,
    tokenizer_dir: Path,
    base: Path,
    chat: bool,
    path,
) -> None:
    out.key("adapter")
    if len(adapters) == 1:
        out.key("adapter.path", path(adapters[0][1]), indent=1)
    else:
        out.comment(f"the folder holds {len(adapters)} adapters ({', '.join(name for name, _ in adapters)}):", 1)
        out.key(
            "adapter.combination",
            "cat",
            "cat: the exact weighted sum of their deltas",
            indent=1,
            guessed="adapter.combination",
        )
        out.key("adapter.adapters", indent=1)
        for index, (_, folder) in enumerate(adapters):
            out.lines.append(f"    - path: {_scalar(path(folder))}")
            weight = f"adapter.adapters.{index}.weight"
            out.key("weight", 1.0, "each adapter's weight in the sum", indent=3, guessed=weight)
    for note in _adapter_notes(adapter, adapter_config):
        out.comment(note, 1)
    tokens = _added_tokens(tokenizer_dir, base)
    if tokens:
        out.comment(tokens, 1)
    where = "the adapter folder's" if tokenizer_dir == adapter else "the base's (the adapter folder holds none)"
    template = ", with a chat template" if chat else ", without a chat template"
    out.key("adapter.tokenizer", "auto", f"the fine-tune's tokenizer: {where}{template}", indent=1)


def _adapter_notes(adapter: Path, config: dict) -> list[str]:
    """What the adapter's config says about its layout, one comment line each."""
    kind = "DoRA" if config.get("use_dora") else "rsLoRA" if config.get("use_rslora") else "LoRA"
    targets = config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    notes = [f"{kind} r={config.get('r')}, alpha={config.get('lora_alpha')} on {targets or 'no module'}"]
    if config.get("target_parameters"):
        notes.append(
            f"LoRA on the experts' fused parameters ({', '.join(config['target_parameters'])}): a mixture-of-experts "
            "fine-tune, see README, Mixture of experts"
        )
    if config.get("modules_to_save"):
        notes.append(f"trained in full: {', '.join(config['modules_to_save'])} (modules_to_save)")
    if config.get("trainable_token_indices"):
        notes.append("some tokens' embedding rows trained (trainable_token_indices)")
    checkpoints = sorted(child.name for child in adapter.glob(f"checkpoint-*/{ADAPTER_CONFIG}"))
    if checkpoints:
        notes.append(f"training checkpoints beside it ({len(checkpoints)}) are left out: the folder's own is merged")
    return notes


def _added_tokens(tokenizer_dir: Path, base: Path) -> str:
    """A note on the tokens the fine-tune's tokenizer adds to the base's, when both tokenizers load."""
    if tokenizer_dir == base or not has_tokenizer(base):
        return ""
    try:
        tuned, original = load_tokenizer(tokenizer_dir), load_tokenizer(base)
    except InputError:
        return ""
    added = [token for token in tuned.get_vocab() if token not in original.get_vocab()]
    if not added:
        return ""
    shown = ", ".join(sorted(added, key=tuned.convert_tokens_to_ids)[:5]) + (", ..." if len(added) > 5 else "")
    return (
        f"{len(added)} tokens added to the base's vocabulary ({shown}): the merge resizes the embeddings to "
        f"{len(tuned)} rows from the adapter's saved ones"
    )


def _requantize_section(out: _Writer, chat: bool, seq_len: int) -> None:
    out.key("requantize", note="GPTQ: the settings below, then one checkpoint per variant")
    for key, value, note in (
        ("bits", 4, "2 | 3 | 4 | 8"),
        ("group_size", 128, "-1: per channel"),
        ("desc_act", False, "act-order"),
        ("sym", True, ""),
        ("damp_percent", 0.01, ""),
    ):
        out.key(f"requantize.{key}", value, note, indent=1)
    out.key("requantize.calibration", note="text from your fine-tuning domain, not the evaluation's", indent=1)
    _data_source(out, "requantize.calibration.path", chat, indent=2)
    out.key("requantize.calibration.n_samples", CALIBRATION_SAMPLES, "gptqmodel recommends at least 256", indent=2)
    out.key(
        "requantize.calibration.seq_len",
        seq_len,
        "the fine-tune's training sequence length",
        indent=2,
        guessed="requantize.calibration.seq_len",
    )
    out.key(
        "requantize.variants",
        note="each a GPTQ checkpoint, scored on the same data; the smallest passing ships",
        indent=1,
    )
    for name, setting, note in (
        ("w4g128", "", "the settings above: what vLLM, TGI and transformers serve most"),
        ("w4g128-gptaq", "gptaq: true", "the same size, GPTAQ's calibration"),
        ("w4g32", "group_size: 32", "larger, closer to the baseline"),
    ):
        out.lines.append(f"{'    - name: ' + name:<{COMMENT_COLUMN - 2}}  # {note}")
        if setting:
            out.lines.append(f"      {setting}")


def _evaluation_section(out: _Writer, chat: bool, seq_len: int) -> None:
    out.key("evaluation", note="every model scored on the same windows of held-out data")
    out.key("evaluation.text", indent=1)
    _data_source(out, "evaluation.text.path", chat, indent=2)
    if chat:
        out.key("evaluation.score", "assistant", "the assistant turns' tokens, as SFT trains them", indent=1)
    out.key("evaluation.seq_len", seq_len, "window length in tokens", indent=1, guessed="evaluation.seq_len")
    out.key("evaluation.prompts", [], "greedy continuations side by side: texts or conversations", indent=1)
    out.comment("tasks:", 1, "lm-evaluation-harness tasks (pip install 'qlora-requant[tasks]')")
    out.comment("  - name: arc_easy", 1, "a registered task (data from the hub), or path: a local task folder")


def _data_source(out: _Writer, key: str, chat: bool, indent: int) -> None:
    out.config.fill_in.append(key)
    if chat:
        out.key(key, f"{FILL_IN[key]}.jsonl", 'FILL IN: records of {"messages": [{role, content}, ...]}', indent=indent)
        out.key(key.replace(".path", ".format"), "chat", "rendered with the fine-tune's chat template", indent=indent)
    else:
        out.key(key, f"{FILL_IN[key]}.txt", "FILL IN: .txt (one text per paragraph), .jsonl or .parquet", indent=indent)


def _gate_section(out: _Writer) -> None:
    out.key("gate", note="judged on every GPTQ variant against the baseline (the model as trained)")
    out.key("gate.max_ppl_increase_pct", 2.0, "PPL at most 2% above the baseline's (upper 95% bound)", indent=1)
    out.key("gate.max_kl", 0.05, "mean token KL(baseline || GPTQ), nats", indent=1)
    out.key("gate.min_top1_agreement", 0.9, "share of tokens with the baseline's top-1 prediction", indent=1)
    out.comment("max_task_drop: 2.0", 1, "task accuracy drop in points (with evaluation.tasks)")


def _adapter_folders(adapter: Path) -> list[tuple[str, Path]]:
    """The adapters in a folder: its own, or PEFT's save of several (one subfolder each, the default at the top)."""
    if not adapter.is_dir():
        raise InputError(f"{adapter}: not a folder; give the adapter folder (adapter_config.json and its weights)")
    found = [("default", adapter)] if (adapter / ADAPTER_CONFIG).is_file() else []
    found += [
        (child.name, child)
        for child in sorted(adapter.iterdir())
        if (child / ADAPTER_CONFIG).is_file() and not child.name.startswith("checkpoint-")
    ]
    if not found:
        raise InputError(
            f"{adapter}: holds no {ADAPTER_CONFIG}; give the folder a PEFT adapter was saved to (save_pretrained)"
        )
    return found


def _dtype(model_config: dict) -> str | None:
    name = model_config.get("dtype") or model_config.get("torch_dtype")
    return str(name).removeprefix("torch.") if name else None


def _scalar(value: object) -> str:
    """A value as YAML writes it in flow style (quoted only where it must be)."""
    if isinstance(value, str):
        return yaml.safe_dump(value, width=10**6).removesuffix("\n...\n").strip()
    return json.dumps(value)
