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
one turn and the response boundaries are exact. The segments come from two renders of the whole
chat (linear in turns); a template for which that cannot be shown exact falls back to rendering
every prefix of the chat (quadratic).
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
        texts = _turn_texts(msgs, tok)
        if texts is None:
            texts = _turn_texts_by_prefixes(msgs, tok)
        return [(tok(t, add_special_tokens=False).input_ids, resp) for t, resp in texts]
    bos = tok("", add_special_tokens=True).input_ids  # whatever the tokenizer puts first
    out = [(bos, False)] if bos else []
    for m in msgs:
        if m["role"] == "assistant":
            out.append((tok(m["content"], add_special_tokens=False).input_ids
                        + [tok.eos_token_id], True))
        else:
            out.append((tok(m["content"] + "\n", add_special_tokens=False).input_ids, False))
    return out


def _turn_texts_by_prefixes(msgs: list[dict], tok) -> list[tuple[str, bool]]:
    """The rendered chat cut at turn boundaries, found by rendering every prefix of the chat
    (with and without the generation prompt): exact for any template that renders turns as a
    growing prefix, but quadratic in the number of turns."""
    out, prev = [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            head = tok.apply_chat_template(msgs[:i], add_generation_prompt=True,
                                           tokenize=False) if i else ""
            if not head.startswith(prev):
                raise UserError("the chat template does not render turns as a growing "
                                "prefix; cannot find response boundaries")
            out.append((head[len(prev):], False))
            prev = head
        full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not full.startswith(prev):
            raise UserError("the chat template does not render turns as a growing prefix; "
                            "cannot find response boundaries")
        out.append((full[len(prev):], m["role"] == "assistant"))
        prev = full
    return out


_MARK = "\ue000softlabels-{}\ue000"  # a content stand-in: private-use text, no whitespace
_PARTS: dict[str, tuple[dict[str, str], str] | None] = {}  # by chat template


def _turn_texts(msgs: list[dict], tok) -> list[tuple[str, bool]] | None:
    """What _turn_texts_by_prefixes returns, from two renders of the whole chat: linear in turns.

    The chat is rendered once with each content replaced by a marker, so the template's own text
    around each content is known; a turn ends after its content and the template's end-of-turn
    text for its role, and an assistant turn starts after the generation prompt (both learnt once
    per tokenizer from one-message chats, see _template_parts). The real render must equal the
    markers put back. None if any of that does not hold (a template that trims or rewrites
    contents, or renders turns differently by position): the caller falls back to prefixes."""
    parts = _template_parts(tok)
    if parts is None:
        return None
    ends, gen = parts
    marks = [_MARK.format(i) for i in range(len(msgs))]
    try:
        marked = tok.apply_chat_template([{**m, "content": k} for m, k in zip(msgs, marks)],
                                         tokenize=False)
        real = tok.apply_chat_template(msgs, tokenize=False)
    except Exception:
        return None
    between, at = [], 0  # the template's text before each content, and after the last
    for k in marks:
        i = marked.find(k, at)
        if i < 0:
            return None
        between.append(marked[at:i])
        at = i + len(k)
    between.append(marked[at:])
    if "".join(b + m["content"] for b, m in zip(between, msgs)) + between[-1] != real:
        return None
    out, carry = [], between[0]  # carry: template text of the turn that starts next
    for j, m in enumerate(msgs):
        end = ends.get(m["role"])
        after = between[j + 1]
        if end is None or not after.startswith(end):
            return None
        if m["role"] == "assistant" and j:  # the generation prompt is context, not response
            if carry != gen:
                return None
            out += [(gen, False), (m["content"] + end, True)]
        else:
            out.append((carry + m["content"] + end, m["role"] == "assistant"))
        carry = after[len(end):]
    return None if carry else out


def _template_parts(tok) -> tuple[dict[str, str], str] | None:
    """(end-of-turn text per role, generation prompt) of the tokenizer's chat template, learnt
    from one-message chats; cached per template. None if the template refuses them."""
    if tok.chat_template in _PARTS:
        return _PARTS[tok.chat_template]
    k0, k1 = _MARK.format(0), _MARK.format(1)
    ends = {}
    for role, chat in [("system", [{"role": "system", "content": k0}]),
                       ("user", [{"role": "user", "content": k0}]),
                       ("assistant", [{"role": "user", "content": k0},
                                      {"role": "assistant", "content": k1}])]:
        try:  # some templates refuse some chats (a lone system turn): that role falls back
            text = tok.apply_chat_template(chat, tokenize=False)
            ends[role] = text[text.index(chat[-1]["content"]) + len(k0):]
        except Exception:
            continue
    parts = None
    try:
        one = [{"role": "user", "content": k0}]
        plain = tok.apply_chat_template(one, tokenize=False)
        with_gen = tok.apply_chat_template(one, add_generation_prompt=True, tokenize=False)
        if with_gen.startswith(plain):
            parts = (ends, with_gen[len(plain):])
    except Exception:
        parts = None
    _PARTS[tok.chat_template] = parts
    return parts


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
