"""The exact bytes behind token ids, and a text's tokens as byte spans: what lets a student with
its own tokenizer learn from targets stored over the teacher's tokens.

Teacher side (`TokenBytes`): a dataset stores token ids, and cross-tokenizer losses need the
window's text and where each teacher token sits in it. Character offsets are no use (a byte-level
token can end inside a UTF-8 character), so each id is mapped to its bytes from the tokenizer's
own alphabet: byte-level BPE (GPT-2, Llama 3, Qwen: one printable character per byte) and
SentencePiece-style vocabularies (Llama 2, Mistral, Gemma: "▁" for a space, "<0xNN>" for a byte
that has no piece). A tokenizer whose tokens do not keep their text (WordPiece drops whitespace)
is refused in one line rather than guessed at.

Student side (`student_spans`): the student tokenizes the window's text itself; its offsets (in
characters) become byte spans that tile the text (whitespace a token leaves out joins the token
before it), so any tokenizer, WordPiece too, can be a student.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from softlabels.data.errors import UserError


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (tokenizers' ByteLevel)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _kinds(spec: dict | None) -> set[str]:
    """The types inside a tokenizer.json component (a Sequence's steps included)."""
    if not spec:
        return set()
    inner = spec.get("decoders") or spec.get("pretokenizers") or spec.get("normalizers") or []
    return {spec.get("type", "")} | {k for s in inner for k in _kinds(s)}


class TokenBytes:
    """Each token id's bytes, for a tokenizer that keeps them (see the module docstring)."""

    def __init__(self, tokenizer, name: str = "the tokenizer"):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        decoders = _kinds(spec.get("decoder"))
        if "ByteLevel" in decoders:
            kind = "byte-level"
        elif {"Metaspace", "Replace", "ByteFallback"} & decoders:
            kind = "sentencepiece"
        else:
            raise UserError(
                f"{name} ({spec.get('model', {}).get('type')} model, decoder "
                f"{', '.join(sorted(decoders)) or 'none'}) does not keep each token's text "
                "exactly (WordPiece drops whitespace, for one), so targets over its tokens "
                "cannot be aligned to another tokenizer's: cross-tokenizer distillation needs a "
                "byte-level BPE or SentencePiece-style teacher tokenizer")
        self.kind = kind
        # Special tokens (BOS, EOS, chat markers, padding) are structure, not text: no bytes, so
        # another tokenizer never spells "<|endoftext|>" character by character and bits per
        # byte count only text; `structure` marks them (the cross path cuts windows there).
        # Added tokens that are not special (words, code indents) are text like any other.
        added = tokenizer.added_tokens_decoder
        special = {i for i, t in added.items() if t.special} | set(tokenizer.all_special_ids)
        self.structure = np.zeros(len(tokenizer), bool)
        self.structure[[i for i in special if i < len(tokenizer)]] = True
        self.eos, self.bos = tokenizer.eos_token_id, tokenizer.bos_token_id
        alphabet = _byte_alphabet()
        table: list[bytes] = [b""] * len(tokenizer)
        for piece, i in tokenizer.get_vocab().items():
            if i in special:
                continue
            if i in added:
                table[i] = added[i].content.encode()
            elif kind == "byte-level":
                try:
                    table[i] = bytes(alphabet[c] for c in piece)
                except KeyError:  # a piece outside the alphabet: its text as it is
                    table[i] = piece.encode()
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table[i] = bytes([int(piece[3:5], 16)])  # byte fallback
            else:
                table[i] = piece.replace("▁", " ").encode()
        self.table = table
        self.lengths = np.array([len(b) for b in table], np.int64)
        # SentencePiece-style tokenizers put a space before a text's first word ("▁In"), which
        # is no byte of the text: a record's first window drops it
        first = tokenizer("a", add_special_tokens=False).input_ids
        self.prefix_space = bool(first) and table[first[0]].startswith(b" ")

    def student_id(self, t: int, student_tok) -> int | None:
        """The student's own token for the teacher's special token `t`: EOS for EOS, BOS for
        BOS where the student has one; None for the rest (chat markers, padding), dropped."""
        if t == self.eos:
            return student_tok.eos_token_id
        if t == self.bos:
            return student_tok.bos_token_id
        return None

    def window(self, ids, starts_record: bool) -> tuple[bytes, np.ndarray]:
        """A window's bytes and its tokens' byte offsets: (text, (T + 1,) offsets), token t
        being text[offsets[t]:offsets[t + 1]]."""
        ids = np.asarray(ids, np.int64)
        lengths = self.lengths[ids].copy()
        text = b"".join(self.table[i] for i in ids.tolist())
        if (starts_record and self.prefix_space and self.kind == "sentencepiece" and len(ids)
                and text.startswith(b" ")):
            text, lengths[0] = text[1:], lengths[0] - 1
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return text, offsets


def whole_characters(text: bytes) -> tuple[int, int]:
    """[lo, hi) of `text` without the partial UTF-8 characters a window may begin or end with
    (its cut can fall inside a character: the teacher's byte-level tokens split them)."""
    lo = 0
    while lo < len(text) and lo < 3 and (text[lo] & 0xC0) == 0x80:
        lo += 1  # continuation bytes of a character begun before the window
    hi = len(text)
    for back in range(1, min(4, hi - lo) + 1):  # a lead byte whose character is cut
        b = text[hi - back]
        if (b & 0xC0) == 0x80:
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
        if need > back:
            hi -= back
        break
    return lo, hi


def student_spans(tokenizer, text: bytes) -> tuple[list[int], np.ndarray]:
    """The student's tokens of the window's text and their byte spans: (ids, (S + 1,) offsets)
    tiling the whole characters of `text` (whitespace a token leaves out joins the token before
    it; the first token starts where the text does). Bytes that are not UTF-8 are replaced
    (U+FFFD) only in what the student sees; the offsets still refer to `text`."""
    lo, hi = whole_characters(text)
    s = text[lo:hi].decode("utf-8", errors="replace")
    enc = tokenizer(s, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # characters -> bytes: where each character starts in `text`
    char_at = np.zeros(len(s) + 1, np.int64)
    np.cumsum([len(c.encode("utf-8", errors="replace")) for c in s], out=char_at[1:])
    char_at += lo
    starts = [int(char_at[a]) for a, _ in enc["offset_mapping"]]
    keep = [i for i in range(len(ids)) if i == 0 or starts[i] > starts[i - 1]]  # zero-width
    ids, starts = [ids[i] for i in keep], [starts[i] for i in keep]
    if starts:
        starts[0] = lo
    return ids, np.array(starts + [hi], np.int64)


def chunks(t_offsets: np.ndarray, s_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """Chunks between the bytes where both tokenizations have a token boundary, over the span
    the student covers. -> ((C + 1,) chunk boundaries, (T,) each teacher token's chunk,
    (S,) each student token's chunk); -1 for a token in no chunk (outside the common span)."""
    lo, hi = s_offsets[0], s_offsets[-1]
    common = np.intersect1d(t_offsets, s_offsets)
    common = common[(common >= lo) & (common <= hi)]
    if len(common) < 2:
        return common, np.full(len(t_offsets) - 1, -1), np.full(len(s_offsets) - 1, -1)

    def which(offsets: np.ndarray) -> np.ndarray:
        a, b = offsets[:-1], offsets[1:]
        c = np.searchsorted(common, a, side="right") - 1  # the chunk the token starts in
        ok = (c >= 0) & (c < len(common) - 1)
        c = np.clip(c, 0, max(len(common) - 2, 0))
        inside = ok & (a >= common[c]) & (b <= common[np.minimum(c + 1, len(common) - 1)])
        return np.where(inside & (b > a), c, -1)

    return common, which(t_offsets), which(s_offsets)
