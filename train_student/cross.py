"""Distillation into a student with its own tokenizer, from targets stored over the teacher's.

Each window's text is rebuilt from the teacher's token bytes (tokenbytes.py) and tokenized by the
student; both tokenizations are cut into *chunks*, the spans between bytes where both have a token
boundary. Two losses, either or both (`cross_loss`), beside CE on the student's own tokens:

- "dist" (the default below ALM_FROM student tokens per teacher token): at every student
  position the teacher's stored next-token targets (top-k and tail, or draws) are a
  distribution over teacher token *strings*; those the student would have cut as it did so
  far (`Trie`) are carried onto the student token they continue with, masses that meet
  summed, and the student's softmax is trained on it by forward KL with a tail bucket. The
  token the text holds joins with its exact label log-prob (format 4). It needs a byte-exact
  student tokenizer.
- ALM, approximate likelihood matching (Minixhofer et al. 2025; tokenkit's losses.py): the
  teacher's log-likelihood of a chunk is the sum of its stored log-probs of the chunk's tokens
  (the "main path"), the student's likewise; the two are compared as Bernoulli probabilities,
  exp(logp / tau), tau = 100, by binary KL, times tau. It needs one number per teacher
  position, whatever k, and any student tokenizer. Near agreement the binary KL is
  ~ (t - s)^2 / (2 tau |s|): times tau, the chunk term is on a log-likelihood's scale, as CE
  and dist are (unscaled, "ALM + 0.5 CE" trained like CE at half the rate).

Measured (BENCHMARKS.md, "Students with their own tokenizer" and "... much finer tokens"): where
the student's tokens are about as coarse as the teacher's, dist + 0.5 CE recovers most of the
same-tokenizer gain and ALM adds nothing; where they are ~4 times finer (a word's spelling is
most of what the student still has to learn), ALM + 0.5 CE gains several times what dist does:
`auto` picks by the ratio it counts in the data's first rows.

A chunk counts only where every teacher token in it has a stored log-prob (its position has a
target: response-only masks carry over by byte span) and neither side starts it with its
window's first token (which nothing predicts). CE covers the student tokens of counted chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from softlabels.data.format import Row
from softlabels.data.heads import PLAIN_HEAD, LogitTransform
from softlabels.train_student.batches import targets_of
from softlabels.train_student.losses import (
    NEG,
    HeadGradientInForward,
    buckets_of,
    divergence,
    head_logits,
    log1mexp,
    softmax_,
    teacher_buckets,
    through_head,
)
from softlabels.train_student.tokenbytes import TokenBytes, chunks, student_spans

ALM_TAU = 100.0  # tokenkit's binarisation temperature


class Trie:
    """The teacher's vocabulary seen from the student's tokenizer, for targets at any student
    position. Each teacher token's bytes are cut as the student cuts them on their own
    (`segment`); then `path[t, c]` names what the student has emitted of t by byte c (its bytes
    and where its tokens start; -1 where c is no start of a student token of t), and `next[t, c]`
    is the student token that starts there (-1 at t's end: the next teacher token decides).

    Conditioning on the student's tokens, not only on the bytes, matters: a Unigram student
    cuts " ab" as "▁" + "a" + "b" but " lb" as "▁l" + "b", so after "▁" only words it would
    have begun with "▁" alone can follow."""

    def __init__(self, teacher: TokenBytes, student: TokenBytes, student_tok):
        backend = student_tok.backend_tokenizer
        width = int(teacher.lengths.max(initial=0)) + 1
        self.path = np.full((len(teacher.table), width), -1, np.int64)
        self.next = np.full((len(teacher.table), width), -1, np.int64)
        self.names: dict[tuple, int] = {}
        for t, b in enumerate(teacher.table):
            if teacher.structure[t]:  # EOS predicted: the student's EOS, with its mass
                self.path[t, 0] = self.names.setdefault((b"", ()), len(self.names))
                mapped = teacher.student_id(t, student_tok)
                self.next[t, 0] = -1 if mapped is None else mapped
                continue
            ids = segment(b, student, backend)
            if ids is None:
                continue
            starts = np.cumsum([0] + [len(student.table[i]) for i in ids])
            for n, c in enumerate(starts.tolist()):
                key = (b[:c], tuple(starts[1:n + 1].tolist()))
                self.path[t, c] = self.names.setdefault(key, len(self.names))
                self.next[t, c] = ids[n] if n < len(ids) else -1

    def key(self, text: bytes, starts) -> int:
        """The path id of the student's tokens `starts` (byte offsets in `text`, after 0)
        having emitted `text`; -2 if no teacher token has that path."""
        return self.names.get((text, tuple(starts)), -2)


def segment(b: bytes, student: TokenBytes, backend) -> list[int] | None:
    """The student's tokens of the text `b` on its own (its pre-tokenizer's pieces, its model on
    each), or None where they do not spell `b` exactly (no whole UTF-8 text, unknown pieces)."""
    import re

    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if student.kind == "sentencepiece":  # pieces start at each "▁" (no prefix space here)
        pieces = re.findall("▁?[^▁]+|▁", text.replace(" ", "▁"))
    elif backend.pre_tokenizer is not None:
        pieces = [x for x, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        if student.prefix_space and pieces and not text.startswith(" ") and \
                pieces[0].startswith("Ġ"):
            pieces[0] = pieces[0][1:]  # a prefix space the pre-tokenizer adds at a start
    else:
        pieces = [text]
    ids = [t.id for x in pieces if x for t in backend.model.tokenize(x)]
    return ids if b"".join(student.table[i] for i in ids) == b else None


@dataclass
class CrossTeacher:
    """One dataset's teacher tokenizer as the student side needs it."""

    tokens: TokenBytes
    trie: Trie | None  # None: ALM only (the student's tokenizer does not keep its bytes)


