"""Seeded mutations of valid datasets: what a damaged file, a hand edit or a hostile publisher can
make. For each one, `verify`, the reader, `inspect`'s row view, `train`'s data path (mixture,
epoch plan, collate, the loss on a random head) and `eval` on a tiny student either pass or
refuse it with one line (a UserError); never another exception. And nothing `verify` passes
is refused later or decodes to targets that are no distribution (a KD loss below zero).

SOFTLABELS_FUZZ=N runs N mutations per dataset kind instead of 500 (BENCHMARKS.md has a deeper
run); a failure names the seed that reproduces it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from softlabels.data.dataset import hashes, sha256_file
from softlabels.data.errors import UserError
from softlabels.data.reader import SoftLabelReader
from softlabels.data.show import get_row, row_json
from softlabels.data.verify import verify
from tests.helpers import softlabels, synthetic_rows, write_dataset

VOCAB, K = 64, 4
N = int(os.environ.get("SOFTLABELS_FUZZ", "500"))
ODD = [None, True, False, -1, 0, 1, 3, 7.5, 1e308, -1e308, float("inf"), float("nan"), "x",
       "", [], {}, [1], 2**63, 65536, 1e-300, 0.0625, "0.0625"]
META_ODD = [b"inf", b"-inf", b"nan", b"-1", b"0", b"1e-9", b"65536", b"abc", b"", b"4.5",
            b"1e308", b"2", b"0.5", b"1"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Valid datasets: a top-k with the exact tail (format 4), draws only, and written responses
    (a top-k with the optional response and writer_logprob columns)."""
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for kind, k, draws in (("topk", K, 0), ("draws", 0, 4), ("written", K, 0)):
        rows = synthetic_rows(6, VOCAB, k, seed=1, lengths=(3, 12), draws=draws)
        if kind == "written":
            for r in rows:
                r.response = "some text"
                r.writer_logprob = np.minimum(np.nan_to_num(r.label_logprob) + 0.5, 0.0)
        write_dataset(root / kind, rows, k=k, vocab=VOCAB, draws=draws, shards=2)
        assert verify(root / kind) == [], kind
        out[kind] = root / kind
    return out


# ---------------------------------------------------------------- mutations

def _rehash(d: Path) -> None:
    """Make the manifest's hashes and sizes match the files again, as a publisher can."""
    m = json.loads((d / "manifest.json").read_text())
    for s in m.get("shards", []) if isinstance(m.get("shards"), list) else []:
        f = d / str(s.get("file", "")) if isinstance(s, dict) else None
        if f is not None and f.is_file() and f.parent == d:
            try:  # every hash a publisher controls, as it would write them
                s.update(hashes(f))
            except (OSError, ValueError):  # not Parquet any more: the whole-file hash only
                s.update(sha256=sha256_file(f), bytes=f.stat().st_size, footer=None,
                         row_groups=None)
    (d / "manifest.json").write_text(json.dumps(m))


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("shard-*.parquet"))


def mutate_manifest(d: Path, rng: random.Random) -> str:
    m = json.loads((d / "manifest.json").read_text())
    target, where = m, ""
    if rng.random() < 0.4 and m["shards"]:
        i = rng.randrange(len(m["shards"]))
        target, where = m["shards"][i], f"shards[{i}]."
    key = rng.choice(list(target) + ["unknown_key"])
    how = rng.random()
    if how < 0.15:
        target.pop(key, None)
        what = f"drop {where}{key}"
    else:
        v = rng.choice(ODD + ([target.get(key, 0) * 2] if isinstance(target.get(key), int)
                              and not isinstance(target.get(key), bool) else []))
        target[key] = v
        what = f"{where}{key} = {v!r}"
    (d / "manifest.json").write_text(json.dumps(m))
    return what


