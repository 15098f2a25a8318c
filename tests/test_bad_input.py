"""Bad input: a one-line message naming the problem and the fix, exit != 0, nothing committed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softlabels.generate.state import OutputLock
from tests.helpers import REPO, softlabels


def generate(tiny_teacher, inp, out, *extra):
    return softlabels("generate", "--teacher", tiny_teacher, "--input", inp, "--output", out,
                      "--top-k", 4, *extra, check=False)


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, p.stderr
    # progress lines may come first; the error is one line, last, with no traceback
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in p.stderr and len(err) == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == err[0]
    for n in needles:
        assert n in err[0], err[0]


def test_missing_input(tmp_path, tiny_teacher):
    p = generate(tiny_teacher, tmp_path / "nope.parquet", tmp_path / "out")
    assert_one_line_error(p, "does not exist")
    assert not (tmp_path / "out").exists()


def test_empty_input(tmp_path, tiny_teacher):
    pq.write_table(pa.table({"text": ["", "   "]}), tmp_path / "in.parquet")
    p = generate(tiny_teacher, tmp_path / "in.parquet", tmp_path / "out")
    assert_one_line_error(p, "no usable records")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_invalid_utf8(tmp_path, tiny_teacher):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe"}\n')
    p = generate(tiny_teacher, tmp_path / "in.jsonl", tmp_path / "out")
    assert_one_line_error(p, "line 2", "UTF-8")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes(b"bad \xc3\x28")
    p = generate(tiny_teacher, tmp_path / "txt", tmp_path / "out2")
    assert_one_line_error(p, "a.txt", "UTF-8")


def test_missing_text_column_lists_columns(tmp_path, tiny_teacher):
    pq.write_table(pa.table({"body": ["x"], "title": ["y"]}), tmp_path / "in.parquet")
    p = generate(tiny_teacher, tmp_path / "in.parquet", tmp_path / "out")
    assert_one_line_error(p, "'text'", "body, title", "--text-column")


def test_teacher_missing_or_not_causal_lm(tmp_path, tiny_teacher):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    p = generate(tmp_path / "no-teacher", tmp_path / "in.jsonl", tmp_path / "out")
    assert_one_line_error(p, "does not exist")
    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, architectures=["BertModel"]).save_pretrained(tmp_path / "b")
    p = generate(tmp_path / "b", tmp_path / "in.jsonl", tmp_path / "out")
    assert_one_line_error(p, "not a causal LM")


def test_top_k_larger_than_vocab(tmp_path, tiny_teacher):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    p = generate(tiny_teacher, tmp_path / "in.jsonl", tmp_path / "out", "--top-k", 100000)
    assert_one_line_error(p, "--top-k 100000", "vocabulary size 512")


@pytest.mark.parametrize("kind", ["parquet", "one-row-group", "jsonl", "txt", "datasets"])
def test_each_input_kind_is_read_in_order_across_pieces(tmp_path, kind):
    """Planning runs one task per piece: the pieces, read one by one, give every record once, in
    order, and each piece knows its first record's index before it is read."""
    import datasets

    from softlabels.generate.inputs import open_corpus

    texts = [f"record {i}, with ünïcode" + "x" * (i % 7) for i in range(40)]
    if kind in ("parquet", "one-row-group"):  # pieces within and across row groups
        pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet",
                       row_group_size=3 if kind == "parquet" else len(texts))
        path = tmp_path / "a.parquet"
    elif kind == "jsonl":  # blank lines are not records
        path = tmp_path / "a.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + ("\n  \n" if i % 5 == 0 else "\n")
                                for i, t in enumerate(texts)))
    elif kind == "txt":
        path = tmp_path / "docs"
        path.mkdir()
        for i, t in enumerate(texts):
            (path / f"{i:02d}.txt").write_text(t)
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(path)
    corpus = open_corpus(path)
    pieces = corpus.pieces(piece_bytes=100)
    assert len(pieces) >= 4
    read = [[r[0] for r in corpus.records(p)] for p in pieces]
    assert [t for piece in read for t in piece] == texts
    assert [len(r) for r in read] == [p.records for p in pieces]
    assert [p.first_record for p in pieces] == np.cumsum([0] + [len(r) for r in read])[:-1].tolist()