@dataclass
class CrossBatch:
    input_ids: torch.Tensor  # (B, L) student ids, right-padded
    attention_mask: torch.Tensor  # (B, L)
    pos: torch.Tensor  # (N,) flat positions predicting a student token of a counted chunk
    labels: torch.Tensor  # (N,) that token
    chunk: torch.Tensor  # (N,) its chunk, into t_chunk
    t_chunk: torch.Tensor  # (C,) the teacher's log-likelihood of each chunk
    d_pos: torch.Tensor  # (M,) flat positions at chunk starts (the dist term)
    d_ids: torch.Tensor  # (M, W) projected student ids, -1: none
    d_lp: torch.Tensor  # (M, W) their teacher log-probs
    d_rest: torch.Tensor  # (M,) log of the teacher's mass on no id of d_ids
    n_bytes: torch.Tensor  # () bytes of the student target tokens (bits per byte)

    def to(self, device) -> CrossBatch:
        return CrossBatch(**{k: v.to(device) for k, v in vars(self).items()})

    @property
    def counts(self) -> tuple[int, int, int]:
        """(student target tokens, chunks, chunk starts)."""
        return len(self.pos), len(self.t_chunk), len(self.d_pos)


def _row(r: Row, teacher: CrossTeacher, tok, targets: str, dist: bool):
    """One window -> student ids and its part of the batch (positions in the row).

    The teacher's special tokens cut the window into runs of text, each aligned on its own;
    between them the student gets its own EOS (BOS) for the teacher's, and nothing for other
    markers. Positions predicting a special token, or predicted from one, carry no target."""
    cuts = np.flatnonzero(teacher.tokens.structure[np.asarray(r.input_ids, np.int64)])
    if not len(cuts):
        return _text_row(r, teacher, tok, targets, dist, r.window == 0)
    ids: list[int] = []
    none = np.zeros(0, np.int64)
    out = {"pos": [none], "labels": [none], "chunk": [none], "t_chunk": [np.zeros(0)],
           "bytes": 0}
    a = 0
    for c in [*cuts.tolist(), len(r.input_ids)]:
        if c > a:
            p = _text_row(_cut(r, a, c), teacher, tok, targets, dist, a > 0 or r.window == 0)
            o, n_chunks = len(ids), sum(len(x) for x in out["t_chunk"])
            ids += list(p["ids"])
            out["pos"].append(p["pos"] + o)
            out["labels"].append(p["labels"])
            out["chunk"].append(p["chunk"] + n_chunks)
            out["t_chunk"].append(p["t_chunk"])
            out["bytes"] += p["bytes"]
            if "d_pos" in p:
                for key, v in (("d_pos", p["d_pos"] + o), ("d_ids", p["d_ids"]),
                               ("d_lp", p["d_lp"]), ("d_rest", p["d_rest"])):
                    out.setdefault(key, []).append(v)
        if c < len(r.input_ids):
            mapped = teacher.tokens.student_id(int(r.input_ids[c]), tok)
            if mapped is not None:
                ids.append(mapped)
        a = c + 1
    merged = {k: np.concatenate(v) if k in ("pos", "labels", "chunk", "t_chunk", "d_pos",
                                            "d_rest") else v for k, v in out.items()}
    if "d_ids" in out:
        w = max(x.shape[1] for x in out["d_ids"])
        merged["d_ids"] = np.concatenate([np.pad(x, ((0, 0), (0, w - x.shape[1])),
                                                 constant_values=-1) for x in out["d_ids"]])
        merged["d_lp"] = np.concatenate([np.pad(x, ((0, 0), (0, w - x.shape[1])),
                                                constant_values=NEG) for x in out["d_lp"]])
    merged["ids"] = ids
    return merged


