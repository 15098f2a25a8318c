"""`softlabels on-policy`: rounds of rollouts by the student, the teacher's scores in a batch job,
and training continued from the previous round; real vLLM, Dask, Parquet and Accelerate."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from softlabels.data.manifest import Manifest
from softlabels.data.verify import verify
from tests.helpers import corpus_texts, read_dataset, reference_targets, softlabels

STEPS, ROUNDS = 2, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_teacher):
    """The tiny teacher, a weaker student with its tokenizer, and prompts (held-out text)."""
    from transformers import AutoTokenizer

    from softlabels.demo import make_model

    d = tmp_path_factory.mktemp("onpolicy")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    make_model(d / "student", vocab_size=len(tok), hidden=64, layers=1, heads=2, seed=1)
    tok.save_pretrained(d / "student")
    with open(d / "prompts.jsonl", "w") as f:
        for t in corpus_texts(6, offset=300):
            f.write(json.dumps({"prompt": " ".join(t.split()[:8])}) + "\n")
    return tiny_teacher, d / "student", d / "prompts.jsonl"


def on_policy(models, out, dask, *extra, check=True):
    teacher, student, prompts = models
    return softlabels("on-policy", "--teacher", teacher, "--student", student, "--prompts",
                      prompts, "--rounds", ROUNDS, "--steps-per-round", STEPS, "--output", out,
                      "--max-new-tokens", 8, "--n", 2, "--top-k", 8, "--max-length", 64,
                      "--batch-tokens", 128, "--loss", "token_reverse_kl", "--ce-weight", 0,
                      "--warmup", 1, "--lr", 1e-3, "--scheduler", dask, "--eval-prompts",
                      prompts, "--eval-max-prompts", 2, *extra, check=check)


def test_rounds_write_score_train_and_resume(tmp_path, models, dask_cluster):
    """Round 1's responses are written by round 0's student (its log-probs, its checkpoint's
    hash in the manifest), scored by the teacher; training continues round 0's run (its steps,
    one learning-rate schedule); rounds.json records each round; each round answers its own 4 of
    the 6 prompts (--prompts-per-round). Rerun: nothing is redone; with round 1's training
    lost, it is redone from round 0's checkpoint, to the same numbers."""
    from softlabels.train_student.config import TrainConfig
    from softlabels.train_student.train import lr_at

    teacher, student, prompts = models
    out = tmp_path / "run"
    again_flags = ("--mix-earlier-rounds", 1, "--data-weights", 2, "--prompts-per-round", 4)
    on_policy(models, out, dask_cluster, *again_flags)
    log = json.loads((out / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in log] == list(range(ROUNDS)) and all(r["done"] for r in log)
    writers = [student, out / "round-0" / "student"]
    every = prompts.read_text().splitlines()
    hashes = []
    for r, writer in enumerate(writers):
        data = out / f"round-{r}" / "data"
        assert verify(data) == []
        m = Manifest.load(data)
        took = out / f"round-{r}" / "prompts.jsonl"  # 0-3, then 4, 5, 0, 1
        assert [json.loads(x) for x in took.read_text().splitlines()] == [
            json.loads(every[(4 * r + i) % 6]) for i in range(4)]
        assert Path(m.provenance["input"]) == took.resolve() == Path(log[r]["prompts"]).resolve()
        assert m.provenance["response_model"] == str(writer.resolve())
        hashes.append(m.provenance["response_model_sha256"])
        assert log[r]["teacher_tokens"] == m.tokens > 0
        assert log[r]["writing_s"] > 0 and log[r]["scoring_s"] > 0  # from the commit records
        rows = list(read_dataset(data).values())
        assert len(rows) == 4 * 2
        windows = [x.input_ids.tolist() for x in rows]
        # the writer's log-probs are the writer's: round 1's are round 0's student's
        for x, (_, _, _, label) in zip(rows, reference_targets(writer, windows, 4)):
            at = np.flatnonzero(x.target_mask)
            np.testing.assert_allclose(x.writer_logprob[at], label[at], atol=2e-4)
        if r:  # and not the first student's, which the worker's writer engine held before
            first = reference_targets(student, windows, 4)
            assert max(np.abs(x.writer_logprob[x.target_mask] - label[x.target_mask]).max()
                       for x, (_, _, _, label) in zip(rows, first)) > 1e-2
        assert "reverse_kl" in log[r]["eval"] and log[r]["eval"]["continuations"] == 2
    assert hashes[0] != hashes[1]
    # on the one long-lived worker round 1 scores with round 0's teacher engine; its writer
    # was reloaded in place, or built if round 0 replaced an earlier job's teacher engine (a
    # worker drops both together): the embedded test below starts from no engine
    assert list(log[1]["engines"]["teacher"]) == ["kept"]
    h0 = json.loads((out / "round-0" / "student" / "train_log.json").read_text())["history"]
    h1 = json.loads((out / "round-1" / "student" / "train_log.json").read_text())["history"]
    assert [h["step"] for h in h1] == list(range(1, ROUNDS * STEPS + 1))
    assert h1[:STEPS] == h0  # round 1 carries round 0's run on
    cfg = TrainConfig(student="s", data=("d",), output="o", lr=1e-3, warmup=1,
                      schedule_steps=ROUNDS * STEPS)
    for h in h1:  # one schedule over both rounds
        assert math.isclose(h["lr"], lr_at(h["step"] - 1, cfg, STEPS), rel_tol=1e-9)
    assert log[1]["checkpoint"].endswith(f"step-{ROUNDS * STEPS}")
    # round 1 also trains on round 0's rollouts, the round's weight shared equally
    used = json.loads((out / "round-1" / "student" / "train_log.json").read_text())["datasets"]
    assert [(d["path"], d["weight"]) for d in used] == [
        (str(out / "round-1" / "data"), 0.5), (str(out / "round-0" / "data"), 0.5)]
    assert all(d["target_tokens"] > 0 for d in used)
    for r in log:  # overhead: the round's stages less the work they did
        assert not r["resumed"]
        assert r["overhead_s"] == pytest.approx(r["generate_wall_s"] + r["train_wall_s"] - (
            r["writing_s"] + r["scoring_s"] + r["train_steps_s"]))

    before = (out / "rounds.json").read_text()
    p = on_policy(models, out, dask_cluster, *again_flags)
    assert "rollouts" not in p.stderr and "training" not in p.stderr
    assert (out / "rounds.json").read_text() == before

    shutil.rmtree(out / "round-1" / "student")  # a kill during round 1's training
    rounds = json.loads(before)
    rounds["rounds"][1]["done"] = False
    (out / "rounds.json").write_text(json.dumps(rounds))
    p = on_policy(models, out, dask_cluster, *again_flags)
    assert "round 1: training" in p.stderr and "rollouts" not in p.stderr
    again = json.loads((out / "round-1" / "student" / "train_log.json").read_text())["history"]
    assert [h["loss"] for h in again] == pytest.approx([h["loss"] for h in h1], rel=1e-5)
    r1 = json.loads((out / "rounds.json").read_text())["rounds"][1]
    assert r1["resumed"]  # its rollouts took no time in this run: not subtracted
    assert r1["overhead_s"] == pytest.approx(r1["generate_wall_s"] + r1["train_wall_s"]
                                             - r1["train_steps_s"])


def test_embedded_rounds_share_one_cluster_and_its_engines(tmp_path, models):
    """Without --scheduler one embedded cluster serves every round: round 1 starts no engine (the
    teacher's is kept, the writer's takes round 0's student's weights in place), and the
    reloaded writer's log-probs are that student's, not the first one's."""
    import re

    teacher, student, prompts = models
    out = tmp_path / "run"
    p = softlabels("on-policy", "--teacher", teacher, "--student", student, "--prompts",
                   prompts, "--rounds", 2, "--steps-per-round", STEPS, "--output", out,
                   "--max-new-tokens", 8, "--n", 2, "--top-k", 8, "--max-length", 64,
                   "--batch-tokens", 128, "--warmup", 1, "--lr", 1e-3)
    dashboards = re.findall(r"Dask dashboard: (\S+)", p.stderr)
    assert len(dashboards) == 2 and len(set(dashboards)) == 1, p.stderr[-2000:]
    log = json.loads((out / "rounds.json").read_text())["rounds"]
    assert set(log[0]["engines"]["writer"]) <= {"built", "kept"}
    writer, scorer = log[1]["engines"]["writer"], log[1]["engines"]["teacher"]
    assert writer["reloaded"] == 1 and set(writer) <= {"reloaded", "kept"}
    assert list(scorer) == ["kept"]
    assert log[1]["engine_starts_s"] < log[0]["engine_starts_s"] / 5
    rows = list(read_dataset(out / "round-1" / "data").values())
    windows = [x.input_ids.tolist() for x in rows]
    for who, near in ((out / "round-0" / "student", True), (student, False)):
        gap = max(np.abs(x.writer_logprob[x.target_mask] - label[x.target_mask]).max()
                  for x, (_, _, _, label) in zip(rows, reference_targets(who, windows, 4)))
        assert (gap < 2e-4) == near, (who, gap)


def test_earlier_rounds_take_the_rounds_per_dataset_values():
    """Round r's datasets are (round r, the earlier rounds, --mix): per-dataset values given for
    (round, --mix) are repeated for the earlier rounds, the round's weight split among them."""
    import argparse

    from softlabels.on_policy import add_arguments, round_train_flags

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--teacher", "t", "--student", "s", "--prompts", "p", "--rounds", "3",
            "--steps-per-round", "1", "--output", "o", "--mix", "m1", "m2"]
    args = p.parse_args(base + ["--data-weights", "3", "1", "1", "--ce-weight", "0", "0.5",
                                "0.25", "--targets", "topk", "auto", "both", "--loss",
                                "reverse_kl", "forward_kl", "jsd", "--lr", "1e-4"])
    flags = round_train_flags(args, 2)
    assert flags[flags.index("--data-weights") + 1:][:5] == ["1.0", "1.0", "1.0", "1.0", "1.0"]
    assert flags[flags.index("--ce-weight") + 1:][:5] == ["0.0", "0.0", "0.0", "0.5", "0.25"]
    assert flags[flags.index("--targets") + 1:][:5] == ["topk", "topk", "topk", "auto", "both"]
    assert flags[flags.index("--loss") + 1:][:5] == ["reverse_kl"] * 3 + ["forward_kl", "jsd"]
    assert flags[flags.index("--lr") + 1] == "0.0001"
    plain = round_train_flags(args, 0)
    assert plain[plain.index("--data-weights") + 1:][:3] == ["3.0", "1.0", "1.0"]
    # one value for every dataset stays one value
    args = p.parse_args(base + ["--ce-weight", "0.5"])
    flags = round_train_flags(args, 2)
    i = flags.index("--ce-weight")
    assert flags[i + 1] == "0.5" and (i + 2 == len(flags) or flags[i + 2].startswith("--"))
    assert "--data-weights" not in flags  # by target tokens: earlier rounds join by theirs


