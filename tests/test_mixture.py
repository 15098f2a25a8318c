"""Several soft-label datasets in one training: proportions, order, a recipe per dataset,
evaluation per dataset, exact resume, and refusals (real `softlabels train`, real Parquet)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from softlabels.data.errors import UserError
from softlabels.train_student.batches import EpochPlan, collate
from softlabels.train_student.mixture import Mixture
from tests.helpers import REPO, dask_env, softlabels, synthetic_rows, write_dataset

VOCAB = 512  # the tiny teacher's tokenizer
STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
           "head_dim": 32, "max_position_embeddings": 256, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def sets(tmp_path_factory, tiny_teacher):
    """Three datasets of one tokenizer: a and b top-8 (b's rows longer), c 16 draws only."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("mix")
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(d / "tok")
    out = {"a": write_dataset(d / "a", synthetic_rows(60, VOCAB, 8, 1), 8, VOCAB,
                              tokenizer=d / "tok", shards=2),
           "b": write_dataset(d / "b", synthetic_rows(40, VOCAB, 8, 2, lengths=(20, 60)), 8,
                              VOCAB, tokenizer=d / "tok"),
           "c": write_dataset(d / "c", synthetic_rows(30, VOCAB, 0, 3, draws=16), 0, VOCAB,
                              draws=16, tokenizer=d / "tok")}
    (d / "student.json").write_text(json.dumps(STUDENT))
    return out


def _shares(mix: Mixture, epochs: int, batch_tokens: int) -> np.ndarray:
    """(steps, datasets) target tokens per step over `epochs` epochs."""
    steps = []
    for e in range(epochs):
        plan = EpochPlan.make(mix.index(e), batch_tokens, 1, mix.source(e))
        steps += [plan.by_source(m, len(mix.readers))[0] for m in range(plan.micro_batches)]
    return np.array(steps, np.float64)


def test_proportions_hold_in_every_window_of_100_steps(sets):
    """Weights 0.2/0.2/0.6: over every 100 consecutive steps each dataset's share of the target
    tokens is within 1 % of its weight; the small dataset repeats (6.6 passes an epoch), each
    pass in a new order; the largest weighted one (b) is gone through once per epoch."""
    mix = Mixture([sets["a"], sets["b"], sets["c"]], [1, 1, 3])
    np.testing.assert_allclose(mix.weights, [0.2, 0.2, 0.6])
    steps = _shares(mix, 3, 96)
    assert len(steps) > 200
    window = np.lib.stride_tricks.sliding_window_view(steps, 100, axis=0).sum(-1)  # (W, D)
    share = window / window.sum(1, keepdims=True)
    assert np.abs(share - mix.weights).max() < 0.01, np.abs(share - mix.weights).max(0)
    seen = mix.seen(1)
    assert seen[1] == pytest.approx(1.0) and 6 < seen[2] < 7
    idx, src = mix.index(0), mix.source(0)
    key = idx.shard * 10**6 + idx.group * 1000 + idx.local  # names a row of its dataset
    c = key[src == 2]  # c's rows in the order they come
    passes = [c[i * 30:(i + 1) * 30] for i in range(6)]
    assert all(sorted(p.tolist()) == sorted(passes[0].tolist()) for p in passes)  # whole passes
    assert len({tuple(p) for p in passes}) == 6  # each in its own order
    b = key[src == 1]
    assert len(b) == 40 and len(set(b.tolist())) == 40  # b: once, every row


def test_order_is_the_seeds_and_one_dataset_is_its_reader(sets):
    """A mixture's order depends on the seed alone; the default weights follow the datasets'
    sizes and go through each once per epoch; a mixture of one is that dataset's reader."""
    from softlabels.data.reader import SoftLabelReader

    folders = [sets["a"], sets["b"], sets["c"]]
    one, two = Mixture(folders, seed=5), Mixture(folders, seed=5)
    for e in (0, 1):
        assert np.array_equal(one.source(e), two.source(e))
        assert np.array_equal(one.index(e).local, two.index(e).local)
    assert not np.array_equal(Mixture(folders, seed=6).source(0), one.source(0))
    np.testing.assert_allclose(one.seen(1), [1, 1, 1])
    np.testing.assert_allclose(one.weights, one.target_tokens / one.target_tokens.sum())
    alone, reader = Mixture([sets["a"]], seed=3), SoftLabelReader(sets["a"], shuffle=True, seed=3)
    for e in (0, 2):
        for f in ("shard", "group", "local", "kd_positions"):
            assert np.array_equal(getattr(alone.index(e), f), getattr(reader.index(e), f))


def tiny_student():
    """STUDENT over the tiny teacher's vocabulary, seeded (the same weights in every test)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(STUDENT, vocab_size=VOCAB)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def test_a_mixed_batch_is_each_dataset_with_its_recipe(sets):
    """A top-k dataset and a draws dataset in one batch: each position trains with its own
    dataset's recipe (label residual + 0.5 CE on the top-k, the draws with no CE), and the sums
    equal those of each dataset's rows computed apart."""
    from softlabels.data.manifest import Manifest
    from softlabels.train_student.config import Recipe
    from softlabels.train_student.train import Distiller

    mix = Mixture([sets["a"], sets["c"]])
    recipes = [Recipe().for_dataset(Manifest.load(f), f) for f in mix.folders]
    assert [(r.targets, r.ce_weight) for r in recipes] == [("topk", 0.5), ("samples", 0.0)]
    rows, src = mix.read(0, np.arange(12))
    assert set(src.tolist()) == {0, 1}
    model = tiny_student()
    targets = [r.targets for r in recipes]
    kd, ce = Distiller(model, recipes, chunk=7)(collate(rows, VOCAB, targets, src))
    for d in (0, 1):
        mine = [r for r, s in zip(rows, src) if s == d]
        kd_d, ce_d = Distiller(model, [recipes[d]])(collate(mine, VOCAB, targets[d]))
        torch.testing.assert_close(kd[d], kd_d[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce[d], ce_d[0], rtol=1e-5, atol=1e-6)


def test_each_dataset_trains_with_its_own_loss(sets):
    """`--loss reverse_kl forward_kl`: the first dataset's positions take reverse KL, the
    second's forward KL (on-policy rollouts beside a corpus), each equal to its rows' sums
    computed apart with that loss alone, and the first's differs from its forward KL."""
    from softlabels.data.manifest import Manifest
    from softlabels.train_student.config import TrainConfig
    from softlabels.train_student.train import Distiller

    mix = Mixture([sets["a"], sets["b"]])
    cfg = TrainConfig(student="-", data=tuple(map(str, mix.folders)), output="-",
                      loss=("reverse_kl", "forward_kl"))
    recipes = [cfg.recipe(i).for_dataset(Manifest.load(f), f) for i, f in enumerate(mix.folders)]
    assert [r.loss for r in recipes] == ["reverse_kl", "forward_kl"]
    rows, src = mix.read(0, np.arange(16))
    assert set(src.tolist()) == {0, 1}
    model = tiny_student()
    targets = [r.targets for r in recipes]
    kd, _ = Distiller(model, recipes, chunk=7)(collate(rows, VOCAB, targets, src))
    for d, other in ((0, "forward_kl"), (1, "reverse_kl")):
        mine = [r for r, s in zip(rows, src) if s == d]
        kd_d, _ = Distiller(model, [recipes[d]])(collate(mine, VOCAB, targets[d]))
        torch.testing.assert_close(kd[d], kd_d[0], rtol=1e-5, atol=1e-6)
        swapped = replace(recipes[d], loss=other)
        kd_o, _ = Distiller(model, [swapped])(collate(mine, VOCAB, targets[d]))
        assert abs(kd_o[0].item() - kd[d].item()) > 1e-3 * abs(kd[d].item())
    with pytest.raises(UserError, match="--loss takes one value, or one per --data"):
        TrainConfig(student="-", data=("a", "b"), output="-", loss=("reverse_kl",) * 3)


def train(sets, out, *extra, check=True):
    return softlabels("train", "--student", sets["a"].parent / "student.json", "--output", out,
                      "--lr", "3e-3", "--warmup", "2", "--batch-tokens", 96, *extra, check=check)


def test_train_on_a_mixture_and_evaluate_each_dataset(tmp_path, sets):
    """`softlabels train --data a b c --data-weights ...`: the log records each dataset's weight
    and what was consumed (its share of the target tokens within one row of the weight, every
    row decoded once), the config each dataset's resolved recipe; --eval-data a c evaluates
    each apart and their token-weighted mean, equal to `softlabels eval --data a c`."""
    out = tmp_path / "s"
    train(sets, out, "--data", sets["a"], sets["b"], sets["c"], "--data-weights", 5, 3, 2,
          "--epochs", 1, "--eval-data", sets["a"], sets["c"], "--eval-every", 10)
    log = json.loads((out / "train_log.json").read_text())
    used = json.loads((out / "train_config.json").read_text())
    assert used["targets"] == ["topk", "topk", "samples"] and used["ce_weight"] == [0.5, 0.5, 0]
    ds = log["datasets"]
    assert [d["weight"] for d in ds] == pytest.approx([0.5, 0.3, 0.2])
    got = np.array([d["target_tokens"] for d in ds], np.float64)
    assert got.sum() == log["tokens"]
    assert np.abs(got / got.sum() - [0.5, 0.3, 0.2]).max() < 60 / got.sum()  # one row or less
    # the rows the readers decoded: every row of the epoch once (one process, no read-ahead
    # past the epoch's end)
    assert sum(d["rows"] for d in ds) == sum(log["rows_decoded_per_process"])
    assert ds[1]["passes"] == pytest.approx(1.0)  # b is the one the epoch is counted on
    per_step = np.array([h["targets_by_dataset"] for h in log["history"]])
    assert (per_step.sum(0) == got).all()
    last = log["evals"][-1]
    assert set(last["datasets"]) == {"a", "c"} and last["step"] == log["steps"] > 40
    alone = json.loads(softlabels("eval", "--model", out, "--data", sets["a"], sets["c"],
                                  "--json").stdout)
    assert [r["data"] for r in alone] == [str(sets["a"]), str(sets["c"])]
    for name, r in zip(("a", "c"), alone):
        for k in ("ce", "kl_topk", "top1_agreement", "teacher_ce", "tokens"):
            if r[k] is None:  # (c has draws only: no top-k KL; a has no draws)
                assert last["datasets"][name][k] is None, (name, k)
                continue
            assert last["datasets"][name][k] == pytest.approx(r[k], rel=1e-5), (name, k)
    assert alone[0]["kl_topk"] is not None and alone[1]["teacher_ce"] is not None
    ce_tokens = [r["ce_tokens"] for r in alone]
    assert last["ce"] == pytest.approx(np.average([r["ce"] for r in alone], weights=ce_tokens),
                                       rel=1e-5)
    assert (out / "curves.png").stat().st_size > 10000


def test_killed_mixture_resumes_where_it_stopped(tmp_path, sets):
    """kill -9 mid-run, then --resume: the same steps, consumption and final loss as a run that
    was never interrupted (the mixture's position is the checkpoint's row)."""
    args = ["--data", sets["a"], sets["b"], sets["c"], "--data-weights", 1, 1, 3, "--epochs", 2,
            "--save-every", 3]
    train(sets, tmp_path / "whole", *args)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "softlabels", "train", "--student",
           sets["a"].parent / "student.json", "--output", out, "--lr", "3e-3", "--warmup", "2",
           "--batch-tokens", 96, *args]
    p = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=dask_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ck.is_dir() and len(list(ck.glob("step-*"))) >= 2):
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "model.safetensors").exists()
    train(sets, out, *args, "--resume")
    a, b = (json.loads((d / "train_log.json").read_text()) for d in (out, tmp_path / "whole"))
    assert a["steps"] == b["steps"] and a["tokens"] == b["tokens"]
    assert a["datasets"] == b["datasets"]
    np.testing.assert_allclose(a["final_loss"], b["final_loss"], rtol=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" /
                                                             "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights, needle", [
    ((1, 2), "has 2 values for 3 --data folders"),
    ((1, -1, 1), "must be finite and >= 0"),
    ((0, 0, 0), "all zero"),
])
def test_bad_weights_are_refused_in_one_line(tmp_path, sets, weights, needle):
    p = train(sets, tmp_path / "s", "--data", sets["a"], sets["b"], sets["c"], "--data-weights",
              *weights, "--max-steps", 1, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert needle in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_a_recipe_a_dataset_cannot_serve_names_it(tmp_path, sets):
    p = train(sets, tmp_path / "s", "--data", sets["a"], sets["c"], "--targets", "topk",
              "--max-steps", 1, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert f"{sets['c']} has no top-k" in last, last
    p = train(sets, tmp_path / "s", "--data", sets["a"], sets["c"], "--targets", "topk",
              "samples", "both", "--max-steps", 1, check=False)
    assert "--targets takes one value, or one per --data (2)" in p.stderr.strip().splitlines()[-1]


def test_the_trainer_adapter_mixes_as_the_cli_does(tmp_path, sets):
    """soft_label_dataset([a, c], weights) + DistillationTrainer: each dataset's recipe as the
    CLI resolves it, and the stream follows the mixture's order."""
    from transformers import TrainingArguments

    from softlabels.train_student.config import TrainConfig
    from softlabels.train_student.hf import DistillationTrainer, soft_label_dataset

    model = tiny_student()
    ds = soft_label_dataset([sets["a"], sets["c"]], weights=[3, 1], seed=4)
    trainer = DistillationTrainer(
        model=model, train_dataset=ds, args=TrainingArguments(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
            use_cpu=True, save_strategy="no"))
    cli = TrainConfig(student="-", data=(str(sets["a"]), str(sets["c"])), output="-")
    from softlabels.data.manifest import Manifest

    assert trainer.recipes == [cli.recipe(i).for_dataset(Manifest.load(f), f)
                               for i, f in enumerate(cli.data)]
    first = [e["source"] for _, e in zip(range(40), ds)]
    mix = Mixture([sets["a"], sets["c"]], [3, 1], seed=4)
    assert first == mix.source(0)[:40].tolist()
    trainer.train()
    assert trainer.state.global_step == 3


def test_extreme_weights_start_in_time_bounded_by_the_rows(sets):
    """Weights that overflow a sum (1e308 1e308), that underflow (1 1e-300) and a plausible skew
    (0.999999 0.000001: a million passes over the first dataset before, killed at 1 GB): each
    mixture's epoch holds at most MAX_EPOCH times the datasets' target tokens, in its
    proportions."""
    from softlabels.train_student.mixture import MAX_EPOCH

    for weights in ((1e308, 1e308), (1, 1e-300), (0.999999, 0.000001), (0.000001, 0.999999)):
        mix = Mixture([sets["a"], sets["b"]], weights, seed=0)
        assert np.isfinite(mix.weights).all() and abs(mix.weights.sum() - 1) < 1e-12
        idx = mix.index(0)
        assert 0 < idx.kd_positions.sum() <= MAX_EPOCH * mix.target_tokens.sum() + 200, weights
        got = np.bincount(mix.source(0), weights=idx.kd_positions, minlength=2)
        np.testing.assert_allclose(got / got.sum(), mix.weights, atol=0.01)


@pytest.mark.parametrize("change, needle", [
    (["--data-weights", 1, 2, 3], "--data-weights"),
    (["--seed", 7], "--seed (0 -> 7)"),
    (["--batch-tokens", 64], "--batch-tokens (96 -> 64)"),
    (["--data", "a", "c", "b"], "the datasets"),
])
def test_resume_refuses_a_run_it_cannot_continue_exactly(tmp_path, sets, change, needle):
    """Other weights trained rows twice and others never and recorded the new weights for the
    whole run; other data ended in an IndexError. Each is one line naming what changed."""
    base = ["--data", sets["a"], sets["b"], sets["c"], "--data-weights", 1, 1, 3]
    out = tmp_path / "run"
    train(sets, out, *base, "--max-steps", 2, "--save-every", 2)
    if change[0] == "--data":
        change = ["--data", *(sets[n] for n in change[1:])]
    args = base + change if change[0] != "--data" else change + base[4:]
    p = train(sets, out, *args, "--max-steps", 4, "--resume", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "--resume from" in last and needle in last and "changed" in last, last
    assert json.loads((out / "train_log.json").read_text())["steps"] == 2  # nothing trained


def test_the_same_dataset_twice_is_refused_and_eval_names_stay_apart(tmp_path, sets):
    import shutil

    from softlabels.train_student.evaluate import names_of

    p = train(sets, tmp_path / "s", "--data", sets["a"], str(sets["a"]) + "/", "--max-steps", 1,
              check=False)
    assert p.returncode == 2 and "names" in p.stderr and "twice" in p.stderr, p.stderr
    # x/held/data and y/held/data: two held-out sets, two names (one overwrote the other)
    for parent in ("x", "y"):
        shutil.copytree(sets["a"] if parent == "x" else sets["b"], tmp_path / parent / "held" /
                        "data")
    folders = [tmp_path / "x" / "held" / "data", tmp_path / "y" / "held" / "data"]
    assert names_of(folders) == ["x/held/data", "y/held/data"]
    assert names_of([tmp_path / "a" / "data", tmp_path / "b" / "data"]) == ["a/data", "b/data"]
    out = tmp_path / "t"
    train(sets, out, "--data", sets["a"], "--eval-data", *folders, "--max-steps", 1)
    evals = json.loads((out / "train_log.json").read_text())["evals"][-1]
    assert {"x/held/data", "y/held/data"} <= set(evals["datasets"]), evals