def _cut(r: Row, a: int, b: int) -> Row:
    """Positions [a, b) of a row, as a row of their own."""
    from dataclasses import replace

    def part(x):
        return None if x is None else x[a:b]

    return replace(r, input_ids=r.input_ids[a:b], topk_ids=part(r.topk_ids),
                   topk_logprobs=part(r.topk_logprobs), target_mask=r.target_mask[a:b],
                   sample_ids=part(r.sample_ids), sample_counts=part(r.sample_counts),
                   tail_logprob=part(r.tail_logprob), label_logprob=part(r.label_logprob))


def _text_row(r: Row, teacher: CrossTeacher, tok, targets: str, dist: bool,
              starts_text: bool):
    """A window of text only (no special token) -> the student's ids and targets."""
    text, t_off = teacher.tokens.window(r.input_ids, starts_text)
    s_ids, s_off = student_spans(tok, text)
    T, S = len(r.input_ids), len(s_ids)
    _, tch, sch = chunks(t_off, s_off)
    C = int(max(tch.max(initial=-1), sch.max(initial=-1))) + 1
    # the teacher's log-prob of token j was stored at position j - 1
    lp = np.full(T, np.nan)
    # (formats before 4 have no label log-probs: evaluation still aligns by the mask)
    lp[1:] = r.label_logprob[:-1] if r.label_logprob is not None else 0.0
    lp[1:][~r.target_mask[:-1]] = np.nan
    ok = np.ones(C, bool)
    if C:
        on = tch >= 0
        ok &= np.bincount(tch[on], np.isnan(lp[on]), C) == 0  # every token has its log-prob
        # (the window's first teacher token has none: nothing predicts it; nor the student's)
        if S and sch[0] >= 0:
            ok[sch[0]] = False
    t_chunk = np.bincount(tch[tch >= 0], np.nan_to_num(lp[tch >= 0]), C)
    keep = np.flatnonzero(ok)  # counted chunks, renumbered 0..len(keep)-1
    new = np.full(C, -1)
    new[keep] = np.arange(len(keep))
    k = np.flatnonzero((sch >= 0) & (new[np.maximum(sch, 0)] >= 0))  # student tokens counted
    k = k[k >= 1]
    out = {"ids": s_ids, "pos": k - 1, "labels": np.asarray(s_ids, np.int64)[k],
           "chunk": new[sch[k]], "t_chunk": t_chunk[keep],
           "bytes": int((s_off[k + 1] - s_off[k]).sum())}
    if dist and len(k):  # a distribution target at every counted student position
        at, d_ids, d_lp, d_rest = _trie_targets(r, targets, teacher.trie, text, t_off, s_off,
                                                k)
        out.update(d_pos=k[at] - 1, d_ids=d_ids, d_lp=d_lp, d_rest=d_rest)
    return out


