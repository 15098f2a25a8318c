"""`softlabels eval --teacher T --prompts P`: the model's own continuations, scored by both
models: exact reverse KL and NLLs against a float64 recomputation, a model against itself, and
the refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from softlabels.train_student.continuations import evaluate_continuations, sample, score
from tests.helpers import corpus_texts, softlabels
from tests.test_bad_input import assert_one_line_error


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_teacher):
    """The tiny teacher and a student of its tokenizer (another seed, one layer)."""
    from softlabels.demo import make_model

    student = tmp_path_factory.mktemp("student")
    for f in tiny_teacher.glob("*token*"):
        shutil.copy(f, student)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    make_model(student, vocab_size=len(tok), hidden=64, layers=1, heads=2, seed=3)
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t[:60]}) + "\n"
                               for t in corpus_texts(5, offset=900)))
    return tiny_teacher, student, prompts


def _models(teacher, student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    return load(teacher), load(student), AutoTokenizer.from_pretrained(student)


def _prompt_ids(prompts, tok) -> list[list[int]]:
    """The prompts as `generate` renders them (the model has no chat template: BOS, text, a
    newline)."""
    from softlabels.generate.records import Fields, prompt_ids

    return [prompt_ids((json.loads(x)["prompt"],), Fields(text=None, prompt="prompt"), tok, i)
            for i, x in enumerate(prompts.read_text().splitlines())]


def test_reverse_kl_and_nlls_equal_a_float64_recomputation(pair):
    """Each continuation's every token: KL(q || p) over the whole vocabulary and both NLLs,
    recomputed here from plain forwards; a model against itself is at 0 with equal NLLs; the
    continuations stop at EOS or the length asked, and a seed gives the same ones, whatever the
    model's own generation config says."""
    teacher, student, prompts = pair
    t, s, tok = _models(teacher, student)
    ids = _prompt_ids(prompts, tok)
    eos = tok.eos_token_id
    got = sample(s, ids, 12, n=2, seed=7, eos=eos, pad=eos)
    assert len(got) == 10 and [c.prompt for c in got] == [p for p in ids for _ in range(2)]
    assert all(1 <= len(c.tokens) <= 12 and eos not in c.tokens[:-1] for c in got)
    assert [c.tokens for c in sample(s, ids, 12, n=2, seed=7, eos=eos, pad=eos)] == \
        [c.tokens for c in got]
    # the model's own generation config (Qwen's ships top_k, top_p, a repetition penalty) does
    # not reshape the draws
    s.generation_config.top_k, s.generation_config.repetition_penalty = 2, 50.0
    assert [c.tokens for c in sample(s, ids, 12, n=2, seed=7, eos=eos, pad=eos)] == \
        [c.tokens for c in got]
    assert s.generation_config.top_k == 2  # (and is left as it was)
    kl = t_nll = s_nll = n = 0.0
    for c in got:
        x = torch.tensor([c.prompt + c.tokens])
        with torch.no_grad():
            lq = torch.log_softmax(s(x).logits[0].double(), -1)
            lp = torch.log_softmax(t(x).logits[0].double(), -1)
        for j, y in enumerate(c.tokens):
            i = len(c.prompt) - 1 + j
            kl += float((lq[i].exp() * (lq[i] - lp[i])).sum())
            t_nll -= float(lp[i, y])
            s_nll -= float(lq[i, y])
            n += 1
    m = score(s, t, got)
    assert m["continuation_tokens"] == n
    assert m["reverse_kl"] == pytest.approx(kl / n, rel=1e-9)
    assert m["teacher_nll"] == pytest.approx(t_nll / n, rel=1e-9)
    assert m["model_nll"] == pytest.approx(s_nll / n, rel=1e-9)
    assert m["reverse_kl"] > 0.01  # two random models disagree
    own = score(s, s, got)
    assert own["reverse_kl"] == pytest.approx(0, abs=1e-9)
    assert own["teacher_nll"] == pytest.approx(own["model_nll"], rel=1e-12)
    assert evaluate_continuations(s, t, tok, ids, 12, 2, 7)["reverse_kl"] == \
        pytest.approx(m["reverse_kl"], rel=1e-9)


def test_eval_cli_prints_the_continuations_row_beside_held_out_ones(pair):
    teacher, student, prompts = pair
    p = softlabels("eval", "--model", student, "--teacher", teacher, "--prompts", prompts,
                   "--max-new-tokens", 12, "--n", 2, "--seed", 7, "--json")
    row = json.loads(p.stdout)
    t, s, tok = _models(teacher, student)
    ids = _prompt_ids(prompts, tok)
    want = evaluate_continuations(s, t, tok, ids, 12, 2, 7)
    assert row["prompts"] == str(prompts) and row["prompt_count"] == 5
    assert row["continuations"] == 10
    assert row["reverse_kl"] == pytest.approx(want["reverse_kl"], rel=1e-6)
    assert row["teacher_nll"] == pytest.approx(want["teacher_nll"], rel=1e-6)


@pytest.mark.parametrize("args,needle", [
    ([], "eval needs --data"),
    (["--teacher", "T"], "--teacher and --prompts go together"),
    (["--prompts", "P"], "--teacher and --prompts go together"),
    (["--teacher", "T", "--prompts", "P", "--max-new-tokens", 0], "--max-new-tokens 0"),
    (["--teacher", "T", "--prompts", "P", "--n", 0], "--n 0"),
])
def test_eval_flags_are_refused_in_one_line(pair, args, needle):
    _, student, _ = pair
    assert_one_line_error(softlabels("eval", "--model", student, *args, check=False), needle)


def test_a_teacher_of_another_vocabulary_is_refused_before_any_sampling(tmp_path, pair):
    from softlabels.demo import make_model, make_tokenizer

    teacher, student, prompts = pair
    other = tmp_path / "other"
    tok = make_tokenizer(corpus_texts(50), vocab_size=300, path=other)
    make_model(other, vocab_size=len(tok), hidden=64, layers=1, heads=2)
    p = softlabels("eval", "--model", student, "--teacher", other, "--prompts", prompts,
                   check=False)
    assert_one_line_error(p, "another tokenizer than the model")
    p = softlabels("eval", "--model", student, "--teacher", teacher, "--prompts",
                   tmp_path / "none.jsonl", check=False)
    assert_one_line_error(p, "does not exist")
