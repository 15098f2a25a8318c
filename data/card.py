"""The dataset card (README.md): Hugging Face front matter so `datasets.load_dataset(DIR)` reads
exactly the manifest's shards, and a provenance table for people."""

from __future__ import annotations

import os
from pathlib import Path

from softlabels.data.atomic import write_text
from softlabels.data.manifest import Manifest


def front_matter(files: list[str], tags: list[str]) -> str:
    """The Hugging Face card's YAML: `datasets.load_dataset(DIR)` and the Hub's viewer read
    exactly these files as the train split."""
    listed = "\n".join(f"          - {f}" for f in files)
    return ("---\nconfigs:\n  - config_name: default\n    data_files:\n      - split: train\n"
            f"        path:\n{listed}\ntags:\n" + "".join(f"  - {t}\n" for t in tags) + "---\n")


def render(m: Manifest) -> str:
    prov = "\n".join(f"| {k} | `{v}` |" for k, v in m.provenance.items())
    what = " and ".join(
        ([f"the teacher's top-{m.k} next-token log-probabilities"] if m.k else [])
        + ([f"{m.draws} draws from its next-token distribution (temperature "
            f"{m.sample_temperature:g}{', outside the top-k' * m.tail_draws}), as distinct ids "
            "and counts"] if m.draws else []))
    columns, decoding = [], []
    tail_column = m.k and m.format_version >= 4
    if m.k:
        over = (f"renormalised over the {m.k} (the source stored no mass outside them)"
                if m.topk_renormalised else f"over the full vocabulary ({m.vocab_size} tokens)")
        columns += [
            f"| topk_id_gaps | list<int32[{m.k}]> | teacher's top-{m.k} ids per position, "
            "ascending, gap-coded |",
            f"| topk_logprobs_q | list<uint16[{m.k}]> | their quantised log-probs, same order |"]
        if tail_column:
            columns.append("| tail_mass_q | list<uint16> | the " + (
                "teacher's exact mass" if m.exact_tail else "mass (not exact: see below)")
                + " outside the top-k per position, log-coded |")
        decoding.append(
            f"Top-k: per position, `ids = cumsum(topk_id_gaps[t])`, `logprobs = "
            f"-{m.logprob_step!r} * topk_logprobs_q[t]`: natural-log probabilities at "
            f"temperature 1 {over}, in id order "
            "(sort by descending logprob for rank order); the mass outside them is " + (
                f"`tail = exp(-{m.tail_step!r} * q)` if `q = tail_mass_q[t]` < 32768, else "
                f"`1 - exp(-{m.tail_step!r} * (q - 32768))`" + (
                    ": exact (the smaller of the tail and the top-k's mass is log-coded, so both "
                    "have a relative error of at most half the step; `1 - sum(exp(logprobs))` "
                    "does not: rounding the top-k loses the tail at confident positions)."
                    if m.exact_tail else ", 0 here." if m.topk_renormalised else
                    ": 1 - the sum of the source's unrounded top-k, not the teacher's exact "
                    "tail.") if tail_column else "`1 - sum(exp(logprobs))`."))
    if m.draws:
        columns += [
            "| sample_id_gaps | list<list<int32>> | distinct drawn ids per position, ascending, "
            "gap-coded |",
            "| sample_counts | list<list<uint16>> | how often each was drawn; they sum to "
            f"{m.draws} |"]
        decoding.append(
            "Samples: per position, `ids = cumsum(sample_id_gaps[t])`, drawn "
            f"`sample_counts[t]` times each out of {m.draws}: `count / {m.draws}` is an "
            "unbiased estimate of the teacher's probability of each id" + (
                " given that it is outside the top-k: multiply by the tail mass. A position "
                "whose top-k holds all the mass has no draws." if m.tail_draws else "."))
    if m.label_logprobs and m.format_version >= 4:
        columns.append("| label_logprob_q | list<uint16> | the teacher's log-prob of the next "
                       "token per position |")
        decoding.append(f"Label: per position, `label_logprob = -{m.label_step!r} * "
                        "label_logprob_q[t]` is the teacher's log-prob of `input_ids[t+1]` "
                        "(0 is stored where the mask is false and at the last position).")
    lacks = _lacks(m)
    head = front_matter([s.file for s in m.shards],
                        ["knowledge-distillation", "soft-labels", "softlabels"])
    return f"""{head}
# Soft-label dataset (softlabels format v{m.format_version})

Per token, {what}, stored so a student can be trained without running the teacher again.
{m.rows} rows, {m.tokens} tokens, {len(m.shards)} shards.

## Columns
| column | type | meaning |
|---|---|---|
| row_id | string | `<record>:<window>`: input record index, window index within it |
| input_ids | list<int32> | token ids of the window |
| target_mask | list<bool> | false where a position carries no target |
{chr(10).join(columns)}

**Decoding**: {" ".join(decoding)} `targets[t]` predicts the token after
`input_ids[0..t]`. The same rule is in every shard's Arrow schema metadata and in
`manifest.json`.

Check the files against the manifest with `softlabels verify <this folder>`.
{lacks}
## Provenance
| field | value |
|---|---|
{prov}
"""


def _lacks(m: Manifest) -> str:
    """A section saying what an imported dataset's source did not store, and what that rules
    out (every recipe that needs it is refused by `softlabels train`)."""
    src = m.provenance.get("imported_from")
    if not src:
        return ""
    gone = []
    if m.topk_renormalised:
        gone.append("the teacher's mass outside the top-k: the source stored the top-k "
                    "renormalised over the k, so only `--residual none` is exact on it")
    elif m.k and not m.exact_tail:
        gone.append("an exact tail: the mass outside the top-k is 1 - the sum of the source's "
                    "stored top-k" + (", whose values past the first exact_k are a polynomial "
                                      "fit (an approximation)" if src == "distillkit" else ""))
    if not m.label_logprobs:
        gone.append("the label log-prob where the observed token fell outside the stored ids "
                    "(the label residual's exact form and cross-tokenizer students need it)")
    if not m.draws:
        gone.append("draws from the teacher's distribution")
    items = "".join(f"\n- {g}" for g in gone)
    return (f"\n## What the source ({src}) did not store\n{items}\n\nHow its rows were "
            "mapped (trimming, packing, alignment) is in softlabels' FORMAT.md, \"Imported "
            "datasets\".\n")


def write_card(directory: str | os.PathLike, m: Manifest) -> None:
    write_text(Path(directory) / "README.md", render(m))


def publish(directory: str | os.PathLike, m: Manifest, index=None) -> None:
    """Make a dataset visible: the index and the card first, the manifest last (readers trust
    the manifest, which holds the index's hash). `index`: its table, when the shards are not in
    `directory` (a job writing to a store)."""
    import pyarrow.parquet as pq

    from softlabels.data.atomic import atomic_path
    from softlabels.data.counts import INDEX, index_table
    from softlabels.data.dataset import sha256_file

    if index is None:
        index = index_table(directory, m.shards)
    with atomic_path(Path(directory) / INDEX) as tmp:
        pq.write_table(index, tmp, compression="zstd")
        m.index = {"file": INDEX, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
    write_card(directory, m)
    m.save(directory)