def _trie_targets(r: Row, targets: str, trie: Trie, text: bytes, t_off: np.ndarray,
                  s_off: np.ndarray, k: np.ndarray):
    """Targets at the student positions predicting its tokens k (starting at bytes s_off[k]):
    the teacher's stored distribution over the teacher token j holding that byte (predicted at
    j - 1) and token j itself (its exact label log-prob), kept to the tokens the student would
    have cut as it did so far within j (Trie), carried onto the student token each continues
    with, masses that meet summed, conditioned on the kept mass. What ends exactly there, and at
    j's start the rest of the teacher's tail, go to the rest. -> (which of k have a target,
    and their (M, W) ids, (M, W) log-probs, (M,) rest)."""
    starts = s_off[k]
    j = np.searchsorted(t_off, starts, side="right") - 1
    c = starts - t_off[j]  # bytes of token j already in the text
    ok = (j >= 1) & (j < len(r.input_ids)) & r.target_mask[np.clip(j - 1, 0, None)]
    j, c, starts = j[ok], c[ok], starts[ok]
    # what the student emitted of token j so far: its bytes and the student's token starts
    lo = np.searchsorted(s_off, t_off[j], side="right")
    hi = np.searchsorted(s_off, starts, side="right")
    actual = np.array([trie.key(text[a:o], (s_off[x:y] - a).tolist())
                       for a, o, x, y in zip(t_off[j].tolist(), starts.tolist(), lo.tolist(),
                                             hi.tolist())], np.int64)
    ids, lp, rest = targets_of(r, j - 1, targets)  # (M, W) over teacher tokens, sum to 1
    # the token the text holds, with its exact mass, where the stored ids miss it: inside j the
    # tail's spelling is unknown, and without it the student's real next token would get none
    label = r.input_ids[j].astype(ids.dtype)
    label_lp = r.label_logprob[j - 1].astype(np.float64)
    add = ~(ids == label[:, None]).any(-1) & np.isfinite(label_lp)
    ids = np.concatenate([ids, np.where(add, label, -1)[:, None]], 1)
    lp = np.concatenate([lp, np.where(add, label_lp, NEG)[:, None]], 1)
    with np.errstate(divide="ignore"):  # the tail held it: what is left of the tail
        rest = np.log(np.clip(np.exp(rest.astype(np.float64))
                              - np.where(add, np.exp(label_lp), 0.0), 0.0, None))
    cand = np.maximum(ids, 0)
    same = (ids >= 0) & (trie.path[cand, c[:, None]] == actual[:, None])
    nxt = np.where(same, trie.next[cand, c[:, None]], -1)
    p = np.where(same, np.exp(lp.astype(np.float64)), 0.0)
    ended = np.where(nxt < 0, p, 0.0).sum(-1)  # consistent, but end here (or map nowhere)
    tail = np.where(c == 0, np.exp(rest.astype(np.float64)), 0.0)
    total = p.sum(-1) + tail
    live = total > 1e-6
    p, nxt, ended, tail, total = p[live], nxt[live], ended[live], tail[live], total[live]
    at = np.flatnonzero(ok)[live]
    M, W = nxt.shape
    V = int(trie.next.max()) + 2
    key = np.repeat(np.arange(M), W) * V + np.maximum(nxt, 0).ravel()
    on = (nxt >= 0).ravel()
    uniq, inv = np.unique(key[on], return_inverse=True)
    mass = np.bincount(inv, p.ravel()[on], len(uniq))
    urow = uniq // V
    slot = np.arange(len(uniq)) - np.searchsorted(urow, urow)
    width = int(slot.max()) + 1 if len(slot) else 1
    d_ids = np.full((M, width), -1, np.int64)
    d_lp = np.full((M, width), NEG, np.float32)
    d_ids[urow, slot] = uniq % V
    with np.errstate(divide="ignore"):
        d_lp[urow, slot] = np.log(mass / total[urow])
        d_rest = np.log((ended + tail) / total)
    return at, d_ids, d_lp, np.maximum(d_rest, NEG).astype(np.float32)


