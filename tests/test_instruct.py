"""Instruction data: chat templates, response-only targets, teacher-written responses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from softlabels.data.format import DEFAULT_LOGPROB_STEP, LABEL_STEP, TAIL_STEP
from softlabels.data.manifest import Manifest
from softlabels.data.verify import verify
from tests.helpers import (
    assert_same_targets,
    read_dataset,
    reference_targets,
    reference_topk,
    softlabels,
)

K = 8
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PAIRS = [("Who made the light?", "God said, Let there be light: and there was light."),
         ("Count to three.", "One, two, three."),
         ("Name a river.", "And a river went out of Eden to water the garden.")]


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory, tiny_teacher):
    """The tiny teacher with a chat template the tests define."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat") / "teacher"
    shutil.copytree(tiny_teacher, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("instr")
    with open(d / "pairs.jsonl", "w") as f:
        for p, r in PAIRS:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    with open(d / "chats.jsonl", "w") as f:
        f.write(json.dumps({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": PAIRS[0][0]},
            {"role": "assistant", "content": PAIRS[0][1]},
            {"role": "user", "content": PAIRS[1][0]},
            {"role": "assistant", "content": PAIRS[1][1]}]}) + "\n")
    return d


def gen(teacher, inp, out, dask, *extra, check=True):
    return softlabels("generate", "--teacher", teacher, "--input", inp, "--output", out,
                      "--top-k", K, "--max-length", 128, "--scheduler", dask, *extra,
                      check=check)


def test_prompt_response_with_chat_template(tmp_path, chat_teacher, inputs, dask_cluster):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_teacher)
    out = tmp_path / "ds"
    gen(chat_teacher, inputs / "pairs.jsonl", out, dask_cluster,
        "--prompt-column", "prompt", "--response-column", "response")
    assert verify(out) == []
    rows = read_dataset(out)
    for rec, (p, r) in enumerate(PAIRS):
        row = rows[f"{rec}:0"]
        ids = row.input_ids.tolist()
        assert tok.decode(ids) == f"<|user|>\n{p}<|end|>\n<|assistant|>\n{r}<|end|>\n"
        # targets exactly where the next token is a response token
        resp = [ids[t + 1] for t in np.flatnonzero(row.target_mask)]
        assert tok.decode(resp) == f"{r}<|end|>\n"
        first = int(np.flatnonzero(row.target_mask)[0])
        assert tok.decode(ids[: first + 1]).endswith("<|assistant|>\n")
        assert row.target_mask[first:].sum() == len(ids) - first - 1


def test_messages_mask_every_assistant_turn(tmp_path, chat_teacher, inputs, dask_cluster):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_teacher)
    out = tmp_path / "ds"
    gen(chat_teacher, inputs / "chats.jsonl", out, dask_cluster, "--messages-column",
        "messages")
    wins = sorted(read_dataset(out).values(), key=lambda r: r.window)  # one record
    ids = np.concatenate([r.input_ids for r in wins]).tolist()
    mask = np.concatenate([r.target_mask for r in wins])
    assert {r.record for r in wins} == {0}
    resp = tok.decode([ids[t + 1] for t in np.flatnonzero(mask)])
    assert resp == f"{PAIRS[0][1]}<|end|>\n{PAIRS[1][1]}<|end|>\n"


def test_no_template_joins_plain_text(tmp_path, tiny_teacher, inputs, dask_cluster):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert not tok.chat_template
    out = tmp_path / "ds"
    gen(tiny_teacher, inputs / "pairs.jsonl", out, dask_cluster,
        "--prompt-column", "prompt", "--response-column", "response")
    row = read_dataset(out)["1:0"]
    ids = row.input_ids.tolist()
    assert tok.decode(ids) == f"{PAIRS[1][0]}\n{PAIRS[1][1]}<|endoftext|>"
    resp = [ids[t + 1] for t in np.flatnonzero(row.target_mask)]
    assert tok.decode(resp) == f"{PAIRS[1][1]}<|endoftext|>"


