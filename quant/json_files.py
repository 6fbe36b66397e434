"""JSON files of checkpoints and adapters (config.json, adapter_config.json, tokenizer_config.json), read
so that any damage is one InputError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_requant.quant.errors import InputError


def read_json_object(path: Path, error: type[InputError] = InputError) -> dict:
    """The JSON object in `path`; `error` naming the file when it is not UTF-8, not JSON, or not an object."""
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); re-download or re-save it") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(tree, dict):
        raise error(f"{path}: holds a JSON {type(tree).__name__}, not an object; re-download or re-save it")
    return tree