def test_rounds_store_the_top_256_unless_told():
    """The rounds' --top-k is 256 unless given (a student's own continuations spread past the
    teacher's top-64); a given one is passed on alone."""
    import argparse

    from softlabels.on_policy import add_arguments, round_generate_flags

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--teacher", "t", "--student", "s", "--prompts", "p", "--rounds", "1",
            "--steps-per-round", "1", "--output", "o"]
    flags = round_generate_flags(p.parse_args(base))
    assert flags[flags.index("--top-k") + 1] == "256" and flags.count("--top-k") == 1
    flags = round_generate_flags(p.parse_args(base + ["--top-k", "8", "--n", "2"]))
    assert flags.count("--top-k") == 1 and flags[flags.index("--top-k") + 1] == "8"
    assert flags[flags.index("--n") + 1] == "2"


def test_a_round_takes_the_next_prompts_each_once(tmp_path):
    """--prompts-per-round K: round r answers records r*K ... r*K + K - 1 of any input generate
    reads (here Parquet chat messages), wrapping around, never one twice in a round; the file is
    written once (a resumed round reads the same); 0 passes --prompts on as it is."""
    import argparse

    import pyarrow as pa
    import pyarrow.parquet as pq

    from softlabels.on_policy import add_arguments, round_prompts

    chats = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    pq.write_table(pa.table({"chat": chats}), tmp_path / "p.parquet")
    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--teacher", "t", "--student", "s", "--prompts", str(tmp_path / "p.parquet"),
            "--messages-column", "chat", "--rounds", "3", "--steps-per-round", "1",
            "--output", str(tmp_path / "o")]

    def took(r, k):
        args = p.parse_args(base + ["--prompts-per-round", str(k)])
        path = round_prompts(args, r, tmp_path / f"o{k}")
        return [json.loads(x)["chat"][0]["content"][-1] for x in open(path)]

    assert [took(r, 2) for r in range(3)] == [["0", "1"], ["2", "3"], ["4", "0"]]
    assert took(1, 7) == ["2", "3", "4", "0", "1"]  # 7 > 5: each once, from 7 mod 5
    (tmp_path / "o2" / "round-0" / "prompts.jsonl").write_text('{"chat": "kept"}\n')
    assert open(round_prompts(p.parse_args(base + ["--prompts-per-round", "2"]), 0,
                              tmp_path / "o2")).read() == '{"chat": "kept"}\n'
    assert round_prompts(p.parse_args(base), 0, tmp_path / "o0") == str(tmp_path / "p.parquet")