def test_teacher_written_responses(tmp_path, chat_teacher, inputs, dask_cluster):
    args = ["--prompt-column", "prompt", "--generate-responses", "--max-new-tokens", 12,
            "--n", 2, "--seed", 7]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    gen(chat_teacher, inputs / "pairs.jsonl", a, dask_cluster, *args)
    gen(chat_teacher, inputs / "pairs.jsonl", b, dask_cluster, *args[:-1], 8)
    gen(chat_teacher, inputs / "pairs.jsonl", c, dask_cluster, *args, "--unit-tokens", 10)
    assert verify(a) == []
    ra, rb, rc = read_dataset(a), read_dataset(b), read_dataset(c)
    assert sorted(ra) == [f"{i}:{s}" for i in range(3) for s in range(2)]
    # same seed: the same responses, even when batched into different units
    for rid in ra:
        assert ra[rid].input_ids.tolist() == rc[rid].input_ids.tolist()
        assert ra[rid].response == rc[rid].response
    assert any(ra[r].input_ids.tolist() != rb[r].input_ids.tolist() for r in ra)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_teacher)
    rows = list(ra.values())
    ref = reference_topk(chat_teacher, [r.input_ids.tolist() for r in rows], K + 1)
    for r, (ref_ids, ref_lp) in zip(rows, ref):
        m = np.flatnonzero(r.target_mask)
        n_prompt = m[0] + 1
        assert tok.decode(r.input_ids[:n_prompt]).endswith("<|assistant|>\n")
        assert len(m) == len(r.input_ids) - n_prompt  # every response token has its target
        assert r.response == tok.decode(r.input_ids[n_prompt:], skip_special_tokens=True)
        clear = m[ref_lp[m, K - 1] - ref_lp[m, K] > 1e-4]
        assert_same_targets(ref_ids[clear, :K], ref_lp[clear, :K], r.topk_ids[clear],
                            r.topk_logprobs[clear], DEFAULT_LOGPROB_STEP / 2 + 1e-4)
    # format 4's columns, from vLLM's sampled-step log-probs: the tail as 1 - sum of the exact
    # top-k, the label as the sampled token's own log-prob
    for r, (_, _, tail, label) in zip(rows, reference_targets(
            chat_teacher, [r.input_ids.tolist() for r in rows], K)):
        m = np.flatnonzero(r.target_mask)
        np.testing.assert_allclose(np.exp(r.tail_logprob[m].astype(np.float64)),
                                   np.exp(tail[m].astype(np.float64)),
                                   rtol=np.expm1(TAIL_STEP / 2) + 1e-4)
        np.testing.assert_allclose(r.label_logprob[m], label[m], atol=LABEL_STEP / 2 + 1e-4)


@pytest.fixture(scope="module")
def chat_student(tmp_path_factory, chat_teacher):
    """Another random model with the teacher's tokenizer: the response model."""
    from transformers import AutoTokenizer

    from softlabels.demo import make_model

    d = tmp_path_factory.mktemp("student") / "student"
    tok = AutoTokenizer.from_pretrained(chat_teacher)
    make_model(d, vocab_size=len(tok), hidden=64, layers=1, heads=2, seed=1)
    tok.save_pretrained(d)
    return d