def test_second_writer_on_same_output_is_refused(tmp_path, tiny_teacher):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    lock = OutputLock(tmp_path / "out")  # as a running generate holds it
    try:
        p = generate(tiny_teacher, tmp_path / "in.jsonl", tmp_path / "out")
        assert_one_line_error(p, "another softlabels generate is writing")
    finally:
        lock.release()
    assert not (tmp_path / "out" / ".softlabels" / "plan.json").exists()


def test_null_text_cell_is_an_empty_record(tmp_path, tiny_teacher):
    """A null cell is an empty record, counted and skipped, like records.py treats None; a
    non-text value is still refused in one line."""
    from transformers import AutoTokenizer

    from softlabels.generate.inputs import open_corpus
    from softlabels.generate.plan import Job, make_plan
    from softlabels.generate.records import Fields

    pq.write_table(pa.table({"text": ["In the beginning", None, "God created"]}),
                   tmp_path / "in.parquet")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    job = Job("t", "i", k=4, max_length=64, unit_tokens=1000, logprob_step=1 / 16)
    plan = make_plan(open_corpus(tmp_path / "in.parquet", Fields().columns), tok, job,
                     tmp_path / "out", Fields())
    assert (plan.records, plan.empty_records) == (3, 1)
    assert plan.tokens == sum(len(tok(t).input_ids) for t in ["In the beginning", "God created"])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "num.parquet")
    p = generate(tiny_teacher, tmp_path / "num.parquet", tmp_path / "out2")
    assert_one_line_error(p, "record 0", "not text")


def test_stride_outside_the_window_is_refused(tmp_path, tiny_teacher):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    for stride in (0, 65):
        p = generate(tiny_teacher, tmp_path / "in.jsonl", tmp_path / "out", "--max-length", 64,
                     "--stride", stride)
        assert_one_line_error(p, f"--stride {stride}", "between 1 and --max-length 64")
    assert not (tmp_path / "out").exists()


def test_windows_tile_every_record_once():
    """Every position carries its target in exactly one window, windows are at most max_length
    long, and a later window's context is the max_length - stride tokens before its targets."""
    from softlabels.generate.plan import windows

    for n in (0, 1, 7, 64, 65, 300):
        for L, S in ((64, 0), (64, 64), (64, 1), (64, 24), (7, 3)):
            w = windows(n, L, S)
            assert [p for _, t, b in w for p in range(t, b)] == list(range(n))
            assert all(0 <= a <= t < b <= a + L for a, t, b in w)
            assert all(t - a == (L - (S or L) if i else 0) for i, (a, t, _) in enumerate(w))


def test_sample_temperature_beside_a_top_k_is_refused(tmp_path, tiny_teacher):
    """Draws beside a top-k share the teacher's mass outside it at temperature 1: drawn at
    another temperature the trainer could not state their target, so generate refuses it before
    the teacher runs; draws alone at another temperature are the teacher at that temperature."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    p = generate(tiny_teacher, tmp_path / "in.jsonl", tmp_path / "out", "--samples", 8,
                 "--sample-temperature", 2)
    assert_one_line_error(p, "--sample-temperature with --top-k", "--samples alone")
    assert not (tmp_path / "out").exists()


def test_a_folder_of_another_version_is_refused(tmp_path, tiny_teacher):
    """A job interrupted under an older softlabels (another format) cannot be finished by this
    one, whose units would not concatenate with it: refused in one line saying what to do."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    state = tmp_path / "out" / ".softlabels"
    state.mkdir(parents=True)
    (state / "job.json").write_text(json.dumps({"id": "0" * 64, "job": {"k": 4}}))  # format 3
    p = generate(tiny_teacher, tmp_path / "in.jsonl", tmp_path / "out")
    assert_one_line_error(p, "started by softlabels before 0.3 (format 3 or older)",
                          "finish it with that version", "new --output")
    assert sorted(x.name for x in state.iterdir()) == ["job.json", "lock"]  # nothing planned