def mutate_metadata(d: Path, rng: random.Random) -> str:
    f = rng.choice(_shards(d))
    t = pq.read_table(f)
    meta = dict(t.schema.metadata)
    key = rng.choice([k for k in meta if k.startswith(b"softlabels.")])
    if rng.random() < 0.2:
        meta.pop(key)
        what = f"{f.name}: drop {key.decode()}"
    else:
        meta[key] = rng.choice(META_ODD)
        what = f"{f.name}: {key.decode()} = {meta[key]!r}"
    pq.write_table(t.replace_schema_metadata(meta), f)
    if rng.random() < 0.8:  # and, as a publisher can, the manifest's hash (and the step) too
        _rehash(d)
        name = key.decode().removeprefix("softlabels.")
        if rng.random() < 0.5 and name.endswith("step"):
            m = json.loads((d / "manifest.json").read_text())
            try:
                m[name] = float(meta.get(key, b"x"))
            except ValueError:
                m[name] = meta.get(key, b"").decode()
            (d / "manifest.json").write_text(json.dumps(m))
            what += " (manifest too)"
    return what


def _set_leaf(arr: pa.Array, fn):
    """`arr` with its innermost values replaced by fn(values numpy copy)."""
    if pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        inner = _set_leaf(arr.values if pa.types.is_fixed_size_list(arr.type)
                          else arr.values, fn)
        if pa.types.is_fixed_size_list(arr.type):
            return pa.FixedSizeListArray.from_arrays(inner, arr.type.list_size)
        return pa.ListArray.from_arrays(arr.offsets, inner)
    values = arr.to_numpy(zero_copy_only=False).copy()
    return pa.array(fn(values), arr.type)


