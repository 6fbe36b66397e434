"""What published files (report.json, report.md, report.html, model cards) say about local inputs: names,
never the absolute paths of the machine the run was on."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any


def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and PurePath(value).is_absolute()


def _local_paths(tree: Any) -> list[str]:
    """Every absolute path among the string values of a JSON tree."""
    if isinstance(tree, dict):
        return [path for value in tree.values() for path in _local_paths(value)]
    if isinstance(tree, list):
        return [path for value in tree for path in _local_paths(value)]
    return [tree] if _is_local_path(tree) else []


def public_config(tree: Any) -> Any:
    """A resolved config (as JSON) with every absolute path replaced by its last component: the file's or
    folder's name."""
    if isinstance(tree, dict):
        return {key: public_config(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [public_config(value) for value in tree]
    return PurePath(tree).name if _is_local_path(tree) else tree


def public_text(text: str, config: dict) -> str:
    """`text` with every absolute path of `config` in it replaced by its name."""
    for path in sorted(set(_local_paths(config)), key=len, reverse=True):
        text = text.replace(path, PurePath(path).name)
    return text
