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


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API server for the session: moto's, over HTTP on loopback, in its own process.
    Clients find it where users keep an endpoint (AWS_ENDPOINT_URL and the AWS_* keys, set here
    for this process and every subprocess); each test makes its own bucket (`bucket`)."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.monotonic() + 90
        while True:
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).ls("")
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        yield env
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3, request):
    """s3://BUCKET of this test, empty."""
    import re

    import s3fs

    name = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50].strip("-")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    return f"s3://{name}"