def collate_cross(rows: list[Row], sources, teachers: list[CrossTeacher], tok,
                  targets: list[str], dist: bool) -> CrossBatch:
    """Rows (of datasets `sources`) -> the student's batch and what the cross losses read."""
    parts = [_row(r, teachers[d], tok, targets[d], dist and teachers[d].trie is not None)
             for r, d in zip(rows, sources)]
    B, L = len(rows), max(max(len(p["ids"]) for p in parts), 1)
    input_ids = np.zeros((B, L), np.int64)
    attn = np.zeros((B, L), np.int64)
    pos, labels, chunk, t_chunk, d_pos, d_ids, d_lp, d_rest = ([] for _ in range(8))
    c0 = 0
    for b, p in enumerate(parts):
        input_ids[b, :len(p["ids"])] = p["ids"]
        attn[b, :len(p["ids"])] = 1
        pos.append(b * L + p["pos"])
        labels.append(p["labels"])
        chunk.append(p["chunk"] + c0)
        t_chunk.append(p["t_chunk"])
        c0 += len(p["t_chunk"])
        if "d_pos" in p:
            d_pos.append(b * L + p["d_pos"])
            d_ids.append(p["d_ids"])
            d_lp.append(p["d_lp"])
            d_rest.append(p["d_rest"])
    W = max([x.shape[1] for x in d_ids], default=1)

    def pad(xs, value, dtype):
        return np.concatenate([np.pad(x, ((0, 0), (0, W - x.shape[1])), constant_values=value)
                               for x in xs]).astype(dtype) if xs else np.zeros((0, W), dtype)

    def cat(xs, dtype):
        return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)

    return CrossBatch(
        input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attn),
        pos=torch.from_numpy(cat(pos, np.int64)), labels=torch.from_numpy(cat(labels, np.int64)),
        chunk=torch.from_numpy(cat(chunk, np.int64)),
        t_chunk=torch.from_numpy(cat(t_chunk, np.float32)),
        d_pos=torch.from_numpy(cat(d_pos, np.int64)), d_ids=torch.from_numpy(pad(d_ids, -1,
                                                                                 np.int64)),
        d_lp=torch.from_numpy(pad(d_lp, NEG, np.float32)),
        d_rest=torch.from_numpy(cat(d_rest, np.float32)),
        n_bytes=torch.tensor(sum(p["bytes"] for p in parts)))


def binary_kl(t: torch.Tensor, s: torch.Tensor, tau: float = ALM_TAU) -> torch.Tensor:
    """KL between Bernoulli(exp(t / tau)) and Bernoulli(exp(s / tau)), per chunk: ALM's binary
    CE less the teacher's entropy (the same gradient; 0 where the two agree). The loss takes it
    times tau (the module's docstring says why)."""
    a = (t / tau).clamp(max=-1e-6)
    b = (s / tau).clamp(max=-1e-6)
    return torch.exp(a) * (a - b) + (-torch.expm1(a)) * (log1mexp(a) - log1mexp(b))


def _label_lps(h, weight, bias, labels, transform):
    return torch.log_softmax(head_logits(h, weight, bias, transform), -1).gather(
        -1, labels[:, None])[:, 0]


def label_logprobs(h: torch.Tensor, head, labels: torch.Tensor, chunk: int = 1024,
                   transform: LogitTransform = PLAIN_HEAD) -> torch.Tensor:
    """(N, H) hidden states -> (N,) the student's log-prob of each label, a chunk of positions
    at a time (recomputed in the backward pass), never (N, V) logits at once."""
    out = []
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], head.weight, head.bias, labels[s:s + chunk], transform)
        out.append(checkpoint(_label_lps, *args, use_reentrant=False)
                   if torch.is_grad_enabled() else _label_lps(*args))
    return torch.cat(out) if out else h.new_zeros(0)


def _terms(lse, at_ids, at_label, chunk, t_chunk, ids, lp, rest) -> torch.Tensor:
    """[ALM, dist, CE] of n positions from the few numbers they depend on: the student's
    log-normaliser (n, 1), logits at the projected ids (n, W) and at the label (n, 1). `chunk`
    numbers each position's chunk within `t_chunk` (every chunk's positions are here); rows of
    `ids` all -1 with `rest` NEG have no dist target and add nothing."""
    lq = (at_label - lse)[:, 0]
    s_chunk = torch.zeros(len(t_chunk), device=lq.device, dtype=lq.dtype).index_add(0, chunk, lq)
    alm = ALM_TAU * binary_kl(t_chunk.to(lq.dtype), s_chunk).sum()
    dist = divergence(teacher_buckets(lp.masked_fill(ids < 0, NEG), rest),
                      buckets_of(at_ids, lse, None, ids), "forward_kl", 0.5).sum()
    return torch.stack([alm, dist, -lq.sum()])