def test_student_written_responses_scored_by_the_teacher(tmp_path, chat_teacher, chat_student,
                                                         inputs, dask_cluster):
    """--response-model: the student's engine writes (and keeps its own log-prob of each token
    it wrote), the teacher's scores the same ids; a rerun redoes nothing, and another checkpoint
    is another job."""
    from transformers import AutoTokenizer

    args = ["--prompt-column", "prompt", "--generate-responses", "--max-new-tokens", 12,
            "--n", 2, "--seed", 7, "--response-model", chat_student, "--unit-tokens", 40]
    out = tmp_path / "ds"
    p = gen(chat_teacher, inputs / "pairs.jsonl", out, dask_cluster, *args)
    assert "response model: engine start" in p.stderr
    assert verify(out) == []
    m = Manifest.load(out)
    assert m.provenance["response_model"] == str(chat_student.resolve())
    assert len(m.provenance["response_model_sha256"]) == 64
    rows = read_dataset(out)
    assert sorted(rows) == [f"{i}:{s}" for i in range(3) for s in range(2)]
    rows = list(rows.values())
    windows = [r.input_ids.tolist() for r in rows]
    tok = AutoTokenizer.from_pretrained(chat_teacher)
    student = reference_targets(chat_student, windows, K)
    teacher = reference_targets(chat_teacher, windows, K + 1)
    written = 0
    for r, (_, _, _, s_label), (t_ids, t_lp, _, t_label) in zip(rows, student, teacher):
        m_ = np.flatnonzero(r.target_mask)
        n_prompt = m_[0] + 1
        assert tok.decode(r.input_ids[:n_prompt]).endswith("<|assistant|>\n")
        assert len(m_) == len(r.input_ids) - n_prompt
        assert r.response == tok.decode(r.input_ids[n_prompt:], skip_special_tokens=True)
        # the writer's own log-prob of each token it wrote: the student's, not the teacher's
        np.testing.assert_allclose(r.writer_logprob[m_], s_label[m_], atol=1e-4)
        assert np.isnan(r.writer_logprob[:n_prompt - 1]).all()
        np.testing.assert_allclose(r.label_logprob[m_], t_label[m_], atol=LABEL_STEP / 2 + 1e-4)
        assert np.abs(s_label[m_] - t_label[m_]).max() > 0.1  # two different models
        clear = m_[t_lp[m_, K - 1] - t_lp[m_, K] > 1e-4]
        assert_same_targets(t_ids[clear, :K], t_lp[clear, :K], r.topk_ids[clear],
                            r.topk_logprobs[clear], DEFAULT_LOGPROB_STEP / 2 + 1e-4)
        written += len(m_)
    attempts = (out / ".softlabels" / "attempts.log").read_text()
    p = gen(chat_teacher, inputs / "pairs.jsonl", out, dask_cluster, *args)
    assert (out / ".softlabels" / "attempts.log").read_text() == attempts
    assert read_dataset(out).keys() == {r.row_id for r in rows}
    # the same folder with another checkpoint of the response model: another job
    other = tmp_path / "other"
    shutil.copytree(chat_student, other)
    from softlabels.demo import make_model

    make_model(other, vocab_size=len(tok), hidden=64, layers=1, heads=2, seed=2)
    args[args.index(chat_student)] = other
    p = gen(chat_teacher, inputs / "pairs.jsonl", out, dask_cluster, *args, check=False)
    assert p.returncode == 2 and "holds a different job" in p.stderr, p.stderr


def test_windows_of_long_prompts_are_not_scored(tmp_path, chat_teacher, inputs, dask_cluster):
    """A prompt longer than --max-length: its windows of context only never reach the teacher
    (counted in the manifest), and every response token still has its target exactly once."""
    long = " ".join([PAIRS[0][0]] * 12)
    with open(tmp_path / "long.jsonl", "w") as f:
        for prompt, response in ((long, PAIRS[0][1]), *PAIRS[1:]):
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    def targets(max_length):
        out = tmp_path / f"ds-{max_length}"
        softlabels("generate", "--teacher", chat_teacher, "--input", tmp_path / "long.jsonl",
                   "--output", out, "--top-k", K, "--max-length", max_length, "--scheduler",
                   dask_cluster, "--prompt-column", "prompt", "--response-column", "response")
        assert verify(out) == []
        rows = read_dataset(out).values()
        assert all(r.target_mask.any() for r in rows)
        # (record, position in the record) of every target: windows tile records from 0
        return Manifest.load(out), sorted((r.record, max_length * r.window + t) for r in rows
                                          for t in np.flatnonzero(r.target_mask))

    cut, whole = targets(24), targets(256)
    assert cut[0].provenance["context_windows_skipped"] >= 2
    assert whole[0].provenance["context_windows_skipped"] == 0
    assert cut[0].provenance["records_without_targets"] == []
    assert cut[1] == whole[1]  # the same response positions, each once


