"""On-policy distillation in batch rounds against off-policy KD at equal teacher tokens (issue 32).

The confident teacher is bench/granularity.py's (a random Llama over 1,500 words, its head scaled
so its mean top-1 is 0.60 on its samples; the corpus sampled from it: the truth), not
bench/confident.py's, whose 600-step teacher and sampled corpus take an hour to make here.
Prompts are the first 8 words of its samples (training: the train split; eval: held-out),
rendered as their own text: the teacher's copy here has a content-only chat template, since the
plain render's newline is no word of its tokenizer. Every row starts from the same warm student
(the granularity bench's body, 2,400 steps of KD on its corpus dataset: on-policy starts from a
student that writes something, and one that has learnt its own data, so that no row gains by
merely training it on: after 600 steps, held-out bits/byte 0.947 instead of 0.743, any further
training moved it, BENCHMARKS.md) and trains the same steps on the same number of teacher-scored
tokens:

  CE on the teacher's responses       SFT: `generate --generate-responses` by the teacher, n = 4
  KD on the teacher's responses       the same dataset, the default recipe (top-64, label, 0.5 CE)
  KD on the corpus                    corpus records of as many tokens, the default recipe
  on-policy R=r <loss>                `softlabels on-policy`, r rounds of 4/r responses per prompt
                                      (the teacher's top-64 unless the row says otherwise)
  <on-policy row>, then S steps ...   that row's student, then KD (`train`) on data it has

Rows spend 40.8k teacher tokens unless their names say "4x" or "16x the teacher tokens" (then
more prompts, responses and steps on both sides); the last column compares each row with the best
off-policy row at its own budget. `--plot PNG` draws every row's reverse KL against its
bits/byte, the trade the table hides.

Columns: the exact reverse KL to the teacher on the student's own continuations of held-out
prompts and the teacher's NLL of them (`softlabels eval --teacher --prompts`), held-out
bits/byte of the corpus, the teacher tokens scored, wall time; for on-policy rows the share of
each round spent on anything but writing, scoring and training steps (engine and process
starts, planning, bookkeeping).

    python bench/on_policy.py [--seeds 0 1 2] [--only ROW ...]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
PROMPTS, N, NEW, WORDS_IN_PROMPT = 256, 4, 32, 8
STEPS, WARM_STEPS, BATCH = 120, 2400, 2048
ROUNDS_OVERHEAD = 3  # --overhead: round 0 builds the engines, the others show a steady round
ON_POLICY = {"on-policy": "^", "then-kd": "s"}  # kinds whose student wrote some of its data:
# their marker in --plot (every other kind is off-policy, "o")
CONTENT_ONLY = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
TRAIN = ["--lr", "1e-3", "--warmup", 10, "--batch-tokens", BATCH]
# reverse KL over the top-256 on the student's rollouts (n = 1 a round) and on the teacher's
# responses (n = 2, top-256): half the teacher tokens each, sampled by --data-weights
MIXED_256 = ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF_K256", "--n", 1,
             "--top-k", 256]
# MIXED_256 and the warm student's own dataset replayed with its recipe (KD: forward KL, CE 0.5)
REPLAY_256 = ["--loss", "reverse_kl", "reverse_kl", "forward_kl", "--ce-weight", 0, 0, 0.5,
              "--mix", "HALF_K256", "WARM", "--n", 1, "--top-k", 256]


def scaled(half: str, prompts: str, steps_per_round: int, *flags) -> list:
    """REPLAY_256's recipe at 2:1:1 and lr 3e-4 (the best at 1x) with a larger budget's teacher
    responses (`half`), prompts and steps."""
    return ["--loss", "reverse_kl", "reverse_kl", "forward_kl", "--ce-weight", 0, 0, 0.5, "--mix",
            half, "WARM", "--n", 1, "--top-k", 256, "--data-weights", 2, 1, 1, "--prompts",
            prompts, "--lr", "3e-4", "--steps-per-round", steps_per_round, *flags]


ONP_3000 = ("on-policy R=4 on 2,048 prompts, reverse KL (top-256), + the teacher's responses to "
            "2,048 prompts + the warm student's corpus 3:1:1 (KD on it), lr 3e-4, 3,000 steps, "
            "16x the teacher tokens")
ROWS = {  # name: (kind, rounds, extra train flags; "then-kd": [on-policy row, steps, flags])
    "CE on the teacher's responses": ("teacher", 0, ["--ce-weight", 1]),
    "KD on the teacher's responses": ("teacher", 0, []),
    "KD on the corpus": ("corpus", 0, []),
    "on-policy R=1, token reverse KL": ("on-policy", 1, ["--loss", "token_reverse_kl",
                                                         "--ce-weight", 0]),
    "on-policy R=2, token reverse KL": ("on-policy", 2, ["--loss", "token_reverse_kl",
                                                         "--ce-weight", 0]),
    "on-policy R=4, token reverse KL": ("on-policy", 4, ["--loss", "token_reverse_kl",
                                                         "--ce-weight", 0]),
    "on-policy R=2, forward KL (top-64)": ("on-policy", 2, ["--loss", "forward_kl",
                                                            "--ce-weight", 0]),
    "on-policy R=2, reverse KL (top-64 + tail)": ("on-policy", 2, ["--loss", "reverse_kl",
                                                                   "--ce-weight", 0]),
    "on-policy R=1, reverse KL (top-64 + tail)": ("on-policy", 1, ["--loss", "reverse_kl",
                                                                   "--ce-weight", 0]),
    "on-policy R=4, reverse KL (top-64 + tail)": ("on-policy", 4, ["--loss", "reverse_kl",
                                                                   "--ce-weight", 0]),
    # half the teacher tokens on the student's responses (n = 1 a round), half on the
    # teacher's own (n = 2): equal teacher tokens again
    "on-policy R=2, reverse KL, + the teacher's responses 1:1": (
        "on-policy", 2, ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF",
                         "--data-weights", 1, 1, "--n", 1]),
    # the same tokens, sampled 2:1 and 1:2 (student's : teacher's) in training
    "on-policy R=2, reverse KL, + the teacher's responses, weights 2:1": (
        "on-policy", 2, ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF",
                         "--data-weights", 2, 1, "--n", 1]),
    "on-policy R=2, reverse KL, + the teacher's responses, weights 1:2": (
        "on-policy", 2, ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF",
                         "--data-weights", 1, 2, "--n", 1]),
    # CE on the teacher's tokens (SFT on its responses), none on the student's own
    "on-policy R=2, reverse KL, + the teacher's responses 1:1 with CE 0.5 on them": (
        "on-policy", 2, ["--loss", "reverse_kl", "--ce-weight", 0, 0.5, "--mix", "HALF",
                         "--data-weights", 1, 1, "--n", 1]),
    # four fresher rollouts of half the prompts (n = 1 a round), the same tokens as R=2's
    "on-policy R=4 on 128 prompts, reverse KL, + the teacher's responses, weights 2:1": (
        "on-policy", 4, ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF",
                         "--data-weights", 2, 1, "--n", 1, "--prompts", "HALF_PROMPTS"]),
    "on-policy R=4 on 128 prompts, earlier rounds mixed in, + the teacher's responses 2:1": (
        "on-policy", 4, ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF",
                         "--data-weights", 2, 1, "--n", 1, "--prompts", "HALF_PROMPTS",
                         "--mix-earlier-rounds", 3]),
    # the learning rate of both sides (the others train at 1e-3)
    "KD on the teacher's responses, lr 2e-3": ("teacher", 0, ["--lr", "2e-3"]),
    "KD on the teacher's responses, lr 3e-3": ("teacher", 0, ["--lr", "3e-3"]),
    "on-policy R=2, reverse KL, + the teacher's responses 1:2, lr 2e-3": (
        "on-policy", 2, ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF",
                         "--data-weights", 1, 2, "--n", 1, "--lr", "2e-3"]),
    "on-policy R=2, reverse KL, + the teacher's responses 1:2, lr 3e-3": (
        "on-policy", 2, ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF",
                         "--data-weights", 1, 2, "--n", 1, "--lr", "3e-3"]),
    # a quarter of the teacher tokens each on the teacher's responses and on the corpus (n = 1
    # a round of the student's: half)
    "on-policy R=2, reverse KL, + the teacher's responses + the corpus 2:1:1, CE 0.5 on both": (
        "on-policy", 2, ["--loss", "reverse_kl", "--ce-weight", 0, 0.5, 0.5, "--mix", "QUARTER",
                         "CORPUS_QUARTER", "--data-weights", 2, 1, 1, "--n", 1]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses + the corpus "
    "2:1:1, CE 0.5 on both": (
        "on-policy", 4, ["--loss", "reverse_kl", "--ce-weight", 0, 0.5, 0.5, "--mix", "QUARTER",
                         "CORPUS_QUARTER", "--data-weights", 2, 1, 1, "--n", 1, "--top-k", 256,
                         "--prompts", "HALF_PROMPTS"]),
    # each dataset its own loss: reverse KL on the student's responses, the default KD
    # (forward KL + 0.5 CE) on the teacher's and the corpus
    "on-policy R=2, reverse KL, + KD on the teacher's responses 1:2": (
        "on-policy", 2, ["--loss", "reverse_kl", "forward_kl", "--ce-weight", 0, 0.5, "--mix",
                         "HALF", "--data-weights", 1, 2, "--n", 1]),
    "on-policy R=2, reverse KL, + KD on the teacher's responses + the corpus 2:1:1": (
        "on-policy", 2, ["--loss", "reverse_kl", "forward_kl", "forward_kl", "--ce-weight", 0,
                         0.5, 0.5, "--mix", "QUARTER", "CORPUS_QUARTER", "--data-weights", 2,
                         1, 1, "--n", 1]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + KD on the teacher's responses + the "
    "corpus 2:1:1": (
        "on-policy", 4, ["--loss", "reverse_kl", "forward_kl", "forward_kl", "--ce-weight", 0,
                         0.5, 0.5, "--mix", "QUARTER", "CORPUS_QUARTER", "--data-weights", 2,
                         1, 1, "--n", 1, "--top-k", 256, "--prompts", "HALF_PROMPTS"]),
    # the teacher's top-256 stored instead of its top-64, on both sides
    "KD on the teacher's responses, top-256": ("teacher-k256", 0, []),
    "KD on the teacher's responses, top-256, lr 3e-3": ("teacher-k256", 0, ["--lr", "3e-3"]),
    "on-policy R=2, reverse KL (top-256 + tail)": ("on-policy", 2, [
        "--loss", "reverse_kl", "--ce-weight", 0, "--top-k", 256]),
    "on-policy R=2, reverse KL (top-256 + tail), + the teacher's responses 1:2": (
        "on-policy", 2, [*MIXED_256, "--data-weights", 1, 2]),
    # nearly the whole vocabulary (1,500 words): the exact reverse KL's ceiling
    "on-policy R=2, reverse KL (top-1024 + tail), + the teacher's responses 1:2": (
        "on-policy", 2, ["--loss", "reverse_kl", "--ce-weight", 0, "--mix", "HALF_K256",
                         "--data-weights", 1, 2, "--n", 1, "--top-k", 1024]),
    # fresher rollouts, a higher rate, an even mix: around the best row
    "on-policy R=4, reverse KL (top-256 + tail)": ("on-policy", 4, [
        "--loss", "reverse_kl", "--ce-weight", 0, "--top-k", 256]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses 1:2": (
        "on-policy", 4, [*MIXED_256, "--data-weights", 1, 2, "--prompts", "HALF_PROMPTS"]),
    "on-policy R=8 on 64 prompts, reverse KL (top-256), + the teacher's responses 1:2": (
        "on-policy", 8, [*MIXED_256, "--data-weights", 1, 2, "--prompts", "QUARTER_PROMPTS"]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses 1:2 with CE "
    "0.5 on them": ("on-policy", 4, [*MIXED_256, "--data-weights", 1, 2, "--prompts",
                                     "HALF_PROMPTS", "--ce-weight", 0, 0.5]),
    # the same student tokens, each round on the next prompts (--prompts-per-round)
    "on-policy R=4, 128 prompts a round, reverse KL (top-256), + the teacher's responses 1:2": (
        "on-policy", 4, [*MIXED_256, "--data-weights", 1, 2, "--prompts-per-round", 128]),
    "on-policy R=8, 64 prompts a round, reverse KL (top-256), + the teacher's responses 1:2": (
        "on-policy", 8, [*MIXED_256, "--data-weights", 1, 2, "--prompts-per-round", 64]),
    "on-policy R=2, reverse KL (top-256), + the teacher's responses 1:2, lr 2e-3": (
        "on-policy", 2, [*MIXED_256, "--data-weights", 1, 2, "--lr", "2e-3"]),
    "on-policy R=2, reverse KL (top-256), + the teacher's responses 1:1": (
        "on-policy", 2, [*MIXED_256, "--data-weights", 1, 1]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses 1:1": (
        "on-policy", 4, [*MIXED_256, "--data-weights", 1, 1, "--prompts", "HALF_PROMPTS"]),
    # twice the steps on the same teacher tokens, both sides
    "KD on the teacher's responses, top-256, 240 steps": ("teacher-k256", 0, [
        "--max-steps", 240]),
    "KD on the teacher's responses, top-256, lr 3e-3, 240 steps": ("teacher-k256", 0, [
        "--lr", "3e-3", "--max-steps", 240]),
    "on-policy R=2, reverse KL (top-256), + the teacher's responses 1:1, 240 steps": (
        "on-policy", 2, [*MIXED_256, "--data-weights", 1, 1, "--steps-per-round", 120]),
    "KD on the teacher's responses, top-256, 40 steps": ("teacher-k256", 0, [
        "--max-steps", 40]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses 1:2, 40 "
    "steps": ("on-policy", 4, [*MIXED_256, "--data-weights", 1, 2, "--prompts", "HALF_PROMPTS",
                               "--steps-per-round", 10]),
    "KD on the teacher's responses, top-256, lr 3e-4": ("teacher-k256", 0, ["--lr", "3e-4"]),
    "on-policy R=4, reverse KL (top-256 + tail), lr 3e-4": ("on-policy", 4, [
        "--loss", "reverse_kl", "--ce-weight", 0, "--top-k", 256, "--lr", "3e-4"]),
    "on-policy R=8 on 128 prompts, reverse KL (top-256 + tail), lr 3e-4": ("on-policy", 8, [
        "--loss", "reverse_kl", "--ce-weight", 0, "--top-k", 256, "--lr", "3e-4", "--n", 1,
        "--prompts", "HALF_PROMPTS"]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses 1:2, lr 3e-4": (
        "on-policy", 4, [*MIXED_256, "--data-weights", 1, 2, "--prompts", "HALF_PROMPTS", "--lr",
                         "3e-4"]),
    "KD on the teacher's responses, top-256, lr 3e-3, 80 steps": ("teacher-k256", 0, [
        "--lr", "3e-3", "--max-steps", 80]),
    "on-policy R=2, reverse KL (top-256), + the teacher's responses 1:1, 80 steps": (
        "on-policy", 2, [*MIXED_256, "--data-weights", 1, 1, "--steps-per-round", 40]),
    # the warm student's own corpus dataset replayed with its recipe, at the share the weights
    # give: teacher tokens scored before every row, so not counted in a row's (a row's own
    # --data replaces the default one; a later --loss replaces REPLAY_256's)
    **{f"KD on the teacher's responses, top-256, 240 steps, + the warm student's corpus {w}:1": (
        "teacher-k256", 0, ["--data", "K256", "WARM", "--data-weights", w, 1, "--max-steps",
                            240]) for w in (3, 1)},
    **{"on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses + the warm "
       f"student's corpus 1:2:{w} (KD on it)": (
           "on-policy", 4, [*REPLAY_256, "--data-weights", 1, 2, w, "--prompts", "HALF_PROMPTS"])
       for w in (1, 2, 3)},
    **{f"on-policy R=4 on 128 prompts, {loss} on the rollouts (top-256), + the teacher's "
       "responses + the warm student's corpus 1:2:1 (KD on it)": (
           "on-policy", 4, [*REPLAY_256, "--data-weights", 1, 2, 1, "--prompts", "HALF_PROMPTS",
                            "--loss", flag, "reverse_kl", "forward_kl"])
       for loss, flag in (("forward KL", "forward_kl"), ("JSD", "jsd"))},
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses + the warm "
    "student's corpus 1:2:1 (KD on it), 160 steps": (
        "on-policy", 4, [*REPLAY_256, "--data-weights", 1, 2, 1, "--prompts", "HALF_PROMPTS",
                         "--steps-per-round", 40]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses + the warm "
    "student's corpus 1:2:1 (KD on it), lr 2e-3": (
        "on-policy", 4, [*REPLAY_256, "--data-weights", 1, 2, 1, "--prompts", "HALF_PROMPTS",
                         "--lr", "2e-3"]),
    "KD on the teacher's responses, top-256, 240 steps, + the warm student's corpus 3:1, lr 2e-3": (
        "teacher-k256", 0, ["--data", "K256", "WARM", "--data-weights", 3, 1, "--max-steps", 240,
                            "--lr", "2e-3"]),
    # replay at the converged student's best rate: does it keep the held-out bits/byte?
    "KD on the teacher's responses, top-256, + the warm student's corpus 3:1, lr 3e-4": (
        "teacher-k256", 0, ["--data", "K256", "WARM", "--data-weights", 3, 1, "--lr", "3e-4"]),
    **{"on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses + the warm "
       f"student's corpus 1:2:{w} (KD on it), lr 3e-4": (
           "on-policy", 4, [*REPLAY_256, "--data-weights", 1, 2, w, "--prompts", "HALF_PROMPTS",
                            "--lr", "3e-4"]) for w in (1, 3)},
    "KD on the teacher's responses, top-256, 240 steps, + the warm student's corpus 3:1, lr 3e-4": (
        "teacher-k256", 0, ["--data", "K256", "WARM", "--data-weights", 3, 1, "--max-steps", 240,
                            "--lr", "3e-4"]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses + the warm "
    "student's corpus 1:2:1 (KD on it), lr 3e-4, 240 steps": (
        "on-policy", 4, [*REPLAY_256, "--data-weights", 1, 2, 1, "--prompts", "HALF_PROMPTS",
                         "--lr", "3e-4", "--steps-per-round", 60]),
    "on-policy R=4 on 128 prompts, reverse KL (top-256), + the teacher's responses + the warm "
    "student's corpus 2:1:1 (KD on it), lr 3e-4": (
        "on-policy", 4, [*REPLAY_256, "--data-weights", 2, 1, 1, "--prompts", "HALF_PROMPTS",
                         "--lr", "3e-4"]),
    # fresh prompts every round (--prompts-per-round): the best row's rollouts on 512 prompts
    # instead of 128 four times; and every teacher token on rollouts, 1,024 prompts
    "on-policy R=4, 128 new prompts a round, reverse KL (top-256), + the teacher's responses + "
    "the warm student's corpus 2:1:1 (KD on it), lr 3e-4": (
        "on-policy", 4, [*REPLAY_256, "--data-weights", 2, 1, 1, "--prompts", "PROMPTS_512",
                         "--prompts-per-round", 128, "--lr", "3e-4"]),
    "on-policy R=4, 256 new prompts a round, reverse KL (top-256), + the warm student's corpus "
    "2:1 (KD on it), lr 3e-4": (
        "on-policy", 4, ["--loss", "reverse_kl", "forward_kl", "--ce-weight", 0, 0.5, "--mix",
                         "WARM", "--n", 1, "--top-k", 256, "--data-weights", 2, 1, "--prompts",
                         "PROMPTS_1024", "--prompts-per-round", 256, "--lr", "3e-4"]),
    # four times the teacher tokens (163k), both sides: off-policy KD on the teacher's responses
    # to 1,024 prompts (n = 4; does it still overfit?), on-policy on 4 rounds of rollouts of 512
    # prompts + the teacher's responses to the 1,024 (n = 2); 4x the steps
    **{f"KD on the teacher's responses to 1,024 prompts, top-256, {s} steps, + the warm "
       "student's corpus 3:1, lr 3e-4, 4x the teacher tokens": (
           "teacher-1024-k256", 0, ["--data", "K256_1024", "WARM", "--data-weights", 3, 1,
                                    "--max-steps", s, "--lr", "3e-4"]) for s in (480, 960)},
    "on-policy R=4 on 512 prompts, reverse KL (top-256), + the teacher's responses to 1,024 "
    "prompts + the warm student's corpus 2:1:1 (KD on it), lr 3e-4, 480 steps, 4x the teacher "
    "tokens": (
        "on-policy", 4, scaled("HALF_1024_K256", "PROMPTS_512", 120)),
    **{"on-policy R=4 on 512 prompts, reverse KL (top-256), + the teacher's responses to 1,024 "
       "prompts + the warm student's corpus 2:1:1 (KD on it), lr 3e-4, 480 steps, 4x the teacher "
       f"tokens, {what}": (
           "on-policy", 4, scaled("HALF_1024_K256", "PROMPTS_512", 120, *flags))
       for what, flags in (("lr 1e-3", ["--lr", "1e-3"]),
                           ("960 steps", ["--steps-per-round", 240]))},
    # 16x (654k): the best of each side at 4x, on 2,048 prompts, 4x the steps again
    **{f"KD on the teacher's responses to 2,048 prompts, top-256, {s:,} steps, + the warm "
       "student's corpus 3:1, lr 3e-4, 16x the teacher tokens": (
           "teacher-2048-k256", 0, ["--data", "K256_2048", "WARM", "--data-weights", 3, 1,
                                    "--max-steps", s, "--lr", "3e-4"])
       for s in (1920, 2400, 3000, 3600)},
    # and with three fifths of the steps on the rollouts (3:1:1: the weak seed's margin)
    **{"on-policy R=4 on 2,048 prompts, reverse KL (top-256), + the teacher's responses to 2,048 "
       f"prompts + the warm student's corpus {w} (KD on it), lr 3e-4, {s:,} steps, 16x the "
       "teacher tokens": (
           "on-policy", 4, scaled("HALF_2048_K256", "PROMPTS_2048", s // 4, "--data-weights",
                                  *w.split(":")))
       for w, s in (("2:1:1", 1920), ("2:1:1", 2400), ("3:1:1", 2400), ("3:1:1", 3000))},
    # the same with KD (forward KL + 0.5 CE, off-policy's recipe) on the teacher's responses
    **{"on-policy R=4 on 512 prompts, reverse KL (top-256), + KD on the teacher's responses to "
       f"1,024 prompts + the warm student's corpus {w} (KD on it), lr 3e-4, 480 steps, 4x the "
       "teacher tokens": (
           "on-policy", 4, scaled("HALF_1024_K256", "PROMPTS_512", 120, "--loss", "reverse_kl",
                                  "forward_kl", "forward_kl", "--ce-weight", 0, 0.5, 0.5,
                                  "--data-weights", *w.split(":")))
       for w in ("2:1:1", "1:2:1")},
    # 16x, held-out bits/byte first: off-policy's whole dataset (the teacher's responses to 2,048
    # prompts, n = 8) with its recipe, and a small share of rollouts (4 rounds of 256 prompts:
    # +6 % teacher tokens) with reverse KL; at 2,400 steps the teacher's responses get
    # off-policy's 1,440 and the rollouts 480 more; and the rollouts with forward KL (GKD's):
    # the teacher's distribution at the student's prefixes, mass-covering as bits/byte is
    **{f"on-policy R=4 on 256 prompts, {what} (top-256), + KD on the teacher's responses to "
       f"2,048 prompts (n = 8) + the warm student's corpus {w} (KD on it), lr 3e-4, {s:,} steps, "
       "16x the teacher tokens": (
           "on-policy", 4, scaled("K256_2048", "PROMPTS_256", s // 4, "--loss", loss,
                                  "forward_kl", "forward_kl", "--ce-weight", 0, 0.5, 0.5,
                                  "--data-weights", *w.split(":")))
       for what, loss, w, s in (("reverse KL", "reverse_kl", "1:3:1", 1920),
                                ("reverse KL", "reverse_kl", "2:3:1", 1920),
                                ("reverse KL", "reverse_kl", "1:3:1", 2400),
                                ("forward KL on the rollouts", "forward_kl", "1:3:1", 1920))},
    # 16x, rounds first and off-policy KD after: the 3:1:1 row's student, then S steps of KD
    # (forward KL + 0.5 CE) on the same teacher's responses and the warm student's corpus 3:1
    # (no new teacher tokens). Mixed in from the start, rollouts cost bits/byte at every share;
    # does sharpening first and covering the teacher's text after keep more of the gain?
    **{f"{ONP_3000}, then {s:,} steps of KD on the teacher's responses + the warm student's "
       "corpus 3:1": ("then-kd", 0, [ONP_3000, s, "--data", "HALF_2048_K256", "WARM",
                                     "--data-weights", 3, 1, "--lr", "3e-4"])
       for s in (600, 1200, 2400)},
    "on-policy R=2, JSD (beta 0.5)": ("on-policy", 2, ["--loss", "jsd", "--ce-weight", 0]),
    "on-policy R=2, JSD, + the teacher's responses 1:1": (
        "on-policy", 2, ["--loss", "jsd", "--ce-weight", 0, "--mix", "HALF",
                         "--data-weights", 1, 1, "--n", 1]),
    "on-policy R=2, token reverse KL at lr 1e-4": ("on-policy", 2, [
        "--loss", "token_reverse_kl", "--ce-weight", 0, "--lr", "1e-4"]),
}


def with_template(src: Path, dst: Path) -> Path:
    """`src`'s model at `dst` with a chat template that renders a prompt as its own text: the
    plain-text render adds a newline, which this tokenizer has no word for (every prompt would
    end in an unknown word the corpus never has)."""
    import shutil

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    if tok.chat_template != CONTENT_ONLY:
        if dst != src:
            shutil.copytree(src, dst, dirs_exist_ok=True)
        tok.chat_template = CONTENT_ONLY
        tok.save_pretrained(dst)
    return dst


def slug(name: str) -> str:
    return name.replace(" ", "_").replace(",", "")


def run(args: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softlabels", *map(str, args)], check=True,
                          cwd=REPO, **kw)


def prompts(texts: list[str], path: Path, n: int) -> Path:
    """The first words of each text, with the corpus's leading space (the tokenizer's words are
    "Ġword": without it the first word is unknown)."""
    if not path.is_file():
        with open(path, "w") as f:
            for t in texts[:n]:
                f.write(json.dumps({"prompt": " " + " ".join(t.split()[:WORDS_IN_PROMPT])})
                        + "\n")
    return path


def evaluate(model: Path, teacher: Path, held_prompts: Path, held: list[str]) -> dict:
    from granularity import held_bits

    p = run(["eval", "--model", model, "--teacher", teacher, "--prompts", held_prompts,
             "--max-prompts", 128, "--max-new-tokens", NEW, "--seed", 0, "--json"],
            stdout=subprocess.PIPE, text=True)
    e = json.loads(p.stdout.strip().splitlines()[-1])
    return {"reverse_kl": e["reverse_kl"], "teacher_nll": e["teacher_nll"],
            **held_bits(model, held[:100])}


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from granularity import generate, sample, student, teacher

    from softlabels.data.manifest import Manifest
    from tests.helpers import start_dask, stop_dask

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-on-policy-w2400")
    ap.add_argument("--granularity-cache", type=Path,
                    default=REPO / ".cache" / "bench-granularity")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="row names to run (none: run nothing, "
                    "print the table of the rows run, and --plot)")
    ap.add_argument("--warm-steps", type=int, default=WARM_STEPS,
                    help="steps of KD on the corpus that make the warm student")
    ap.add_argument("--overhead", type=int, nargs=3, metavar=("PROMPTS", "N", "STEPS"),
                    help="instead of the rows: a 3-round run of PROMPTS prompts x N responses "
                    "and STEPS steps a round, on the long-lived worker and on an embedded "
                    "cluster, for the round overhead at that size")
    ap.add_argument("--plot", type=Path, help="also a PNG of every row's reverse KL against "
                    "its held-out bits/byte")
    a = ap.parse_args()
    cache, gcache = a.cache.resolve(), a.granularity_cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    gcache.mkdir(parents=True, exist_ok=True)
    gt = teacher(gcache)
    t = with_template(gt, cache / "teacher")
    train_texts = pq.read_table(sample(gcache, t, "train", 3000, 1)).column("text").to_pylist()
    held = pq.read_table(sample(gcache, t, "held", 200, 2)).column("text").to_pylist()
    warm_data = generate(gcache, gt, gcache / "train.parquet", "k64")  # the warm student's data
    train_prompts = prompts(train_texts, cache / "prompts.jsonl", PROMPTS)
    held_prompts = prompts(held, cache / "held-prompts.jsonl", len(held))
    half_prompts = prompts(train_texts, cache / "prompts-half.jsonl", PROMPTS // 2)
    quarter_prompts = prompts(train_texts, cache / "prompts-quarter.jsonl", PROMPTS // 4)
    more_prompts = {n: prompts(train_texts, cache / f"prompts-{n}.jsonl", n)
                    for n in (512, 1024, 2048)}
    d = cache / "dask"
    d.mkdir(exist_ok=True)
    (d / "scheduler.json").unlink(missing_ok=True)  # a stale one names a dead scheduler
    procs = start_dask(d, n_workers=1)
    addr = procs["address"]
    res_file = cache / "results.json"
    res = json.loads(res_file.read_text()) if res_file.is_file() else {}
    try:
        timings = res.setdefault("datasets", {})

        def dataset(name: str, args: list) -> Path:
            out = cache / name
            if not (out / "manifest.json").is_file():
                t0 = time.time()
                run(["generate", "--teacher", t, "--output", out, "--top-k", 64,
                     "--max-length", 64, "--scheduler", addr, *args])
                timings[name] = time.time() - t0
            return out

        def by_teacher(name: str, n: int, *args) -> Path:  # its responses to the prompts
            return dataset(name, ["--input", train_prompts, "--prompt-column", "prompt",
                                  "--generate-responses", "--n", n, "--max-new-tokens", NEW,
                                  *args])

        responses = by_teacher("teacher-responses", N)
        tokens = Manifest.load(responses).tokens
        half = by_teacher("teacher-responses-n2", N // 2, "--seed", 1)
        per_record = np.mean([len(x.split()) for x in train_texts])
        corpus_src = cache / "corpus.parquet"
        if not corpus_src.is_file():
            pq.write_table(pa.table({"text": train_texts[1000:1000 + math.ceil(
                tokens / per_record)]}), corpus_src)
        corpus = dataset("corpus", ["--input", corpus_src])
        quarter_src = cache / "corpus-quarter.parquet"  # a quarter of the teacher tokens
        if not quarter_src.is_file():
            pq.write_table(pa.table({"text": train_texts[2000:2000 + math.ceil(
                tokens / 4 / per_record)]}), quarter_src)
        quarter = dataset("corpus-quarter", ["--input", quarter_src])
        quarter_responses = by_teacher("teacher-responses-n1", 1, "--seed", 2)
        # the same responses with the teacher's top-256 (its top-64 leaves a third to half of
        # the student's mass on its own continuations outside the stored ids)
        wide = by_teacher("teacher-responses-k256", N, "--top-k", 256)
        half_wide = by_teacher("teacher-responses-n2-k256", N // 2, "--seed", 1, "--top-k", 256)
        p1024 = ["--input", more_prompts[1024], "--top-k", 256]
        wide_1024 = by_teacher("teacher-responses-1024-k256", N, "--seed", 3, *p1024)
        half_wide_1024 = by_teacher("teacher-responses-1024-n2-k256", N // 2, "--seed", 4, *p1024)
        # the datasets a row's extra flags may name
        p2048 = ["--input", more_prompts[2048], "--top-k", 256]
        wide_2048 = by_teacher("teacher-responses-2048-n8-k256", 2 * N, "--seed", 5, *p2048)
        half_wide_2048 = by_teacher("teacher-responses-2048-k256", N, "--seed", 6, *p2048)
        mixed = {"HALF": half, "QUARTER": quarter_responses, "CORPUS_QUARTER": quarter,
                 "HALF_K256": half_wide, "HALF_1024_K256": half_wide_1024,
                 "HALF_2048_K256": half_wide_2048, "K256_2048": wide_2048}
        offline = {"teacher": responses, "teacher-k256": wide, "corpus": corpus,
                   "teacher-1024-k256": wide_1024, "teacher-2048-k256": wide_2048}
        named = {**mixed, "HALF_PROMPTS": half_prompts, "QUARTER_PROMPTS": quarter_prompts,
                 "K256": wide, "K256_1024": wide_1024, "PROMPTS_256": train_prompts,
                 "WARM": warm_data,
                 **{f"PROMPTS_{n}": f for n, f in more_prompts.items()}}
        warm = cache / "warm"
        if not (warm / "model.safetensors").is_file():  # --warm-steps of KD on the corpus
            run(["train", "--student", student(gcache), "--data", warm_data, "--output",
                 warm, "--max-steps", a.warm_steps, "--batch-tokens", BATCH, "--lr", "3e-3",
                 "--warmup", 10, "--seed", 0])
        with_template(warm, warm)
        if "warm" not in res:
            res["warm"] = evaluate(warm, t, held_prompts, held)
            res["teacher tokens"] = {"teacher-responses": tokens,
                                     "corpus": Manifest.load(corpus).tokens}
        res_file.write_text(json.dumps(res, indent=1))
        if a.overhead:
            return overhead(a, cache, t, warm, train_texts, addr)
        runs = cache / "runs"
        for seed in a.seeds:
            for name, (kind, rounds, extra) in ROWS.items():
                key = f"{name} | seed {seed}"
                if key in res or (a.only is not None and name not in a.only):
                    continue
                out = runs / f"{slug(name)}-{seed}"
                t0 = time.time()
                row = {}
                if kind == "on-policy":
                    if not (out / "rounds.json").is_file() or len(json.loads(
                            (out / "rounds.json").read_text())["rounds"]) < rounds:
                        run(["on-policy", "--teacher", t, "--student", warm, "--prompts",
                             train_prompts, "--rounds", rounds, "--steps-per-round",
                             STEPS // rounds, "--output", out, "--n", N // rounds,
                             "--max-new-tokens", NEW, "--top-k", 64, "--max-length", 64,
                             "--scheduler", addr, "--seed", seed, *TRAIN,
                             *[named.get(x, x) for x in extra]],
                            capture_output=True)
                    log = json.loads((out / "rounds.json").read_text())["rounds"]
                    model = Path(log[-1]["checkpoint"]).parents[1]
                    row["teacher_tokens"] = sum(r["teacher_tokens"] for r in log) + sum(
                        Manifest.load(mixed[x]).tokens for x in extra if x in mixed)
                    row["overhead"] = [r["overhead_s"] / r["wall_s"] for r in log]
                    row["round_wall_s"] = [r["wall_s"] for r in log]
                elif kind == "then-kd":  # that row's student, then KD on data it has
                    first, steps, *flags = extra
                    if f"{first} | seed {seed}" not in res:
                        sys.exit(f"{name}: run its first part on seed {seed} first "
                                 f"(--only \"{first}\")")
                    before = res[f"{first} | seed {seed}"]
                    out = runs / f"{slug(first)}-{seed}" / f"then-kd-{steps}"  # (name length)
                    log = json.loads((out.parent / "rounds.json").read_text())["rounds"]
                    run(["train", "--student", Path(log[-1]["checkpoint"]).parents[1],
                         "--output", out, "--max-steps", steps, "--seed", seed, *TRAIN,
                         *[named.get(x, x) for x in flags]], capture_output=True)
                    model = out
                    row["teacher_tokens"] = before["teacher_tokens"]
                    t0 -= before["wall_s"]  # the rounds' wall time is this row's too
                else:
                    data = offline[kind]
                    run(["train", "--student", warm, "--data", data, "--output", out,
                         "--max-steps", STEPS, "--seed", seed, *TRAIN,
                         *[named.get(x, x) for x in extra]], capture_output=True)
                    model = out
                    row["teacher_tokens"] = Manifest.load(data).tokens
                    row["generate_s"] = timings.get(data.name)
                row["wall_s"] = time.time() - t0 + (row.get("generate_s") or 0.0)
                row.update(evaluate(model, t, held_prompts, held))
                res[key] = row
                res_file.write_text(json.dumps(res, indent=1))
                print(key, json.dumps(row), file=sys.stderr, flush=True)
    finally:
        stop_dask(procs)
    table(res, a.seeds)
    if a.plot:
        plot(res, a.seeds, a.plot)


def overhead(a, cache: Path, t: Path, warm: Path, texts: list[str], addr: str) -> None:
    """ROUNDS_OVERHEAD rounds of PROMPTS x N rollouts and STEPS steps each, on the bench's
    long-lived Dask worker (--scheduler) and on on-policy's own embedded cluster; per round
    where the time went and how each side's engine came (built, kept, reloaded in place)."""
    n_prompts, n, steps = a.overhead
    for where, flags in (("scheduler", ["--scheduler", addr]), ("embedded", [])):
        out = cache / "runs" / f"overhead-{n_prompts}x{n}-{steps}-{where}"
        run(["on-policy", "--teacher", t, "--student", warm, "--prompts",
             prompts(texts, cache / f"prompts-{n_prompts}.jsonl", n_prompts), "--rounds",
             ROUNDS_OVERHEAD, "--steps-per-round", steps, "--output", out, "--n", n,
             "--max-new-tokens", NEW, "--top-k", 256, "--max-length", 64, *flags, "--seed",
             a.seeds[0], *TRAIN], capture_output=True)
        print(f"\n{where}:\n\n| round | teacher tokens | wall s | writing s | scoring s | "
              "engine starts s | engines (writer; teacher) | training steps s | train stage s | "
              "overhead s | overhead share |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for r in json.loads((out / "rounds.json").read_text())["rounds"]:
            how = "; ".join(", ".join(f"{k} {v}" for k, v in sorted(r["engines"][side].items()))
                            for side in ("writer", "teacher"))
            print(f"| {r['round']} | {r['teacher_tokens']:,} | {r['wall_s']:.1f} | "
                  f"{r['writing_s']:.1f} | {r['scoring_s']:.1f} | {r['engine_starts_s']:.1f} | "
                  f"{how} | {r['train_steps_s']:.1f} | {r['train_wall_s']:.1f} | "
                  f"{r['overhead_s']:.1f} | {r['overhead_s'] / r['wall_s']:.0%} |")


def rows_run(res: dict, seeds: list[int]) -> dict:
    """name -> {seed: result} for the rows run on any of `seeds`."""
    got = {n: {s: res[f"{n} | seed {s}"] for s in seeds if f"{n} | seed {s}" in res} for n in ROWS}
    return {n: g for n, g in got.items() if g}


def mean(g: dict, key: str) -> float:
    return float(np.mean([r[key] for r in g.values()]))


def baseline(name: str, got: dict, seeds: list[int]) -> str | None:
    """The off-policy row of the lowest mean reverse KL among those run on every seed shown
    (on every seed `name` was run on, if fewer) at the same teacher tokens (within 10 %) as
    `name`: the goal's comparison."""
    tokens = mean(got[name], "teacher_tokens")
    need = set(seeds) if len(got[name]) == len(seeds) else set(got[name])
    full = [n for n, g in got.items() if ROWS[n][0] not in ON_POLICY and need <= set(g)
            and abs(mean(g, "teacher_tokens") / tokens - 1) < 0.1]
    return min(full, key=lambda n: np.mean([got[n][s]["reverse_kl"] for s in need]),
               default=None)


def table(res: dict, seeds: list[int]) -> None:
    w = res["warm"]
    print(f"\nwarm student (the start of every row): reverse KL {w['reverse_kl']:.4f}, teacher "
          f"NLL {w['teacher_nll']:.4f}, held-out {w['bpb']:.4f} bits/byte; seeds {seeds}\n")
    got = rows_run(res, seeds)
    base_of = {n: baseline(n, got, seeds) for n in got}
    bases = sorted({b for b in base_of.values() if b},
                   key=lambda n: mean(got[n], "teacher_tokens"))
    print("the best off-policy rows, per teacher-token budget (the last column's baseline): "
          + "; ".join(f"{b} ({mean(got[b], 'teacher_tokens'):,.0f})" for b in bases) + "\n")
    print("| row | reverse KL on own continuations | per seed | teacher NLL of them | "
          "held-out bits/byte | teacher tokens | wall s | round overhead | vs the best "
          "off-policy row at its teacher tokens, per seed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, g in got.items():
        rs = list(g.values())
        m = {k: mean(g, k) for k in
             ("reverse_kl", "teacher_nll", "bpb", "teacher_tokens", "wall_s")}
        per = ", ".join(f"{r['reverse_kl']:.4f}" for r in rs)
        over = [o for r in rs for o in r.get("overhead", [])]
        base = base_of[name]
        vs = ", ".join(f"{r['reverse_kl'] / got[base][s]['reverse_kl'] - 1:+.1%}"
                       for s, r in g.items() if base and s in got[base])
        print(f"| {name} | {m['reverse_kl']:.4f} | {per} | {m['teacher_nll']:.4f} | "
              f"{m['bpb']:.4f} | {m['teacher_tokens']:,.0f} | {m['wall_s']:.0f} | "
              + (f"{np.mean(over):.0%} (max {max(over):.0%})" if over else "") + f" | {vs} |")


def plot(res: dict, seeds: list[int], path: Path) -> None:
    """Reverse KL on the student's own continuations against held-out bits/byte, a point per
    row (its mean over the seeds shown): the two goals trade, and a table hides how."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got = rows_run(res, seeds)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    labels = {"o": "off-policy", "^": "on-policy", "s": "on-policy, then KD"}
    for marker, label in labels.items():
        for budget, color in (("1x", "tab:blue"), ("4x", "tab:orange"), ("16x", "tab:green")):
            pts = [(mean(g, "bpb"), mean(g, "reverse_kl")) for n, g in got.items()
                   if ON_POLICY.get(ROWS[n][0], "o") == marker
                   and next((w for w in ("4x", "16x") if f"{w} the teacher tokens" in n),
                            "1x") == budget]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, alpha=0.8,
                           label=f"{label}, {budget} teacher tokens")
    w = res["warm"]
    ax.scatter([w["bpb"]], [w["reverse_kl"]], marker="*", s=200, color="black",
               label="the warm student (every row's start)")
    ax.set_xlabel("held-out bits/byte (lower: better)")
    ax.set_ylabel("reverse KL to the teacher on its own continuations (nats/token)")
    ax.set_title(f"bench/on_policy.py: every row, mean over seeds {seeds}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