def _part_gradient(raw, coef, transform, *targets):
    """One chunk's [ALM, dist, CE] and the gradient of coef . them with respect to its raw head
    outputs, from its softmax in place (losses._chunk_gradient's way: autograd on `_terms`'
    inputs only)."""
    labels, ids = targets[0], targets[3]

    def gradient_of(logits):
        lab = labels[:, None]
        at_ids, at_label = logits.gather(-1, ids.clamp(min=0)), logits.gather(-1, lab)
        q, lse = softmax_(logits)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (lse, at_ids, at_label)]
            sums = _terms(*leaves, *targets[1:])
            d_lse, d_ids, d_label = (torch.zeros_like(v) if g is None else g for v, g in zip(
                leaves, torch.autograd.grad((coef * sums).sum(), leaves, allow_unused=True)))
        g = q.mul_(d_lse)
        g.scatter_add_(-1, ids.clamp(min=0), d_ids)
        g.scatter_add_(-1, lab, d_label)
        return sums.detach(), g

    return through_head(raw, transform, gradient_of)


def _part_sums(h, weight, bias, transform, labels, *targets):
    logits = head_logits(h, weight, bias, transform)
    return _terms(torch.logsumexp(logits, -1, keepdim=True),
                  logits.gather(-1, targets[2].clamp(min=0)), logits.gather(-1, labels[:, None]),
                  *targets)


def _bounds(chunk: torch.Tensor, size: int) -> list[int]:
    """Edges of head chunks of about `size` positions that never split an alignment chunk (ALM
    compares whole chunks), so each head chunk's losses are its own."""
    c = chunk.cpu().numpy()
    starts = np.flatnonzero(np.diff(c)) + 1  # where a new alignment chunk begins
    out = [0]
    while out[-1] < len(c):
        i = np.searchsorted(starts, out[-1] + size)
        out.append(int(starts[i]) if i < len(starts) else len(c))
    return out if len(out) > 1 else [0, 0]


def cross_sums(h: torch.Tensor, batch: CrossBatch, head, chunk: int = 1024,
               transform: LogitTransform = PLAIN_HEAD, coef: torch.Tensor | None = None
               ) -> torch.Tensor:
    """(B, L, H) student hidden states -> [ALM sum over chunks, dist KL sum over chunk starts,
    CE sum over student target tokens], from one pass of the head over the student's target
    positions. `coef` (3,): what the step's loss multiplies the sums by (Cross.coefficients);
    given, each head chunk's gradient is built in the forward pass (losses.HeadGradientInForward),
    else each chunk is recomputed in the backward pass. Zeros that still run through the graph
    where a batch has no target (so backward and DDP's all-reduce happen on every process)."""
    h = h.reshape(-1, h.shape[-1])
    zero = head_logits(h[:1], head.weight, head.bias, transform).sum() * 0.0
    N, W = len(batch.pos), batch.d_ids.shape[1]
    # the dist targets onto the positions (every chunk start is a target position)
    at = torch.searchsorted(batch.pos, batch.d_pos)
    ids = torch.full((N, W), -1, dtype=batch.d_ids.dtype, device=h.device).index_copy(
        0, at, batch.d_ids)
    lp = torch.full((N, W), NEG, dtype=batch.d_lp.dtype, device=h.device).index_copy(
        0, at, batch.d_lp)
    rest = torch.full((N,), NEG, dtype=batch.d_rest.dtype, device=h.device).index_copy(
        0, at, batch.d_rest)
    bounds = _bounds(batch.chunk, chunk)
    C = len(batch.t_chunk)

    def targets(s, e):  # positions [s, e): labels, chunks renumbered from 0, their t_chunk, ...
        c0 = int(batch.chunk[s]) if 0 < s < N else 0  # (the first part: from chunk 0)
        c1 = int(batch.chunk[e]) if e < N else C
        return (batch.labels[s:e], batch.chunk[s:e] - c0, batch.t_chunk[c0:c1], ids[s:e],
                lp[s:e], rest[s:e])

    hp = h[batch.pos]
    if coef is not None and torch.is_grad_enabled() and (hp.requires_grad or
                                                         head.weight.requires_grad):
        coef = coef.detach().float()
        return zero + HeadGradientInForward.apply(
            hp, head.weight, head.bias, coef, bounds,
            lambda raw, s, e: _part_gradient(raw, coef, transform, *targets(s, e)))
    out = zero + torch.zeros(3, device=h.device)
    for s, e in zip(bounds[:-1], bounds[1:]):
        args = (hp[s:e], head.weight, head.bias, transform, *targets(s, e))
        out = out + (checkpoint(_part_sums, *args, use_reentrant=False)
                     if torch.is_grad_enabled() else _part_sums(*args))
    return out


