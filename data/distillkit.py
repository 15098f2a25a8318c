"""DistillKit's layout (arcee-ai/DistillKit 1.0), read into softlabels rows.

What its files hold (read from its `sample_logits_vllm.py`, `compression/` and `pack_logits.py`,
and from files its own code made): Parquet rows of `input_ids` and, per position with a target,
`compressed_logprobs` (bytes: the first `exact_k` log-probs as floats, then polynomial
coefficients fitted to the rest, then quantised residual bins) and `bytepacked_indices` (the k
token ids, ceil(log2(d)) bits each, most significant bit first). Rows come as vLLM wrote them (one
more input id than targets: a pad token, or the last token of a truncated record, which its
trainer trims) or already trimmed and packed by `distillkit-pack-logits` (several documents per
row, numbered 1, 2, ... in `attention_mask`). The values are the teacher's log-probs over its
vocabulary, in descending order; the mass outside the k is not stored, nor is the observed token
when it falls outside them. The decoding here is our own, vectorised over a batch, and equal to
DistillKit's `LogprobCompressor.decompress_to_sparse` (tests compare against files its code made).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from softlabels.data.errors import UserError
from softlabels.data.format import Row, list_column, log1mexp, row_at

COLUMNS = ("compressed_logprobs", "bytepacked_indices")
CONFIG_FILE = "compression_config.yaml"
# bytes per value of DistillKit's TermDtype names
_WIDTH = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Bin:
    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class Compression:
    """DistillKit's `DistributionQuantizationConfig`: what a dataset's bytes mean."""

    d: int  # the vocabulary as DistillKit counts it (its sampler writes len(vocab) + 1)
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple = ()  # ints (powers of t) and "sqrt" / "exp"
    term_dtype: str = "float32"
    residual_bins: tuple[Bin, ...] = ()
    delta_encoding: bool = True
    normalize_t: bool = False

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Compression:
        """From the YAML mapping DistillKit writes (or its trainer config's
        `teacher.logprob_compressor`), checked as DistillKit's pydantic model checks it."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: not a mapping of DistillKit's compression settings")
        if "legacy_logit_compression" in d or "polynomial_degree" in d:
            raise UserError(f"{where}: DistillKit's legacy compression stores centred logits, "
                            "not log-probabilities (no normaliser, no tail): not importable")
        d = d.get("logprob_compressor", d)
        known = {"d", "k", "exact_k", "exact_dtype", "polynomial_terms", "term_dtype",
                 "residual_bins", "delta_encoding", "error_diffusion", "normalize_t"}
        if unknown := set(d) - known:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} for "
                            "DistillKit's compression config")
        try:
            bins = tuple(Bin(str(b["scale_dtype"]), int(b["element_bits"]),
                             int(b["num_elements"])) for b in d.get("residual_bins") or ())
            terms = tuple(t if isinstance(t, int) else str(t)
                          for t in d.get("polynomial_terms") or ())
            c = cls(int(d["d"]), int(d["k"]), int(d["exact_k"]),
                    str(d.get("exact_dtype", "float32")), terms,
                    str(d.get("term_dtype", "float32")), bins,
                    bool(d.get("delta_encoding", True)), bool(d.get("normalize_t", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: {type(e).__name__} {e} (d, k and exact_k are required, "
                            "bins need scale_dtype, element_bits and num_elements)") from None
        problems = []
        if not (c.d > 1 and 0 < c.k <= min(c.d, 65535) and 0 <= c.exact_k <= c.k):
            problems.append(f"needs d > 1, 0 < k <= min(d, 65535), 0 <= exact_k <= k (d {c.d}, "
                            f"k {c.k}, exact_k {c.exact_k})")
        for name in (c.exact_dtype, c.term_dtype, *(b.scale_dtype for b in c.residual_bins)):
            if name not in _WIDTH:
                problems.append(f"dtype {name!r} is none of {', '.join(_WIDTH)}")
        if any(t not in ("sqrt", "exp") and not isinstance(t, int) for t in c.polynomial_terms):
            problems.append(f"polynomial_terms {list(c.polynomial_terms)}: ints, sqrt or exp")
        if any(not (1 <= b.element_bits <= 64 and b.num_elements > 0) for b in c.residual_bins):
            problems.append("a residual bin needs 1 <= element_bits <= 64 and num_elements > 0")
        if sum(b.num_elements for b in c.residual_bins) > c.k - c.exact_k:
            problems.append("residual bins hold more than k - exact_k values")
        if c.exact_k < c.k and not c.polynomial_terms and not c.residual_bins:
            problems.append("exact_k < k with neither polynomial_terms nor residual_bins")
        if problems:
            raise UserError(f"{where}: {'; '.join(problems)}")
        return c

    @property
    def index_bits(self) -> int:
        """Bits per token id: DistillKit's ceil(log2(d)), computed in float32 as it does."""
        return int(np.ceil(np.log2(np.float32(self.d))))

    @property
    def value_bytes(self) -> int:
        """Bytes of `compressed_logprobs` per position (DistillKit's logprob_bits() / 8)."""
        n = self.exact_k * _WIDTH[self.exact_dtype] * 8
        n += len(self.polynomial_terms) * _WIDTH[self.term_dtype] * 8
        for b in self.residual_bins:
            n += -(-(_WIDTH[b.scale_dtype] * 8 + b.element_bits * b.num_elements) // 8) * 8
        return -(-n // 8)

    @property
    def index_bytes(self) -> int:
        return -(-self.k * self.index_bits // 8)

    def as_dict(self) -> dict:
        return {"d": self.d, "k": self.k, "exact_k": self.exact_k,
                "exact_dtype": self.exact_dtype, "polynomial_terms": list(self.polynomial_terms),
                "term_dtype": self.term_dtype, "delta_encoding": self.delta_encoding,
                "normalize_t": self.normalize_t,
                "residual_bins": [vars(b) for b in self.residual_bins]}


def _floats(raw: np.ndarray, dtype: str) -> np.ndarray:
    """(P, n * width) little-endian bytes -> (P, n) values of that dtype, as float32 (float64
    for float64): every float16 and bfloat16 value is a float32 one."""
    raw = np.ascontiguousarray(raw)
    if dtype == "bfloat16":  # the high half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    out = raw.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype])
    return out.astype(np.float32, copy=False) if dtype != "float64" else out


def unpack(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    """(P, bytes) -> (P, n) unsigned ints of `bits` bits each, most significant bit first (the
    bit order of DistillKit's pack_to_bytes): each value read from the 4 (or 8) bytes at its
    offset, as one big-endian word."""
    if n == 0:
        return np.zeros((len(raw), 0), np.int64)
    if bits > 57:  # a value that does not fit a word after its offset's 7 spare bits
        bitsarr = np.unpackbits(raw, axis=1)[:, : n * bits].reshape(len(raw), n, bits)
        weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.uint64))
        return (bitsarr.astype(np.uint64) * weights).sum(-1).astype(np.int64)
    width, word, typ = (4, ">u4", np.uint32) if bits <= 25 else (8, ">u8", np.uint64)
    start = np.arange(n) * bits
    padded = np.concatenate([raw, np.zeros((len(raw), width), np.uint8)], 1)  # the last word
    window = np.take(padded, (start // 8)[:, None] + np.arange(width), axis=1)  # (P, n, width)
    w = window.view(word)[..., 0].astype(typ)  # bit 0 of the window is its top bit
    shift = (8 * width - bits - start % 8).astype(typ)
    return ((w >> shift) & typ((1 << bits) - 1)).astype(np.int64)


def decode(values: np.ndarray, indices: np.ndarray, c: Compression
           ) -> tuple[np.ndarray, np.ndarray]:
    """(P, value_bytes) and (P, index_bytes) uint8 -> (P, k) token ids and (P, k) float32
    log-probs, as DistillKit's trainer receives them: rounded as its torch code rounds at each
    step (the exact values in exact_dtype, the fit's products and sum in term_dtype, residuals
    in float32, the sum promoted as torch promotes, the delta decoding's running sum, kept in
    double as torch's CPU kernel keeps it, rounded to float32 and cast back)."""
    P = len(values)
    at = c.exact_k * _WIDTH[c.exact_dtype]
    exact = _floats(values[:, :at], c.exact_dtype)
    n_approx = c.k - c.exact_k
    resid, i = np.zeros((P, n_approx), np.float32), 0
    coeffs = None
    if c.polynomial_terms:
        w = len(c.polynomial_terms) * _WIDTH[c.term_dtype]
        coeffs = _floats(values[:, at: at + w], c.term_dtype)
        at += w
    for b in c.residual_bins:
        sw = _WIDTH[b.scale_dtype]
        scale = _floats(values[:, at: at + sw], b.scale_dtype).astype(np.float32)
        at += sw
        nb = -(-b.element_bits * b.num_elements // 8)
        q = unpack(values[:, at: at + nb], b.element_bits, b.num_elements)
        at += nb
        if b.element_bits == 1:
            r = (q.astype(np.float32) * 2 - 1) * scale
        else:
            r = (q - (1 << (b.element_bits - 1))).astype(np.float32) * scale
        resid[:, i: i + b.num_elements] = r
        i += b.num_elements
    resid = _cast(resid, c.exact_dtype) if c.residual_bins else resid
    if coeffs is not None:  # the fit: products and their sum in term_dtype
        X = _poly(c, n_approx)
        if c.term_dtype in ("float32", "float64"):  # exact products: within an ulp of torch's
            fit = _cast(coeffs.astype(np.float64) @ X.T.astype(np.float64), c.term_dtype)
        else:  # 16-bit products round as torch rounds them, one term at a time
            fit = sum(_cast(coeffs[:, j, None] * X[None, :, j], c.term_dtype).astype(np.float64)
                      for j in range(X.shape[1]))
            fit = _cast(fit, c.term_dtype)
        approx = _cast(fit + resid, _promote(c.term_dtype, c.exact_dtype))
    else:
        approx = resid
    lp = np.concatenate([exact, approx.astype(exact.dtype)], 1)
    if c.delta_encoding:  # a float32 running sum (torch's runs in double: 1e-4 nats apart at
        lp = _cast(np.cumsum(lp, 1, dtype=np.float32), c.exact_dtype)  # most, 6x faster)
    return unpack(indices, c.index_bits, c.k), lp.astype(np.float32, copy=False)


def _promote(a: str, b: str) -> str:
    """torch's result dtype of two float dtypes (float16 with bfloat16 gives float32)."""
    if a == b:
        return a
    rank = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}
    return a if rank[a] > rank[b] else b if rank[b] > rank[a] else "float32"


def _poly(c: Compression, n: int) -> np.ndarray:
    """(n, terms) DistillKit's design matrix over t = 0..n-1 (or 0..1), in term_dtype."""
    t = _cast(np.arange(n), c.term_dtype)
    if c.normalize_t:  # torch.linspace: the step in the dtype, each half counted from its end
        step = _cast(np.array(1 / max(n - 1, 1)), c.term_dtype)
        i = np.arange(n)
        t = _cast(np.where(i < n // 2, _cast(step * i, c.term_dtype),
                           1 - _cast(step * (n - 1 - i), c.term_dtype)), c.term_dtype)
    cols = [t ** p if isinstance(p, int) else getattr(np, p)(t) for p in c.polynomial_terms]
    return _cast(np.stack(cols, -1), c.term_dtype)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to `dtype` (bfloat16: to nearest even, on the float32 bits), as float32 (float64
    for float64)."""
    x = np.asarray(x)
    if dtype == "float64":
        return x.astype(np.float64)
    if dtype == "bfloat16":  # (a carry past the top bit needs a NaN's payload: none here)
        u = x.astype(np.float32).view(np.uint32)
        u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(
            0xFFFF0000)
        return u.view(np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    return x.astype(np.float32, copy=False)


def check_bytes(c: Compression, value_len: int, index_len: int, where: str) -> None:
    """The per-position byte counts the config implies, against a source's: a config that does
    not match the columns would decode every value wrongly."""
    if (value_len, index_len) != (c.value_bytes, c.index_bytes):
        raise UserError(f"{where}: {value_len} value bytes and {index_len} index bytes per "
                        f"position, but this compression config makes {c.value_bytes} and "
                        f"{c.index_bytes} (k {c.k}, exact_k {c.exact_k}, d {c.d}): the config "
                        "is not the one these rows were written with (--compression-config)")


def read_rows(batch: pa.RecordBatch, first: int, c: Compression, vocab: int, step: float,
              where: str) -> tuple[list[Row], dict]:
    """The rows of a batch of DistillKit rows whose first is source row `first`, and what was
    done to them ({"trimmed", "packed", "scaled", "excess", "skipped"}).

    As its trainer sees them: a row with one more input id than targets loses that last id
    (the pad its sampler appends, or a truncated record's last token: it has no target); a
    packed row (`attention_mask` numbering documents 1, 2, ...) becomes one row per document,
    "<row>:<document>"; a `labels` column masks the positions where it is negative (its
    trainer's mask). The mass outside the top-k is 1 - the sum of the decoded values; a
    position whose values sum past 1 (bfloat16 or polynomial error) is scaled to sum to 1 and
    counted, past exp(step / 2) refused. Anything else that does not fit is a one-line
    UserError naming the row."""
    names = batch.schema.names
    ioff, ids = list_column(batch.column("input_ids"))
    tokens = ids.to_numpy(zero_copy_only=False).astype(np.int64)
    n_in = np.diff(ioff)
    flat = {}
    for name, width in (("compressed_logprobs", c.value_bytes),
                        ("bytepacked_indices", c.index_bytes)):
        off, inner = list_column(batch.column(name))
        boff, data = list_column(inner)
        w = np.diff(boff)
        if len(w) and (w != width).any():
            p = int(np.flatnonzero(w != width)[0])
            check_bytes(c, *((int(w[p]), c.index_bytes) if name == "compressed_logprobs" else
                             (c.value_bytes, int(w[p]))),
                        f"{where}: row {first + row_at(off, p)}")
        flat[name] = (off, data.to_numpy(zero_copy_only=False).reshape(-1, width))
    toff = flat["compressed_logprobs"][0]
    n_t = np.diff(toff)
    if (np.diff(flat["bytepacked_indices"][0]) != n_t).any():
        r = int(np.flatnonzero(np.diff(flat["bytepacked_indices"][0]) != n_t)[0])
        raise UserError(f"{where}: row {first + r}: compressed_logprobs and bytepacked_indices "
                        "have different lengths")
    bad = np.flatnonzero((n_in != n_t) & (n_in != n_t + 1))
    if len(bad):
        r = int(bad[0])
        raise UserError(f"{where}: row {first + r}: {n_in[r]} input ids for {n_t[r]} positions "
                        "with targets (DistillKit's rows have as many, or one more)")
    top_ids, lp = decode(flat["compressed_logprobs"][1], flat["bytepacked_indices"][1], c)
    segs = list_column(batch.column("attention_mask"))[1].to_numpy(zero_copy_only=False) \
        if "attention_mask" in names else None
    labels = list_column(batch.column("labels"))[1].to_numpy(zero_copy_only=False) \
        if "labels" in names else None
    stats = {"trimmed": int((n_in > n_t).sum()), "packed": 0, "scaled": 0, "excess": 0.0,
             "skipped": []}
    if not np.isfinite(lp[~np.isneginf(lp)]).all():
        p = int(np.flatnonzero(~np.isfinite(lp) & ~np.isneginf(lp))[0] // c.k)
        raise UserError(f"{where}: row {first + row_at(toff, p)}: a NaN or infinite log-prob "
                        "(a compression config that does not match the rows?)")
    top = lp.max(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):  # (P,) log of the top-k's mass:
        # float32 exponentials summed in float64 (8x faster than float64 ones), and float64
        # where the tail 1 - that mass is small enough for their rounding to show (< 1e-3)
        total = np.log(np.exp(lp - top).sum(-1, dtype=np.float64)) + top[:, 0]
        near = np.flatnonzero(total > np.log1p(-1e-3))
        sub = lp[near].astype(np.float64)
        total[near] = np.log(np.exp(sub - top[near]).sum(-1)) + top[near, 0]
    total[np.isneginf(top[:, 0])] = -np.inf  # (no value at all: the tail is everything)
    over = total > step / 2
    if over.any():
        p = int(np.flatnonzero(over)[0])
        raise UserError(f"{where}: row {first + row_at(toff, p)}: the top-k probabilities sum to "
                        f"{np.exp(total[p]):.4f} at position {p - toff[row_at(toff, p)]}: not one "
                        "distribution's (a compression config that does not match the rows?)")
    scaled = total > 0
    stats["scaled"] = int(scaled.sum())
    stats["excess"] = float(np.expm1(total.max())) if stats["scaled"] else 0.0
    lp = np.where(scaled[:, None], lp - total[:, None], lp)
    tail = log1mexp(np.minimum(total, 0.0))
    if (top_ids[:, 0] < 0).any() or (top_ids >= vocab).any():
        p = int(np.flatnonzero((top_ids >= vocab).any(-1))[0])
        raise UserError(f"{where}: row {first + row_at(toff, p)}: target id "
                        f"{int(top_ids[p].max())} is outside the vocabulary [0, {vocab}) "
                        "(the tokenizer's; --vocab-size for a teacher with padded embeddings)")
    rows = []
    for r in range(batch.num_rows):
        a, n = toff[r], n_t[r]
        ti = tokens[ioff[r]: ioff[r] + n]
        if (ti < 0).any() or (ti >= vocab).any():
            raise UserError(f"{where}: row {first + r}: input id {int(ti.max())} is outside "
                            f"the vocabulary [0, {vocab})")
        m = labels[ioff[r]: ioff[r] + n] >= 0 if labels is not None else np.ones(n, bool)
        s = segs[ioff[r]: ioff[r] + n] if segs is not None else np.ones(n, np.int64)
        cut = np.flatnonzero(np.diff(s)) + 1
        if (s <= 0).any() or (np.diff(s) < 0).any():
            raise UserError(f"{where}: row {first + r}: attention_mask is not packed documents "
                            "numbered 1, 2, ... (padding, or another packing): cannot be split "
                            "into documents")
        stats["packed"] += bool(len(cut))
        for j, (u, v) in enumerate(zip(np.r_[0, cut], np.r_[cut, n])):
            rid = f"{first + r}:{j}"
            if not m[u:v].any():
                stats["skipped"].append(rid)
                continue
            at = slice(a + u, a + v)
            mm = m[u:v]
            rows.append(Row(rid, ti[u:v].astype(np.int32),
                            np.where(mm[:, None], top_ids[at], 0).astype(np.int32),
                            np.where(mm[:, None], lp[at], 0).astype(np.float32), mm,
                            tail_logprob=tail[at].astype(np.float32)))
    return rows, stats
