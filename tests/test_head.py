"""The teacher's output head applied by softlabels, and the draws: against transformers and
against the distribution drawn from (no vLLM here; tests/test_generate.py runs the engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softlabels.data.errors import UserError
from softlabels.generate.head import Head, check_architecture, draw, unique_counts


def test_draws_follow_the_distribution_and_never_pick_a_zero_weight_id():
    torch.manual_seed(0)
    V, N = 1000, 400_000
    x = torch.randn(2, V) * 3
    x[:, [0, 5, 64, 999]] = -1e9  # no mass: the first id, one inside, one at a block edge, last
    w = torch.exp(x - x.max(-1, keepdim=True).values)
    d = draw(w, torch.rand(2, N, dtype=torch.float64))
    p = (w / w.sum(-1, keepdim=True)).double()
    for r in range(2):
        counts = torch.bincount(d[r], minlength=V).double()
        assert counts[[0, 5, 64, 999]].sum() == 0
        live = p[r] > 0
        chi2 = float((((counts - N * p[r]) ** 2) / (N * p[r]).clamp(min=1e-300))[live].sum())
        dof = int(live.sum()) - 1
        assert abs(chi2 - dof) < 5 * (2 * dof) ** 0.5, (chi2, dof)  # chi-square: mean dof


def test_unique_counts_sum_to_the_draws():
    drawn = np.array([[3, 1, 3, 3], [7, 7, 7, 7], [0, 2, 1, 9]])
    ids, counts = unique_counts(drawn)
    assert ids.shape == counts.shape == (3, 4)
    assert counts.sum(-1).tolist() == [4, 4, 4]
    assert dict(zip(ids[0][counts[0] > 0].tolist(), counts[0][counts[0] > 0].tolist())) \
        == {1: 1, 3: 3}
    assert ids[1][counts[1] > 0].tolist() == [7]
    assert ids[2].tolist() == [0, 1, 2, 9]


def _model(path, kind: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    if kind == "gemma2":  # tied embeddings and a final logit soft-cap
        model = Gemma2ForCausalLM(Gemma2Config(**common, final_logit_softcapping=2.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=kind == "tied"))
    with torch.no_grad():  # logits big enough for the soft-cap to matter
        model.get_output_embeddings().weight.mul_(20)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("kind", ["untied", "tied", "gemma2"])
def test_head_gives_the_models_own_log_probs(tmp_path, kind):
    model = _model(tmp_path, kind)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    ref = torch.log_softmax(out.logits[0].double(), -1)
    head = Head(tmp_path, torch.float32)
    t = head.targets(out.hidden_states[-1][0], k=10, draws=200, seed=3)
    want_lp, want_ids = ref.topk(10, -1)
    np.testing.assert_allclose(t.topk_logprobs, want_lp.numpy(), atol=2e-5)
    assert (t.topk_ids == want_ids.numpy()).mean() > 0.99  # ties may swap
    # the draws come from outside the top-k, renormalised, and never from ~0 mass there
    tail = ref.numpy().copy()
    np.put_along_axis(tail, want_ids.numpy(), -np.inf, -1)
    tail -= np.logaddexp.reduce(tail, -1, keepdims=True)
    drawn_lp = np.take_along_axis(tail, t.sample_ids.astype(np.int64), -1)
    assert (drawn_lp[t.sample_counts > 0] > -25).all()
    assert (t.sample_counts.sum(-1) == 200).all()
    empty = head.targets(out.hidden_states[-1][0], k=300, draws=5, seed=3)  # no tail at all
    assert (empty.sample_counts == 0).all()
    if kind == "gemma2":  # the cap bounds the logits, so the head must have applied it
        assert float(out.logits.abs().max()) <= 2.0


def test_unknown_architecture_is_refused_in_one_line():
    from transformers import GPTBigCodeConfig

    with pytest.raises(UserError, match="'gpt_bigcode'.*generate/head.py") as e:
        check_architecture(GPTBigCodeConfig())
    assert "\n" not in str(e.value)