def cross_coefficients(counts, kind: str, ce_weight: float) -> torch.Tensor:
    """(3,) what the step's loss multiplies [ALM, dist, CE] sums by, from the step's global counts
    (student tokens, chunks, chunk starts): (1 - w) times ALM per chunk, dist per chunk start,
    or their mean (`kind`), + w CE per student target token. The loss is linear in the sums."""
    n, c, m = (max(x, 1) for x in counts)
    kd = {"alm": [1 / c, 0.0], "dist": [0.0, 1 / m], "both": [0.5 / c, 0.5 / m]}[kind]
    return torch.tensor([(1 - ce_weight) * kd[0], (1 - ce_weight) * kd[1], ce_weight / n],
                        dtype=torch.float64).float()


def check_student(student_tok, student_name: str):
    """The student's tokens' bytes where its tokenizer keeps them (the dist term), or None."""
    from softlabels.data.errors import UserError

    try:
        return TokenBytes(student_tok, student_name)
    except UserError:
        return None


DEFAULT_CROSS_CE = 0.5  # the best measured (BENCHMARKS.md, "Students with their own tokenizer")
# student tokens per teacher token from which `auto` is alm rather than dist: at ~3 (3.18) alm
# gained 2.5x dist's bits and at ~4 4.3x, at ~1-2 dist was as good or better (BENCHMARKS.md,
# "Students with much finer tokens")
ALM_FROM = 3.0


def granularity(folder: str, teacher: TokenBytes, tok, rows: int = 8) -> float:
    """Student tokens per teacher token over the text of a dataset's first rows (its order on
    disk: one row group), the teacher's special tokens left out."""
    from softlabels.data.reader import SoftLabelReader

    reader = SoftLabelReader(folder, shuffle=False)
    n_teacher = n_student = 0
    for r in reader.read(0, np.arange(min(rows, len(reader.index(0).tokens)))):
        ids = np.asarray(r.input_ids, np.int64)
        ids = ids[~teacher.structure[ids]]
        n_teacher += len(ids)
        n_student += len(student_spans(tok, teacher.window(ids, r.window == 0)[0])[0])
    return n_student / max(n_teacher, 1)