def mutate_values(d: Path, rng: random.Random) -> str:
    f = rng.choice(_shards(d))
    t = pq.read_table(f)
    cols = [n for n in t.column_names if n != "row_id"]
    name = rng.choice(cols)
    col = t.column(name).combine_chunks()
    seed = rng.randrange(1 << 30)

    def fn(v):
        g = np.random.default_rng(seed)
        if v.size == 0:
            return v
        n = int(g.integers(1, max(2, v.size // 4)))
        at = g.integers(0, v.size, n)
        if v.dtype == bool:
            v[at] = ~v[at]
        elif v.dtype.kind == "f":  # writer_logprob
            v[at] = g.choice([np.nan, np.inf, -np.inf, 0.5, -1e30, 3e38], n)
        elif v.dtype.kind not in "iu":  # the response's text: any text is valid
            v[at] = g.choice(["", "x" * 1000, "\u2028\n"], n)
        else:
            info = np.iinfo(v.dtype)
            choice = g.integers(0, 3)
            v[at] = (info.max if choice == 0 else info.min if choice == 1 else
                     g.integers(info.min, int(info.max) + 1, n, dtype=np.int64).astype(v.dtype))
        return v

    t = t.set_column(t.schema.get_field_index(name), t.schema.field(name), _set_leaf(col, fn))
    pq.write_table(t.replace_schema_metadata(pq.read_schema(f).metadata), f)
    if rng.random() < 0.85:
        _rehash(d)
    return f"{f.name}: values of {name} (seed {seed})"


def mutate_file(d: Path, rng: random.Random) -> str:
    f = rng.choice(_shards(d))
    data = bytearray(f.read_bytes())
    how = rng.randrange(5)
    if how == 0:
        f.write_bytes(bytes(data[:rng.randrange(len(data))]))
        what = f"{f.name}: truncated"
    elif how == 1:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
        what = f"{f.name}: bits flipped"
    elif how == 2:
        t = pq.read_table(f)
        order = list(range(t.num_rows))
        rng.shuffle(order)
        pq.write_table(t.take(order), f)
        what = f"{f.name}: rows reordered, footer counts dropped"
    elif how == 3:
        f.unlink()
        what = f"{f.name}: deleted"
    else:
        other = [s for s in _shards(d) if s != f]
        shutil.copy(other[0] if other else f, f)
        what = f"{f.name}: replaced by another shard"
    if rng.random() < 0.7:
        _rehash(d)
    return what


def mutate_rows_twice(d: Path, rng: random.Random) -> str:
    """Both shards hold the same rows (hashes fixed): every row id twice in the dataset."""
    a, b = _shards(d)[:2]
    shutil.copy(a, b)
    _rehash(d)
    return "a row in two shards"


def _apply(mutation, d: Path, rng: random.Random) -> str:
    """One mutation; on a file an earlier one already broke it may not apply (then none)."""
    try:
        return mutation(d, rng)
    except (pa.ArrowException, OSError, ValueError, KeyError, IndexError, TypeError):
        return f"({mutation.__name__} did not apply)"


MUTATIONS = [mutate_manifest, mutate_metadata, mutate_values, mutate_values, mutate_file,
             mutate_rows_twice]


# ---------------------------------------------------------------- what must hold

def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def _train_data_path(d: Path):
    """What `train` does with the data before and around the model: the mixture, the epoch
    plan from the footers, every micro-batch read and collated, and the KD + CE loss of a random
    student head on it (finite, the KD >= 0: the targets are distributions)."""
    from softlabels.train_student.batches import EpochPlan
    from softlabels.train_student.config import TrainConfig
    from softlabels.train_student.losses import kd_ce_sums
    from softlabels.train_student.mixture import Mixture
    from softlabels.train_student.objective import SameTokenizer

    mix = Mixture([d], seed=0)
    recipe = TrainConfig(student="s", data=str(d), output="o").recipe().for_dataset(
        mix.readers[0].manifest, str(d))
    objective = SameTokenizer([recipe], VOCAB)
    plan = EpochPlan.make(mix.index(0), 64, 1, mix.source(0))
    head = torch.nn.Linear(8, VOCAB, bias=False)
    torch.manual_seed(0)
    for m in range(plan.micro_batches):
        pos, _ = plan.rows(m, 0)
        rows, src = mix.read(0, pos)
        b = objective.collate(rows, src)
        h = torch.randn(len(b.pos), 8)
        for r in (recipe,):
            kd, ce = kd_ce_sums(h, head, b.ids, b.lp, b.rest, b.label_lp, b.labels,
                                loss=r.loss, residual=r.residual)
            assert torch.isfinite(kd) and torch.isfinite(ce), "loss not finite"
            assert float(kd) >= -1e-3 * max(1, len(b.pos)), f"KD {float(kd)} < 0"


_MODEL = []


def _eval(d: Path) -> None:
    """`softlabels eval`'s numbers of a tiny student: finite where they exist."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from softlabels.train_student.evaluate import evaluate

    if not _MODEL:
        torch.manual_seed(0)
        _MODEL.append(LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=64)).eval())
    m = evaluate(_MODEL[0], d, batch_tokens=64)
    for key in ("ce", "kl_topk", "teacher_ce"):
        assert m[key] is None or np.isfinite(m[key]), f"eval {key} {m[key]}"
    assert m["kl_topk"] is None or m["kl_topk"] >= -1e-3, f"eval KL {m['kl_topk']} < 0"


def _distributions(d: Path) -> None:
    """Every decoded position with a target is a distribution."""
    reader = SoftLabelReader(d, shuffle=False)
    m = reader.manifest
    for r in reader:
        at = r.target_mask.astype(bool)
        if m.k:
            p = np.exp(r.topk_logprobs[at].astype(np.float64))
            assert np.isfinite(p).all() and (p <= 1 + 1e-3).all(), "probability above 1"
            total = p.sum(-1) + (np.exp(r.tail_logprob[at]) if m.exact else 0)
            slack = np.expm1(max(m.logprob_step, m.tail_step) / 2) + 1e-5  # the rounding
            assert (total <= 1 + slack).all() and (not m.exact or (total >= 1 - slack).all()), (
                f"top-k + tail sums to {total.min()}..{total.max()}")
        if m.draws and not m.k:
            assert (r.sample_counts[at].sum(-1) == m.draws).all()


def check(d: Path, what: str) -> str:
    """'refused', 'passed' or raises AssertionError naming what broke."""
    try:
        problems = verify(d)
    except Exception as e:  # noqa: BLE001 - any exception is the finding
        raise AssertionError(f"{what}: verify raised {type(e).__name__}: {e}") from e
    for p in problems:
        assert "\n" not in p, f"{what}: verify problem not one line: {p!r}"
    for name, fn in (("reader", lambda: list(SoftLabelReader(d))),
                     ("inspect", lambda: row_json(*get_row(d, 0))),
                     ("train data", lambda: _train_data_path(d)),
                     ("eval", lambda: _eval(d)),
                     ("decode", lambda: _distributions(d))):
        try:
            fn()
        except UserError as e:
            _one_line(e)
            assert problems, f"{what}: verify passed, then {name} refused it: {e}"
        except AssertionError as e:
            if problems and name == "decode":
                continue  # verify rejected it; what it decodes to does not matter
            raise AssertionError(f"{what}: {name}: {e}") from e
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{what}: {name} raised {type(e).__name__}: {e}") from e
    return "refused" if problems else "passed"


CHUNK = 100


@pytest.mark.parametrize("kind", ["topk", "draws", "written"])
@pytest.mark.parametrize("chunk", range(max(1, N // CHUNK)))
def test_mutated_datasets_pass_or_are_refused_in_one_line(tmp_path, bases, kind, chunk):
    outcomes = {"passed": 0, "refused": 0}
    for seed in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        rng = random.Random(f"{kind}:{seed}")
        d = tmp_path / f"m{seed}"
        shutil.copytree(bases[kind], d)
        what = f"seed {seed} ({kind}): " + "; ".join(
            _apply(rng.choice(MUTATIONS), d, rng) for _ in range(rng.choice([1, 1, 1, 2, 3])))
        outcomes[check(d, what)] += 1
        shutil.rmtree(d)
    assert outcomes["refused"] > CHUNK // 3, outcomes  # the mutations do reach the checks


def test_the_commands_give_one_line_and_exit_2_on_mutations(tmp_path, bases):
    """The same, through the commands users type, on a few mutations: `verify` exits 0 or 1,
    `inspect` and `train` 0 or 2, with one line on stderr and no traceback."""
    refused = 0
    for seed in range(6):
        rng = random.Random(f"cli:{seed}")
        d = tmp_path / f"m{seed}"
        shutil.copytree(bases["topk"], d)
        what = rng.choice([mutate_manifest, mutate_metadata, mutate_values])(d, rng)
        v = softlabels("verify", d, check=False)
        assert v.returncode in (0, 1) and "Traceback" not in v.stderr, (what, v.stderr)
        i = softlabels("inspect", d, "--json", check=False)
        assert i.returncode in (0, 2) and "Traceback" not in i.stderr, (what, i.stderr)
        if i.returncode == 2:
            assert len(i.stderr.strip().splitlines()) == 1, (what, i.stderr)
        refused += v.returncode == 1
    assert refused >= 2


def test_a_step_of_inf_is_refused_everywhere(tmp_path, bases):
    """The review's case: logprob_step inf in the schema and the manifest, hashes fixed.
    Before, verify said OK and train ran with KL -0.29."""
    d = tmp_path / "inf"
    shutil.copytree(bases["topk"], d)
    for f in _shards(d):
        t = pq.read_table(f)
        meta = {**t.schema.metadata, b"softlabels.logprob_step": b"inf"}
        pq.write_table(t.replace_schema_metadata(meta), f)
    m = json.loads((d / "manifest.json").read_text())
    m["logprob_step"] = float("inf")
    (d / "manifest.json").write_text(json.dumps(m))
    _rehash(d)
    problems = verify(d)
    assert len(problems) == 1 and "logprob_step inf is outside" in problems[0], problems
    with pytest.raises(UserError, match="logprob_step inf"):
        SoftLabelReader(d)


def test_manifest_keys_of_the_wrong_type_are_one_line(tmp_path, bases):
    cases = {"k": "8", "vocab_size": 3.5, "draws": None, "shards": {}, "sample_temperature": 0}
    for key, value in cases.items():
        d = tmp_path / key
        shutil.copytree(bases["topk"], d)
        m = json.loads((d / "manifest.json").read_text())
        m[key] = value
        (d / "manifest.json").write_text(json.dumps(m))
        problems = verify(d)
        assert len(problems) == 1 and key in problems[0], (key, problems)
    d = tmp_path / "unknown"
    shutil.copytree(bases["topk"], d)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["md5"] = "x"
    (d / "manifest.json").write_text(json.dumps(m))
    assert "unknown key shards[0].'md5'" in verify(d)[0]
