"""Record checks per dataset format, before anything is tokenized, and chat records in one shape.

A check returns why a record cannot be used (one line, naming the field), or None. Chat records come as
`messages` of `role`/`content` or ShareGPT `conversations` of `from`/`value`; both become a list of
`{"role", "content", ...}` with every answering turn's role written as `assistant`, the name chat templates know.
Numbers where text is expected (a CSV column of numbers is read as int64; JSON's `"output": 12`) are taken as their
text ("12"; a whole float such as 12.0 as "12").
"""

from __future__ import annotations

import math
from typing import Any

CHAT_COLUMNS = ("messages", "conversations")
# Names that datasets give the answering side, taken for FT_ANSWER_ROLES=assistant when a conversation has no
# `assistant` turn and uses exactly one of them (Gemma's `model`, ShareGPT's `gpt`, `bot`, `chatbot`).
ANSWER_ALIASES = ("model", "gpt", "bot", "chatbot")
# Other sides' names as datasets write them (ShareGPT's `human`), as chat templates know them.
ROLE_ALIASES = {"human": "user"}


def is_number(value: Any) -> bool:
    """An int or a finite float (not a bool): taken as its text where a record holds text."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number_text(value: int | float) -> str:
    """A number as text; a whole float without its ".0" (12.0 -> "12"): datasets reads a column of whole numbers
    with one decimal, or a CSV column of numbers with a blank cell, as floats."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def numbers_as_text(record: dict[str, Any], fmt: str, text_field: str) -> dict[str, Any]:
    """`record` with the numbers in its text fields for format `fmt` (as `problem` checks them) written as text:
    `12` and `12.0` become "12". Other values are left for `problem` to name."""
    fields = {"text": [text_field], "alpaca": ["instruction", "input", "output"],
              "prompt_completion": ["prompt", "completion"]}.get(fmt, [])
    found = {f: number_text(record[f]) for f in fields if is_number(record.get(f))}
    return {**record, **found} if found else record


def answer_roles(setting: str) -> list[str]:
    """FT_ANSWER_ROLES as a list of role names."""
    return [r.strip() for r in setting.split(",") if r.strip()]


def chat_column(record: dict[str, Any]) -> str:
    return next((c for c in CHAT_COLUMNS if c in record), CHAT_COLUMNS[0])


def conversation(turns: Any, roles: list[str]) -> tuple[list[dict[str, Any]] | None, list[int], str | None]:
    """`turns` as messages for a chat template, the indices of the answering turns, and why the record cannot be
    used (None when it can)."""
    if not isinstance(turns, list) or not turns:
        what = ("has no turns" if turns is None or turns == []
                else f"is of type {type(turns).__name__}, not a list of turns")
        return None, [], what
    messages = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None, [], f"turn {n} is of type {type(turn).__name__}, not an object with a role and a content"
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not role:
            return None, [], f"turn {n} has no role (`role` or ShareGPT's `from`)"
        if content is None:
            return None, [], f"turn {n} ({role}) has no content (null)"
        if is_number(content):
            content = number_text(content)
        if not isinstance(content, (str, list)):
            return None, [], f"turn {n} ({role}): content is of type {type(content).__name__}, not text"
        extra = {k: v for k, v in turn.items() if v is not None and k not in ("role", "content", "from", "value")}
        messages.append({**extra, "role": ROLE_ALIASES.get(role, role), "content": content})
    present = {m["role"] for m in messages}
    answering = set(roles)
    if roles == ["assistant"] and "assistant" not in present:
        aliases = present.intersection(ANSWER_ALIASES)
        if len(aliases) > 1:
            return None, [], (f"answering role is ambiguous: {', '.join(sorted(aliases))} (FT_ANSWER_ROLES=assistant "
                              f"takes one of {', '.join(ANSWER_ALIASES)}; name the answering role in FT_ANSWER_ROLES)")
        answering = aliases
    answers = [n for n, m in enumerate(messages) if m["role"] in answering]
    if not answers:
        return None, [], (f"no answering turn: roles {', '.join(sorted(present))}, none of them in "
                          f"FT_ANSWER_ROLES={','.join(roles)}")
    for n in answers:
        content = messages[n]["content"]
        if isinstance(content, str) and not content.strip():
            return None, [], f"turn {n} ({messages[n]['role']}) is an empty answer"
        messages[n]["role"] = "assistant"
    return messages, answers, None


def _text(record: dict[str, Any], field: str, optional: bool = False) -> str | None:
    value = record.get(field)
    if value is None:
        return None if optional else f"`{field}` is null"
    if not isinstance(value, str):
        return f"`{field}` is of type {type(value).__name__}, not text"
    if not optional and not value.strip():
        return f"`{field}` is empty"
    return None


def problem(record: dict[str, Any], fmt: str, text_field: str) -> str | None:
    """Why `record` cannot be used in format `fmt` (chat records are checked by `conversation`), or None."""
    if fmt == "text":
        return _text(record, text_field)
    if fmt == "alpaca":
        return _text(record, "instruction") or _text(record, "input", optional=True) or _text(record, "output")
    if fmt == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                return "`prompt` and `completion` must both be text or both be lists of turns"
            return None  # conversational: checked as a conversation
        return _text(record, "prompt") or _text(record, "completion")
    if fmt == "tokens":
        ids, labels = record.get("input_ids"), record.get("labels")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            return "`input_ids` is not a non-empty list of token ids"
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(ids)):
            return f"`labels` is not a list as long as `input_ids` ({len(ids)})"
    return None