@dataclass
class Cross:
    """The cross-tokenizer objective (objective.py's interface): a student that tokenizes each
    window's text itself. The student's tokenizer, each dataset's teacher tokens, which losses,
    the CE weight, and each dataset's resolved targets (topk, samples, both).

    Its target tokens, chunks and chunk starts are known only once its tokenizer has run, so the
    step's global counts are summed over this process's micro-batches and all-reduced (one small
    collective per step) before any backward."""

    tokenizer: object
    teachers: list[CrossTeacher]
    kind: str  # alm, dist or both
    ce_weight: float
    note: str = ""
    targets: tuple = ("topk",)  # per dataset

    n_counts = 3

    @classmethod
    def setup(cls, tokenizer, mix, cfg, targets=("topk",)) -> Cross | None:
        """None when every dataset was written with the student's tokenizer; else the cross
        setup, or a one-line UserError naming what a dataset lacks. `targets`: each dataset's
        resolved kind of stored targets."""
        from softlabels.data.dataset import load_tokenizer
        from softlabels.data.errors import UserError
        from softlabels.train_student.student import same_tokenizer

        toks = [load_tokenizer(f) for f in mix.folders]
        same = [same_tokenizer(tokenizer, t) for t in toks]
        if all(same):
            return None
        if any(same):
            raise UserError(f"{mix.folders[same.index(True)]} has the student's tokenizer and "
                            f"{mix.folders[same.index(False)]} another: train the datasets of "
                            "another tokenizer in a run of their own")
        for reader, f in zip(mix.readers, mix.folders):
            m = reader.manifest
            if not m.exact:
                raise UserError(
                    f"{f} ({m.what}) has no " + ("label log-probs" if not m.label_logprobs else
                                                 "exact tail") + ", which distillation into a "
                    "student with its own tokenizer needs: regenerate it with `softlabels "
                    "generate`")
        student = check_student(tokenizer, "the student's tokenizer")
        kind, note = cfg.cross_loss, ""
        if kind in ("dist", "both") and student is None:
            raise UserError(f"--cross-loss {kind} carries the teacher's targets onto the "
                            "student's tokens by their bytes, which the student's tokenizer "
                            "does not keep (WordPiece): use --cross-loss alm")
        tbs = [TokenBytes(tok, f"the tokenizer of {f}") for tok, f in zip(toks, mix.folders)]
        if kind == "auto" and student is None:
            kind, note = "alm", " (the default; dist needs a byte-exact student tokenizer)"
        elif kind == "auto":  # the best measured at the student's granularity
            ratio = granularity(mix.folders[0], tbs[0], tokenizer)
            kind = "alm" if ratio >= ALM_FROM else "dist"
            note = (f" (the default: {ratio:.2f} student tokens per teacher token in the first "
                    f"rows of {mix.folders[0]}; alm from {ALM_FROM:g}, dist below)")
        weights = set(cfg.ce_weight)
        if len(weights) > 1:
            raise UserError("--ce-weight: one value for a student with its own tokenizer")
        teachers = [CrossTeacher(tb, Trie(tb, student, tokenizer) if kind != "alm" else None)
                    for tb in tbs]
        return cls(tokenizer, teachers, kind,
                   weights.pop() if weights else DEFAULT_CROSS_CE, note, tuple(targets))

    def collate(self, rows, sources, targets: list[str] | None = None) -> CrossBatch:
        # (at CE weight 1 the dist targets would be weighed by 0: not built)
        return collate_cross(rows, sources, self.teachers, self.tokenizer,
                             list(targets or self.targets),
                             self.kind != "alm" and self.ce_weight < 1)

    def coefficients(self, counts, device=None) -> torch.Tensor:
        return cross_coefficients(counts, self.kind, self.ce_weight).to(device)

    def sums(self, h, batch: CrossBatch, head, chunk: int, transform, coef=None
             ) -> torch.Tensor:
        return cross_sums(h, batch, head, chunk, transform, coef)

    def step_counts(self, plan, group, mine, reduce) -> list[float]:
        return reduce(torch.tensor([list(b.counts) for b, w in mine if w], dtype=torch.float64
                                   ).reshape(-1, 3).sum(0)).tolist()

    def batch_counts(self, b: dict) -> list[int]:
        return list(CrossBatch(**b).counts)

    def unpack(self, inputs: dict) -> CrossBatch:
        return CrossBatch(**{f.name: inputs[f.name] for f in fields(CrossBatch)})

    def loss(self, sums: torch.Tensor, counts) -> torch.Tensor:
        return (self.coefficients(counts, sums.device) * sums).sum()

    def kd(self, sums: torch.Tensor, counts) -> torch.Tensor:
        return (cross_coefficients(counts, self.kind, 0.0).to(sums.device) * sums).sum()

    def record(self, sums: torch.Tensor, counts) -> dict:
        n, c, m = (max(x, 1) for x in counts)
        return {"loss": float(self.loss(sums, counts)), "alm": float(sums[0]) / c,
                **({"dist": float(sums[1]) / m} if counts[2] else {}), "ce": float(sums[2]) / n,
                "kd": float(self.kd(sums, counts)), "chunks": int(counts[1])}

    def resolved(self) -> dict:
        """What train_config.json records beside the flags: the losses and CE weight used, and
        the teacher targets of each dataset."""
        return {"targets": list(self.targets), "ce_weight": [self.ce_weight],
                "cross_loss": self.kind}

    def describe(self) -> str:
        return (f"cross-tokenizer: the student's tokenizer ({len(self.tokenizer)} tokens) is not "
                f"the teacher's; losses: {self.kind}{self.note}, CE weight {self.ce_weight:g}, "
                "over the student's own tokens of each window's text")
