"""The teacher's output head applied by softlabels, and the draws: against transformers and
against the distribution drawn from (no vLLM here; tests/test_generate.py runs the engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softlabels.data.errors import UserError
from softlabels.data.heads import TRANSFORMS, logit_transform
from softlabels.generate.head import Head, draw, unique_counts


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
    with torch.no_grad():  # logits big enough for the soft-cap to matter, or for one-hot and
        # flat positions side by side (tied: the embeddings scale the inputs too)
        model.get_output_embeddings().weight.mul_({"untied": 100, "tied": 5, "gemma2": 20}[kind])
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
    labels = np.append(ids[0, 1:].numpy(), -1)
    t = head.outputs(out.hidden_states[-1][0], k=10, labels=labels, draws=200, seed=3)
    want_lp, want_ids = ref.topk(10, -1)
    np.testing.assert_allclose(t.topk_logprobs, want_lp.numpy(), atol=2e-5)
    assert (t.topk_ids == want_ids.numpy()).mean() > 0.99  # ties may swap
    # the exact tail, relative, from one-hot to flat positions; the label's own log-prob
    tail = torch.logsumexp(ref.scatter(-1, want_ids, -torch.inf), -1).numpy()
    np.testing.assert_allclose(np.exp(t.tail_logprob.astype(np.float64)), np.exp(tail),
                               rtol=1e-3)
    np.testing.assert_allclose(-np.expm1(t.tail_logprob.astype(np.float64)), -np.expm1(tail),
                               rtol=1e-3)  # the top-k's own mass
    np.testing.assert_allclose(t.label_logprob[:-1], ref[:-1].gather(
        -1, ids[0, 1:, None])[:, 0].numpy(), atol=2e-5)
    assert np.isnan(t.label_logprob[-1])
    # the draws come from outside the top-k, renormalised, and never from ~0 mass there
    outside = ref.numpy().copy()
    np.put_along_axis(outside, want_ids.numpy(), -np.inf, -1)
    outside -= np.logaddexp.reduce(outside, -1, keepdims=True)
    drawn_lp = np.take_along_axis(outside, t.sample_ids.astype(np.int64), -1)
    assert (drawn_lp[t.sample_counts > 0] > -25).all()
    assert (t.sample_counts.sum(-1) == 200).all()
    empty = head.outputs(out.hidden_states[-1][0], k=300, labels=labels, draws=5, seed=3)
    assert (empty.sample_counts == 0).all()  # no tail at all
    if kind == "gemma2":  # the cap bounds the logits, so the head must have applied it
        assert float(out.logits.abs().max()) <= 2.0
    elif kind == "untied":  # x100 head weights: one-hot and flat positions both present
        top1 = ref.exp().max(-1).values
        assert (top1 > 0.999).any() and (top1 < 0.9).any()


# Tiny configs of every family the head knows: its transformers class, saved and read back,
# must give transformers' own logits (head transforms, and checkpoint names that transformers
# renames when loading, e.g. GPT-NeoX's embed_out and Gemma 3's multimodal wrapper).
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=128, pad_token_id=0)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16, v_head_dim=32,
           qk_nope_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
           head_dim=None)
FAMILY = {
    "deepseek_v2": MLA, "deepseek_v3": MLA,
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(num_local_experts=2, intermediate_size_mlp=128,
                        interleave_moe_layer_step=1),
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     first_k_dense_replace=1, n_group=1, topk_group=1),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32, linear_num_value_heads=2,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    "falcon_h1": dict(lm_head_multiplier=0.5, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                      mamba_n_groups=1, mamba_d_state=16),
    "gemma3n_text": dict(final_logit_softcapping=2.0, vocab_size_per_layer_input=300,
                         hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
                         num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0]),
    "cohere": dict(logit_scale=0.5), "cohere2": dict(logit_scale=0.5),
    "granite": dict(logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=4.0, num_local_experts=2, num_experts_per_tok=1),
    "granitemoehybrid": dict(logits_scaling=4.0, num_local_experts=2, num_experts_per_tok=1,
                             layer_types=["mamba", "attention"], mamba_d_state=16,
                             mamba_n_heads=8, mamba_d_head=16),
    "gemma2": dict(final_logit_softcapping=2.0), "gemma3_text": dict(final_logit_softcapping=2.0),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=2),
}


def _base(model):
    """The model under the head (`model`, or GPT-2's `transformer`)."""
    return getattr(model, "model", None) or getattr(model, model.base_model_prefix)


def _family_model(path, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**COMMON, **FAMILY.get(model_type, {})}
    config = AutoConfig.for_model(model_type, **{k: v for k, v in kw.items() if v is not None})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # logits big enough for caps and scales to matter
        model.get_output_embeddings().weight.mul_(20)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("model_type", sorted(set(TRANSFORMS) - {"gemma3"}))  # (gemma3: below)
def test_every_known_family_gives_transformers_logits(tmp_path, model_type):
    model = _family_model(tmp_path, model_type)
    ids = torch.randint(1, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # the base model's output, after the final norm: what vLLM's pooling runner returns
        h = _base(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
        got = Head(tmp_path, torch.float32).logits(h)
        want = model(ids, use_cache=False).logits[0].float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    head = model.get_output_embeddings()
    plain = torch.nn.functional.linear(h, head.weight, head.bias)
    kind, _ = TRANSFORMS[model_type]
    assert (kind == "none") == torch.allclose(plain, got, atol=1e-5)  # the transform mattered


def test_a_multimodal_wrapper_reads_its_text_head(tmp_path):
    """Gemma 3's image-text checkpoint: the head is the text model's tied embeddings, stored
    under another name than the one the loaded model uses. (No soft-cap: Gemma 3 checkpoints have
    none, and transformers' image-text forward would not apply one.)"""
    from transformers import AutoModelForCausalLM, Gemma3Config

    cfg = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, 250, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = Head(tmp_path, torch.float32).logits(
            _base(model)(input_ids=ids).last_hidden_state[0])
        want = model(input_ids=ids).logits[0].float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_architecture_is_refused_in_one_line():
    from transformers import GPTBigCodeConfig

    with pytest.raises(UserError, match="'gpt_bigcode'.*data/heads.py") as e:
        logit_transform(GPTBigCodeConfig())
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the same table, as students

@pytest.fixture(scope="module")
def vocab300(tmp_path_factory):
    """Three 16-token rows of valid random targets over a 300-id vocabulary (COMMON's)."""
    from tests.helpers import synthetic_rows, write_dataset

    d = tmp_path_factory.mktemp("v300") / "data"
    write_dataset(d, synthetic_rows(3, 300, 4, seed=3, lengths=(16, 17)), k=4, vocab=300)
    return d


@pytest.mark.parametrize("model_type", sorted(set(TRANSFORMS) - {"gemma3"}))
def test_every_known_family_trains_and_reports_its_own_logits(tmp_path, vocab300, model_type):
    """A student of each family: the CE that `train` optimises (Distiller), that the
    `transformers.Trainer` adapter optimises (DistillationTrainer, CE weight 1), that the cross
    path's head gives (label_logprobs) and that `eval` reports all equal its own transformers
    forward on the same rows. Granite divides, Cohere and Falcon-H1 multiply, Gemma caps: a head
    that skips the transform reports another CE (measured 0.102 against 4.849)."""
    from transformers import TrainingArguments

    from softlabels.data.heads import decoder_of
    from softlabels.data.reader import SoftLabelReader
    from softlabels.train_student.config import TrainConfig
    from softlabels.train_student.cross import label_logprobs
    from softlabels.train_student.evaluate import evaluate
    from softlabels.train_student.hf import DistillationTrainer, soft_label_dataset
    from softlabels.train_student.objective import SameTokenizer
    from softlabels.train_student.train import Distiller

    model = _family_model(tmp_path / "m", model_type)
    rows = list(SoftLabelReader(vocab300, shuffle=False))
    ids = torch.from_numpy(np.stack([r.input_ids for r in rows]).astype(np.int64))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.double()
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300),
                                                 ids[:, 1:].reshape(-1))
    recipe = TrainConfig(student="s", data=str(vocab300), output="o", ce_weight=1.0).recipe(
        ).for_dataset(SoftLabelReader(vocab300).manifest, str(vocab300))
    objective = SameTokenizer([recipe], 300)
    batch = objective.collate(rows, np.zeros(len(rows), np.int64))
    with torch.no_grad():
        sums = Distiller(model, objective)(batch)
        cli = sums[1, 0] / int((batch.labels >= 0).sum())
        trainer = DistillationTrainer(
            model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[],
                                                use_cpu=True, max_steps=1),
            train_dataset=soft_label_dataset(vocab300, shuffle=False), ce_weight=1.0)
        inputs = trainer.data_collator([{k: v for k, v in vars(r).items() if v is not None}
                                        for r in rows])
        hf = trainer.compute_loss(model, inputs)
        h = decoder_of(model)(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 64)

        cross = -label_logprobs(h, model.get_output_embeddings(), ids[:, 1:].reshape(-1),
                                transform=logit_transform(model.config)).mean()
    got = evaluate(model, vocab300, batch_tokens=256)["ce"]
    for name, v in (("train", cli), ("DistillationTrainer", hf), ("cross", cross),
                    ("eval", got)):
        assert float(v) == pytest.approx(float(want), rel=1e-4, abs=1e-5), name

