"""Chat-format data, as supervised fine-tuning sees it: each conversation rendered with the fine-tune's chat
template into one sample (BOS first), with the tokens of the assistant turns marked (what SFT trains on
with assistant-only loss)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_requant.quant.errors import InputError

Conversation = list[dict[str, str]]
QUOTED_ERROR_CHARS = 120  # of a chat template's own error message, quoted in ours
# How the assistant tokens are found (the evaluation protocol's assistant_tokens): the chat template's own
# {% generation %} blocks, which TRL's assistant-only loss trains on; or, where it has none, each assistant turn.
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class ChatSample:
    """One rendered conversation: its token ids and, per token, whether it belongs to an assistant turn."""

    input_ids: list[int]
    assistant: list[bool]


def check_conversations(records: list, field: str, where: str) -> list[Conversation]:
    """The conversations of `records` (each record's `field`: a list of {role, content}); InputError naming the
    record and what is wrong otherwise."""
    conversations = []
    for number, messages in enumerate(records, 1):
        if not isinstance(messages, list) or not messages:
            raise InputError(
                f"{where}: record {number}: {field!r} is {type(messages).__name__}, not a list of messages; a chat "
                f"record holds {field}: [{{role, content}}, ...] (set messages_field, or format: text)"
            )
        for turn, message in enumerate(messages, 1):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise InputError(
                    f"{where}: record {number}, message {turn}: {message!r} is not a {{role, content}} pair of strings"
                )
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise InputError(f"{where}: holds no conversations")
    return conversations


def render_conversation(
    tokenizer, messages: Conversation, seq_len: int, assistant_tokens: bool = False, where: str = "a conversation"
) -> ChatSample:
    """`messages` rendered with the tokenizer's chat template and tokenized, starting with BOS (when the
    tokenizer has one and the template does not write it), cut to `seq_len` tokens. Errors name it `where`
    (the file and record).

    With `assistant_tokens`, the assistant turns' tokens are marked: those the template's {% generation %} blocks
    mark, when it has them (transformers' assistant tokens mask, what TRL's assistant-only loss trains); else found
    by rendering the conversation up to each assistant turn: the turn spans from the end of the prompt before it
    (with the generation prompt) to the end of the conversation through it, so it includes the turn's closing
    tokens. A template that renders earlier turns differently once later ones follow is refused then.
    """
    if assistant_tokens and marks_generation(tokenizer):
        return _generation_marked(tokenizer, messages, seq_len, where)
    text = _template(tokenizer, messages, where, "record")
    spans = []
    for index, message in enumerate(messages if assistant_tokens else []):
        if message["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:index], where, "record", generation_prompt=True) if index else ""
        through = _template(tokenizer, messages[: index + 1], where, "record")
        if not (text.startswith(through) and through.startswith(prompt)):
            raise InputError(
                f"the chat template of {tokenizer.name_or_path} does not render a conversation as the prompt "
                "followed by the turns, so assistant tokens cannot be found; set evaluation.score: all"
            )
        spans.append((len(prompt), len(through)))
    if assistant_tokens and not getattr(tokenizer, "is_fast", False):
        raise InputError(
            f"{tokenizer.name_or_path}: a slow (Python) tokenizer gives no character offsets, so assistant tokens "
            "cannot be found; give a fast tokenizer (tokenizer.json), or set evaluation.score: all"
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=assistant_tokens)
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"] if assistant_tokens else [(-1, -1)] * len(ids)
    assistant = [any(low <= start < high for low, high in spans) for start, _ in offsets]
    return _with_bos(tokenizer, ids, assistant, seq_len)


def marks_generation(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks the tokens training learns with {% generation %} blocks."""
    return bool(GENERATION_BLOCK.search(getattr(tokenizer, "chat_template", None) or ""))


def _generation_marked(tokenizer, messages: Conversation, seq_len: int, where: str) -> ChatSample:
    """`messages` rendered and tokenized by the chat template, its {% generation %} blocks' tokens marked."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(
            f"{tokenizer.name_or_path}: a slow (Python) tokenizer gives no character offsets, so the tokens of the "
            "chat template's generation blocks cannot be found; give a fast tokenizer (tokenizer.json), or set "
            "evaluation.score: all"
        )
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as exc:  # jinja2's errors, as in _template
        raise InputError(
            f"{where}: the chat template ({_template_source(tokenizer)}) failed: {_template_error(exc)}; "
            "fix the template or the record"
        ) from None
    marked = [bool(flag) for flag in rendered["assistant_masks"]]
    return _with_bos(tokenizer, list(rendered["input_ids"]), marked, seq_len)


def _with_bos(tokenizer, ids: list[int], assistant: list[bool], seq_len: int) -> ChatSample:
    """A rendered conversation starting with BOS (when the tokenizer has one and the template did not write it),
    cut to `seq_len` tokens."""
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, assistant = [bos, *ids], [False, *assistant]
    return ChatSample(ids[:seq_len], assistant[:seq_len])


def render_prompt(tokenizer, messages: Conversation, where: str = "a prompt") -> str:
    """A conversation (named `where` in errors) as a generation prompt: rendered with the chat template, ending
    where the assistant's answer starts."""
    return _template(tokenizer, messages, where, "prompt", generation_prompt=True)


def require_chat_template(tokenizer, where: str) -> None:
    """Refuse chat data for a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{where} is chat data, but the fine-tune's tokenizer ({tokenizer.name_or_path}) has no chat template; "
            "give the tokenizer the template it was trained with (adapter.tokenizer), or use format: text"
        )


def _template_source(tokenizer) -> str:
    """Where the tokenizer's chat template was read from, as messages name it: chat_template.jinja in its folder,
    or tokenizer_config.json's chat_template key, whichever holds the template in use; else the folder."""
    folder, template = Path(tokenizer.name_or_path), tokenizer.chat_template
    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    try:
        if jinja.is_file() and jinja.read_text(encoding="utf-8") == template:
            return str(jinja)
        if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("chat_template") == template:
            return f"{config}, key chat_template"
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object: named by its folder
        pass
    return str(folder)


def _template(tokenizer, messages: Conversation, where: str, item: str, generation_prompt: bool = False) -> str:
    """`messages` rendered with the chat template; InputError naming `where`, the template and its error else."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 raises its own errors (e.g. a template that refuses a role order)
        raise InputError(
            f"{where}: the chat template ({_template_source(tokenizer)}) failed: {_template_error(exc)}; "
            f"fix the template or the {item}"
        ) from None


def _template_error(exc: Exception) -> str:
    """A chat template's error message on one line (with the template line of a syntax error), shortened."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if getattr(exc, "lineno", None) is not None:  # jinja2.TemplateSyntaxError: the template does not parse
        text = f"syntax error on line {exc.lineno}: {text}"
    if len(text) > QUOTED_ERROR_CHARS:
        text = text[: QUOTED_ERROR_CHARS - 1].rstrip() + "…"
    return text
