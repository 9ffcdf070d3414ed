"""A conversation to token ids with the trained span of every answer, right for any chat template.

The trained span of an answer is found in the rendering of the whole conversation, never by assuming that a
template renders a prefix of the conversation the way it renders the whole (Qwen3 renders its last answer with a
`<think>` block that earlier ones lack; other templates trim, re-order or drop text):
- a template with `{% generation %}` markers says itself which tokens are answers (transformers'
  `return_assistant_tokens_mask`);
- otherwise each answer's content alone is replaced by a sentinel, a string found nowhere in the conversation: the
  rendering's text before the sentinel and after it must begin and end the whole rendering, and what lies between
  them there is the answer as the template renders it (maybe trimmed), its characters mapped to the tokens of the
  whole rendering (tokenized once). (Emptying the answer and comparing the texts from both ends would leave the
  `<` of an answer `<b>bold</b>` untrained, taken for the `<` of the `<|im_end|>` that follows an emptied answer,
  and train template text where a template skips empty messages.) Two sentinels are rendered per answer, and the
  record is refused when either is not found exactly once or the whole rendering does not read so.
Each answer is then closed by the token that ends it: EOS, or the template's end-of-turn token that follows it
(`<|im_end|>`, `<end_of_turn>`, `<|end|>`, `<|eot_id|>`...), trained with it. A template that closes answers with
no such token gets EOS inserted after each answer, so that the model learns where an answer stops.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import Any

from job.errors import InputError

# Whether a special token ends a turn, read from its text: EOS always; else `<|im_end|>`, `<end_of_turn>`,
# `<|end|>`, `<|eot_id|>`, `<|eom_id|>`, `<|END_OF_TURN_TOKEN|>`, `<|endoftext|>`, `<｜end▁of▁sentence｜>`,
# `<|return|>`.
END_OF_TURN = re.compile(r"end|eot|eom|eos|return", re.IGNORECASE)
NOT_END_OF_TURN = re.compile(r"header|start|begin", re.IGNORECASE)  # Llama-3's <|end_header_id|> opens content
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
WHITESPACE_LOOKAHEAD = 3  # tokens of template whitespace allowed between an answer and its end token


class MaskingError(InputError):
    """The trained span of an answer cannot be established: the record is not trained rather than trained on its
    prompts too."""


class ChatMasker:
    """Token ids of a conversation and the (start, end) token spans to train, for one tokenizer's chat template."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        self.uses_markers = bool(GENERATION_MARKER.search(template))
        specials = {i for i in tokenizer.all_special_ids if i is not None}
        specials |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        names = {i: tokenizer.convert_ids_to_tokens(i) or "" for i in specials}
        self.end_ids = {i for i, name in names.items() if END_OF_TURN.search(name) and not NOT_END_OF_TURN.search(name)}
        self.end_ids.add(self.eos)
        self.eos_inserted = False  # set once a template closed an answer without an end token

    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        """The whole conversation as token ids, as the chat template renders it (no generation prompt)."""
        return list(self.tok.apply_chat_template(messages, tokenize=True, return_dict=False))

    def pieces(self, messages: list[dict[str, Any]], answers: list[int]) -> list[tuple[list[int], bool]]:
        """The conversation as (token ids, trained) pieces: each answer in `answers` (message indices) with its end
        token trained, everything else not. Raises MaskingError when an answer cannot be found in the rendering;
        template and tokenizer exceptions pass through to the caller."""
        ids, spans = self._marked_spans(messages, answers) if self.uses_markers else (None, None)
        if spans is None:
            ids, spans = self._stand_in_spans(messages, answers)
        if not spans or any(a >= b for a, b in spans) or any(b > c for (_, b), (c, _) in zip(spans, spans[1:])):
            raise MaskingError(
                f"cannot tell which tokens of the chat template's rendering are the answers (turns {answers} gave "
                f"token spans {spans}); FT_COMPLETION_ONLY_LOSS=false trains on every token instead"
            )
        pieces, done = [], 0
        for start, end in spans:
            pieces.append((ids[done:start], False))
            closed = self._close(ids, start, end)
            if closed is None:  # no end token after this answer: insert EOS so that stopping is learned
                self.eos_inserted = True
                pieces.append(([*ids[start:end], self.eos], True))
                done = end
            else:
                pieces.append((ids[start:closed], True))
                done = closed
        pieces.append((ids[done:], False))
        return [(piece, train) for piece, train in pieces if piece]

    def _stand_in_spans(self, messages: list[dict[str, Any]], answers: list[int]):
        """Token ids and the token span of each answer: the text that a sentinel standing in for that answer's
        content takes the place of in the rendering (`_answer_chars`), as the tokens that overlap it; (0, 0) for
        an answer it cannot be established for. The stand-in renderings are text only, so the conversation is
        tokenized once; a tokenizer without character offsets compares token lists."""
        text = self.tok.apply_chat_template(messages, tokenize=False)
        sentinels = _sentinels(text + repr(messages))
        fast = getattr(self.tok, "is_fast", False)
        if fast:
            encoding = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
            starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
        else:
            ids = self.render(messages)
        spans = []
        for i in answers:
            found = []
            for sentinel in sentinels:
                stand_in = _replaced(messages, i, sentinel)
                chars = _answer_chars(text, self.tok.apply_chat_template(stand_in, tokenize=False), sentinel)
                if chars is None:
                    break
                found.append(chars if fast else _changed(ids, self.render(stand_in)))
            if len(found) < len(sentinels):
                spans.append((0, 0))
                continue
            # Both stand-ins' spans, joined: a template may render text next to an answer that depends on it.
            first, last = min(a for a, _ in found), max(b for _, b in found)
            if fast:  # the tokens overlapping the answer's characters; none when it is rendered as nothing
                first, last = (bisect_right(ends, first), bisect_left(starts, last)) if first < last else (0, 0)
            spans.append((first, last))
        return ids, spans

    def _marked_spans(self, messages: list[dict[str, Any]], answers: list[int]):
        """Token ids and the spans of `answers` as the template's generation markers give them; no spans (None)
        when the marked spans are not one per assistant turn, so that the caller compares renderings instead."""
        out = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        spans, start = [], None
        for k, flag in enumerate([*mask, 0]):
            if flag and start is None:
                start = k
            elif not flag and start is not None:
                spans.append((start, k))
                start = None
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(spans) != len(turns):
            return ids, None
        return ids, [spans[turns.index(i)] for i in answers]

    def _close(self, ids: list[int], start: int, end: int) -> int | None:
        """The index just past the end token of the answer ids[start:end]: `end` when the answer ends with one
        (whitespace after it included), else the first end token after at most a few tokens of whitespace; None
        when there is none."""
        last = end - 1
        while last > start and self._blank(ids[last]):
            last -= 1
        if ids[last] in self.end_ids:
            return end
        for k in range(end, min(end + WHITESPACE_LOOKAHEAD + 1, len(ids))):
            if ids[k] in self.end_ids:
                return k + 1
            if not self._blank(ids[k]):
                return None
        return None

    def _blank(self, token: int) -> bool:
        return token not in self.end_ids and not self.tok.decode([token]).strip()


