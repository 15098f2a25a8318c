"""Input records -> token ids and target masks, with the teacher's tokenizer.

Three shapes of record:
- text: one text column; every position carries a target.
- prompt/response columns, or a chat `messages` column (list of {"role", "content"}): formatted
  with the tokenizer's chat template; targets only where the *next* token belongs to an assistant
  response (target_mask[t] is true iff input_ids[t+1] is a response token), the prompt is kept
  as context. Without a chat template, turns are joined as plain text: each non-assistant turn's
  content plus a newline, each assistant turn's content plus the EOS token.
- prompts alone (`--generate-responses`): the prompt tokens, ending where the teacher's response
  starts (the chat template's generation prompt, if it has one).

Pieces of a chat are tokenized one rendered segment at a time, so every token belongs to exactly
one turn and the response boundaries are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from softlabels.data.errors import UserError


@dataclass(frozen=True)
class Fields:
    """Which input columns hold what; exactly one of text / prompt(+response) / messages."""

    text: str | None = "text"
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        if self.messages:
            return (self.messages,)
        if self.prompt:
            return (self.prompt, self.response) if self.response else (self.prompt,)
        return (self.text,)

    @property
    def chat(self) -> bool:
        return bool(self.messages or self.prompt)


def to_messages(values: tuple, fields: Fields, record: int) -> list[dict]:
    if fields.messages:
        msgs = values[0]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
            for m in msgs
        ):
            raise UserError(f"record {record}: {fields.messages!r} must be a list of "
                            '{"role": ..., "content": ...} objects')
        return msgs
    for v, c in zip(values, fields.columns):
        if v is not None and not isinstance(v, str):
            raise UserError(f"record {record}: column {c!r} is not text")
    msgs = [{"role": "user", "content": values[0] or ""}]
    if len(values) > 1:
        msgs.append({"role": "assistant", "content": values[1] or ""})
    return msgs


def _segments(msgs: list[dict], tok) -> list[tuple[list[int], bool]]:
    """[(token ids, is assistant response)] covering the whole rendered chat, in order."""
    if tok.chat_template:
        out, prev = [], ""
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                head = tok.apply_chat_template(msgs[:i], add_generation_prompt=True,
                                               tokenize=False) if i else ""
                if not head.startswith(prev):
                    raise UserError("the chat template does not render turns as a growing "
                                    "prefix; cannot find response boundaries")
                out.append((tok(head[len(prev):], add_special_tokens=False).input_ids, False))
                prev = head
            full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not full.startswith(prev):
                raise UserError("the chat template does not render turns as a growing prefix; "
                                "cannot find response boundaries")
            out.append((tok(full[len(prev):], add_special_tokens=False).input_ids,
                        m["role"] == "assistant"))
            prev = full
        return out
    bos = tok("", add_special_tokens=True).input_ids  # whatever the tokenizer puts first
    out = [(bos, False)] if bos else []
    for m in msgs:
        if m["role"] == "assistant":
            out.append((tok(m["content"], add_special_tokens=False).input_ids
                        + [tok.eos_token_id], True))
        else:
            out.append((tok(m["content"] + "\n", add_special_tokens=False).input_ids, False))
    return out


def tokenize(values: tuple, fields: Fields, tok, record: int) -> tuple[list[int], list[bool]]:
    """-> (input ids, target mask). An empty record gives ([], [])."""
    if not fields.chat:
        text = values[0]
        if text is not None and not isinstance(text, str):
            raise UserError(f"record {record}: column {fields.text!r} is not text")
        if not text or not text.strip():
            return [], []
        ids = tok(text).input_ids
        return ids, [True] * len(ids)
    ids, is_resp = [], []
    for seg, resp in _segments(to_messages(values, fields, record), tok):
        ids += seg
        is_resp += [resp] * len(seg)
    if not any(is_resp):
        return [], []  # nothing to learn from: counted as empty
    return ids, is_resp[1:] + [False]


def prompt_ids(values: tuple, fields: Fields, tok, record: int) -> list[int]:
    """Token ids of a prompt for the teacher to answer (generation prompt included)."""
    msgs = to_messages(values[:1], Fields(prompt=fields.prompt, messages=fields.messages),
                       record)
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]  # answer anew
    if not any(m["content"].strip() for m in msgs):
        return []
    if tok.chat_template:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids
    return [i for seg, _ in _segments(msgs, tok) for i in seg]