def test_train_eval_and_inspect_use_the_mask(tmp_path, chat_teacher, inputs, dask_cluster):
    out = tmp_path / "ds"
    gen(chat_teacher, inputs / "pairs.jsonl", out, dask_cluster,
        "--prompt-column", "prompt", "--response-column", "response")
    rows = read_dataset(out)
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
           "head_dim": 32, "max_position_embeddings": 256}
    (tmp_path / "s.json").write_text(json.dumps(cfg))
    softlabels("train", "--student", tmp_path / "s.json", "--data", out, "--output",
               tmp_path / "st", "--max-steps", 2)
    log = json.loads((tmp_path / "st" / "train_log.json").read_text())
    assert log["tokens"] == 2 * sum(int(r.target_mask.sum()) for r in rows.values())
    m = json.loads(softlabels("eval", "--model", tmp_path / "st", "--data", out,
                              "--json").stdout)
    assert m["tokens"] == sum(int(r.target_mask.sum()) for r in rows.values())
    shown = softlabels("inspect", out, "--row", 0).stdout
    assert "prompt:" in shown and "response:" in shown and PAIRS[0][1] in shown


CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe helpful.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")
TRIMMING = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}")


def _chat(turns: int, text=lambda i: f"turn {i}: and God saw the light"):
    roles = ["user", "assistant"]
    return [{"role": "system", "content": "Answer briefly."}] + [
        {"role": roles[i % 2], "content": text(i)} for i in range(turns)]


@pytest.mark.parametrize("template", [TEMPLATE, CHATML, TRIMMING])
def test_chat_segments_linear_equal_prefix_rendering(tiny_teacher, template):
    """Two renders of the whole chat give the same tokens and response mask as rendering every
    prefix; where that cannot be shown (a template that trims contents with spaces around them)
    the prefix rendering is used."""
    from transformers import AutoTokenizer

    from softlabels.generate import records

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.chat_template = template
    chats = [_chat(6), _chat(3)[1:], _chat(4, lambda i: "<|im_end|>\nassistant" * (i + 1)),
             _chat(4, lambda i: f"  padded {i}  ")]
    for msgs in chats:
        fast = records._turn_texts(msgs, tok)
        slow = records._turn_texts_by_prefixes(msgs, tok)
        if fast is None:
            assert template == TRIMMING and "padded" in msgs[1]["content"]
        else:
            assert fast == [t for t in slow if t[0]]  # the prefix method keeps empty pieces
        ids, mask = records.tokenize((msgs,), records.Fields(messages="m"), tok, 0)
        want = [(tok(t, add_special_tokens=False).input_ids, r) for t, r in slow]
        assert ids == [i for seg, _ in want for i in seg]
        is_resp = [r for seg, r in want for _ in seg]
        assert mask == is_resp[1:] + [False]


def test_chat_rendering_is_linear_in_turns(tiny_teacher):
    """A chat of n turns is rendered twice, whatever n (the per-template probes are cached)."""
    from transformers import AutoTokenizer

    from softlabels.generate import records

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.chat_template = CHATML
    calls = []
    render = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **kw: calls.append(1) or render(*a, **kw)
    records.tokenize((_chat(2),), records.Fields(messages="m"), tok, 0)  # probes the template
    for turns in (2, 40):
        calls.clear()
        records.tokenize((_chat(turns),), records.Fields(messages="m"), tok, 0)
        assert len(calls) == 2