def _sentinels(seen: str) -> tuple[str, str]:
    """Two stand-ins for an answer's content that occur nowhere in `seen` (the conversation and its rendering):
    letters and digits, which templates neither trim nor escape, the two differing in their first and last
    characters, so that a token list compared from both ends cannot take an answer's first or last token for a
    stand-in's with both."""
    n = 0
    while True:
        pair = (f"ZQsentinel{n}QZ", f"97sentinel{n}79")
        if not any(s in seen for s in pair):
            return pair
        n += 1


def _replaced(messages: list[dict[str, Any]], i: int, content: str) -> list[dict[str, Any]]:
    return [*messages[:i], {**messages[i], "content": content}, *messages[i + 1:]]


def _answer_chars(text: str, rendered: str, sentinel: str) -> tuple[int, int] | None:
    """The span [start, end) of `text` (the whole rendering) that the answer is rendered as: `rendered` is the
    rendering with `sentinel` in place of that answer's content, and `text` must read as what precedes the
    sentinel there, then the answer as the template renders it (maybe trimmed), then what follows it. None when
    the sentinel is not rendered exactly once or `text` does not read so."""
    if rendered.count(sentinel) != 1:
        return None
    prefix, suffix = rendered.split(sentinel)
    if len(prefix) + len(suffix) > len(text) or not (text.startswith(prefix) and text.endswith(suffix)):
        return None
    return len(prefix), len(text) - len(suffix)


def _changed(a, b) -> tuple[int, int]:
    """The span [start, end) of sequence `a` (token ids) that differs from `b`: what is left of `a` once their
    common beginning and common end are taken away."""
    limit = min(len(a), len(b))
    prefix = 0
    while prefix < limit and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return prefix, len(a) - suffix
