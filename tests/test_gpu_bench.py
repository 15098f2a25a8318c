"""bench/gpu.py, the command prepared for a lent GPU machine, kept from rotting between loans: its
CPU smoke mode runs every part here, with vLLM, Dask and `datasets` absent as they are there."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, dask_env


def test_gpu_bench_runs_without_vllm_dask_or_datasets(tmp_path):
    absent = tmp_path / "absent"
    absent.mkdir()
    # None in sys.modules: `import vllm` fails and find_spec says "not installed", as on a
    # machine without them (every subprocess the bench starts inherits PYTHONPATH)
    (absent / "sitecustomize.py").write_text(
        "import sys\nfor m in ('vllm', 'dask', 'distributed', 'datasets'):\n"
        "    sys.modules[m] = None\n")
    env = {**dask_env(), "PYTHONPATH": str(absent)}
    p = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(tmp_path / "o")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "o" / "gpu.json").read_text())
    fp32 = res["head"]["fp32"]
    assert fp32["topk_ids_equal"] > 0.99 and fp32["max_logprob_err"] < 1e-4
    assert fp32["max_tail_rel_err"] < 1e-3 and fp32["max_label_err"] < 1e-4
    assert res["head"]["bf16"]["max_logprob_err"] < 0.5  # bf16's error is reported, not hidden
    assert res["head"]["draws_reproducible"]
    assert set(res["train"]) == {"default recipe", "CE only", "LoRA r=16",
                                 "gradient checkpointing"}
    for name, r in res["train"].items():
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0, (name, r)
    lora = res["train"]["LoRA r=16"]
    assert lora["trainable_parameters"] < lora["parameters"] / 5
    assert res["kd_step_over_ce_step"] > 0 and res["reader"]["tokens_per_s"] > 0
    assert "needs GPUs" in res["fsdp"]["skipped"]
    assert "KD step / CE step" in p.stdout