def test_the_trainer_imports_what_the_first_round_loads_and_no_student_stops_it(models, tmp_path):
    """The training process imports the student's model code, Accelerate, TensorBoard and
    matplotlib before round 0's training (a fresh interpreter: none of them is there before);
    a student it cannot read ahead (no folder, a broken config) is left to `train` to report."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text("{not json")
    code = ("import sys; from softlabels.on_policy import _preload; "
            "mods = ['transformers.models.llama.modeling_llama', 'accelerate', "
            "'torch.utils.tensorboard', 'matplotlib.pyplot']; "
            "before = [m for m in mods if m in sys.modules]; "
            "[_preload(s) for s in sys.argv[1:]]; "
            "print(before, [m for m in mods if m not in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path), "org/no-such-model",
                        str(models[1])], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[] []", p.stdout + p.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--rounds", 0], "--rounds and --steps-per-round"),
    (["--lr", -1, "--batch-tokens", 0], "--batch-tokens"),
    (["--student", "/nonexistent"], "--student /nonexistent does not exist"),
    (["--data-weights", 1, 2], "--data-weights"),
    (["--mix-earlier-rounds", -1], "--mix-earlier-rounds must be >= 0"),
    (["--prompts-per-round", -2], "--prompts-per-round must be >= 0"),
])
def test_bad_flags_are_one_line_before_any_round(tmp_path, models, flags, needle):
    teacher, student, prompts = models
    p = softlabels("on-policy", "--teacher", teacher, "--student", student, "--prompts",
                   prompts, "--rounds", 1, "--steps-per-round", 1, "--output", tmp_path / "o",
                   *flags, check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert needle in p.stderr, p.stderr
    assert not (tmp_path / "o" / "round-0").exists()