def test_windows_of_context_only_are_never_planned(tmp_path, tiny_teacher):
    """A prompt longer than --max-length fills whole windows with context (no target): they are
    counted, never planned for the teacher; a record with no target at all is named."""
    from transformers import AutoTokenizer

    from softlabels.generate.inputs import open_corpus
    from softlabels.generate.plan import Job, make_plan, read_unit
    from softlabels.generate.records import Fields

    long = " ".join(["In the beginning God created the heaven and the earth."] * 6)
    with open(tmp_path / "in.jsonl", "w") as f:
        for prompt, response in ((long, "And it was so."), ("Hello", "World"), ("Hi", "")):
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    fields = Fields(text=None, prompt="prompt", response="response")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    job = Job("t", "i", k=4, max_length=16, unit_tokens=1000, logprob_step=1 / 16)
    plan = make_plan(open_corpus(tmp_path / "in.jsonl", fields.columns), tok, job,
                     tmp_path / "out", fields)
    assert plan.context_windows >= 3  # the long prompt's first windows
    masks = [m for u in plan.units for m in read_unit(tmp_path / "out", u)[2]]
    assert masks and all(any(m) for m in masks)
    # no template: the empty response is its EOS alone, a target: nothing is untargeted here
    assert plan.untargeted == []


@pytest.mark.parametrize("flags, needle", [
    (["--samples", 8, "--top-k", 0, "--sample-temperature", "nan"], "--sample-temperature"),
    (["--logprob-step", "-0.0625"], "--logprob-step -0.0625"),
    (["--logprob-step", "inf"], "--logprob-step inf"),
    (["--logprob-step", "0.001"], "uint16"),
    (["--generate-responses", "--prompt-column", "text", "--temperature", "nan"], "--temperature"),
    (["--generate-responses", "--prompt-column", "text", "--top-p", 0], "--top-p"),
    (["--retries", -1], "--retries"),
    (["--seed", -1], "--seed -1"),
    (["--seed", 1 << 32], "between 0 and 2**31 - 1"),
])
def test_numbers_that_would_waste_the_teacher_run_are_refused_first(tmp_path, tiny_teacher,
                                                                     flags, needle):
    """Each numeric flag is checked before any engine starts (a NaN sample temperature drew the
    same token everywhere and passed verify; a negative step failed verify after the run)."""
    pq.write_table(pa.table({"text": ["some text"]}), tmp_path / "in.parquet")
    p = generate(tiny_teacher, tmp_path / "in.parquet", tmp_path / "out", *flags)
    assert_one_line_error(p, needle)
    assert not (tmp_path / "out").exists()  # refused before the folder was taken


def test_a_url_output_is_never_a_local_folder(tmp_path, tiny_teacher):
    """(An unreachable bucket: no credentials, or no such bucket, in one line.)"""
    pq.write_table(pa.table({"text": ["some text"]}), tmp_path / "in.parquet")
    p = softlabels("generate", "--teacher", tiny_teacher, "--input", tmp_path / "in.parquet",
                   "--output", "s3://bucket/x", "--top-k", 4, check=False)
    assert_one_line_error(p, "s3://bucket/x")
    assert not (REPO / "s3:").exists()


def test_a_window_longer_than_the_teachers_context_is_refused_first(tmp_path, tiny_teacher):
    """A teacher of 64 positions: --max-length 128 failed in every unit inside vLLM after the
    engine started; it is one line now, and the default window shrinks to the context."""
    import shutil
    from argparse import Namespace

    from transformers import AutoConfig

    from softlabels.generate.cli import _max_length

    short = tmp_path / "short"
    shutil.copytree(tiny_teacher, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (short / "config.json").write_text(json.dumps(cfg))
    pq.write_table(pa.table({"text": ["hello world"]}), tmp_path / "in.parquet")
    p = generate(short, tmp_path / "in.parquet", tmp_path / "out", "--max-length", 128)
    assert_one_line_error(p, "--max-length 128 is longer than the teacher's context (64")
    assert not (tmp_path / "out").exists()
    config = AutoConfig.from_pretrained(short)
    assert _max_length(Namespace(max_length=None), config) == 64
    assert _max_length(Namespace(max_length=32), config) == 32
    assert _max_length(Namespace(max_length=None), AutoConfig.from_pretrained(tiny_teacher)) \
        == 2048


def test_a_misspelt_engine_argument_is_refused_before_any_engine(tmp_path, tiny_teacher):
    pq.write_table(pa.table({"text": ["hello world"]}), tmp_path / "in.parquet")
    p = generate(tiny_teacher, tmp_path / "in.parquet", tmp_path / "out", "--engine-arg",
                 "max_num_seq=8")
    assert_one_line_error(p, "--engine-arg max_num_seq: vLLM has no such engine argument",
                          "did you mean max_num_seqs?")
    assert not (tmp_path / "out").exists()
