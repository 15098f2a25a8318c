from __future__ import annotations

import pytest

from softlabels.demo import make_model, make_tokenizer
from tests.helpers import corpus_texts, start_dask, stop_dask


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer trained on the demo corpus (vocab 512)."""
    path = tmp_path_factory.mktemp("teacher")
    tok = make_tokenizer(corpus_texts(200), vocab_size=512, path=path)
    make_model(path, vocab_size=len(tok), hidden=64, layers=2, heads=2, seed=0)
    return path


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A real `dask scheduler` + one `dask worker` (resources teacher=1), shared by the session.

    Every `softlabels generate --scheduler` in the tests runs on this worker, so its one vLLM
    engine is built once and reused (an engine start costs ~20-60 s here).
    """
    d = tmp_path_factory.mktemp("dask")
    procs = start_dask(d, n_workers=1)
    yield procs["address"]
    stop_dask(procs)
