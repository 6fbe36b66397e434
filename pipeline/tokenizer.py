"""The fine-tune's tokenizer: which folder holds it, and how a released checkpoint carries it.

TRL, axolotl and unsloth save the tokenizer a model was fine-tuned with (its chat template, added
special tokens, a new eos or pad) into the adapter folder. That tokenizer, not the base's, is the one
calibration, evaluation and prompts use, and the one written into merged/ and gptq/; the checkpoints'
special token ids (config.json, generation_config.json) follow it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlora_requant.quant.errors import InputError

# Files a tokenizer is saved as (transformers 5 writes the chat template as chat_template.jinja).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
EXTRA_CHAT_TEMPLATES = "additional_chat_templates"
GENERATION_CONFIG = "generation_config.json"


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not has_tokenizer(folder):
        raise InputError(
            f"{folder}: has no tokenizer files; save the tokenizer used in training beside the base "
            "or in the adapter folder (tokenizer.json / tokenizer_config.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: its tokenizer cannot be loaded ({exc}); re-save it with save_pretrained") from None


def tokenizer_folder(choice: str | Path, base_dir: Path, adapter_dirs: list[Path], trust_remote_code: bool) -> Path:
    """The folder holding the fine-tune's tokenizer (adapter.tokenizer).

    auto: the adapter folder's tokenizer when it holds one (several adapters must agree), else the base's;
    base: the base's; a path: that folder.
    """
    if choice == "base":
        return base_dir
    if choice != "auto":
        folder = Path(choice)
        if not has_tokenizer(folder):
            raise InputError(f"adapter.tokenizer: {folder} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
        return folder
    carrying = [folder for folder in adapter_dirs if has_tokenizer(folder)]
    if not carrying:
        return base_dir
    first = _identity(load_tokenizer(carrying[0], trust_remote_code))
    for other in carrying[1:]:
        if _identity(load_tokenizer(other, trust_remote_code)) != first:
            raise InputError(
                f"the adapters {carrying[0]} and {other} carry different tokenizers (vocabulary, special tokens or "
                "chat template); merge adapters trained with one tokenizer, or set adapter.tokenizer to the one to use"
            )
    return carrying[0]


def _identity(tokenizer) -> tuple:
    return (tokenizer.get_vocab(), tokenizer.all_special_tokens, tokenizer.chat_template)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of `src` into `dst` (a checkpoint folder), byte for byte."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / EXTRA_CHAT_TEMPLATES).is_dir():
        shutil.copytree(src / EXTRA_CHAT_TEMPLATES, dst / EXTRA_CHAT_TEMPLATES, dirs_exist_ok=True)


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos, eos and pad ids the tokenizer defines."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None}


def align_generation_config(folder: Path, tokenizer) -> None:
    """Make generation_config.json in `folder` stop where the fine-tune's tokenizer ends a turn: its eos
    (a chat template's turn end, when the tokenizer marks it as eos) is an eos of the generation config,
    beside the base's; bos and pad follow the tokenizer."""
    path = folder / GENERATION_CONFIG
    config = json.loads(path.read_text()) if path.is_file() else {}
    ids = special_token_ids(tokenizer)
    previous = config.get("eos_token_id")
    previous = previous if isinstance(previous, list) else [] if previous is None else [previous]
    if "eos_token_id" in ids:
        eos = list(dict.fromkeys([ids.pop("eos_token_id"), *previous]))
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    config.update(ids)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def carry_tokenizer(checkpoint: Path, tokenizer_dir: Path, trust_remote_code: bool = False) -> None:
    """Give a checkpoint folder the fine-tune's tokenizer (replacing the base's copied beside the weights)
    and special token ids that agree with it in config.json and generation_config.json."""
    for name in TOKENIZER_FILES:
        (checkpoint / name).unlink(missing_ok=True)
    shutil.rmtree(checkpoint / EXTRA_CHAT_TEMPLATES, ignore_errors=True)
    copy_tokenizer(tokenizer_dir, checkpoint)
    tokenizer = load_tokenizer(checkpoint, trust_remote_code)
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config.update(special_token_ids(tokenizer))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    align_generation_config(checkpoint, tokenizer)


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` carries a chat template (chat_template.jinja or .json, or the
    chat_template key of tokenizer_config.json)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False
