"""Security: a cluster only its owners can use, and folders that cannot run code (issue 13).

Real processes throughout: `dask scheduler`/`dask worker` with mutual TLS and certificates made
here with openssl, the real `softlabels` command, psutil reading the sockets of a running job.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import REPO, corpus_texts, dask_env, softlabels, start_dask, stop_dask


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d, name):
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-ca.key",
             "-out", f"{name}-ca.pem", "-days", "2", "-subj", f"/CN={name}-ca", cwd=d)


def _signed(d, ca, name):
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-ca.pem", "-CAkey",
             f"{ca}-ca.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", cwd=d)
    return [d / f"{name}.pem", d / f"{name}.key"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The cluster's CA with certificates for the nodes and the client; a stranger's CA and a
    client certificate it signed."""
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "cluster")
    _ca(d, "stranger")
    return {"ca": d / "cluster-ca.pem", "node": _signed(d, "cluster", "node"),
            "client": _signed(d, "cluster", "client"),
            "stranger_ca": d / "stranger-ca.pem", "stranger": _signed(d, "stranger", "intruder")}


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs):
    from distributed.security import Security

    node_cert, node_key = certs["node"]
    tls = ["--tls-ca-file", str(certs["ca"]), "--tls-cert", str(node_cert),
           "--tls-key", str(node_key)]
    sec = Security(tls_ca_file=str(certs["ca"]), tls_client_cert=str(node_cert),
                   tls_client_key=str(node_key), require_encryption=True)
    procs = start_dask(tmp_path_factory.mktemp("tlsdask"), 1, tls=tls, security=sec)
    assert procs["address"].startswith("tls://")
    yield procs["address"]
    stop_dask(procs)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    pq.write_table(pa.table({"text": corpus_texts(6, offset=300)}), d / "in.parquet")
    return d / "in.parquet"


def _generate(teacher, inp, out, *extra):
    return softlabels("generate", "--teacher", teacher, "--input", inp, "--output", out,
                      "--top-k", 4, "--max-length", 128, *extra, check=False)


def _tls_flags(ca, cert_key):
    return ["--tls-ca-file", ca, "--tls-cert", cert_key[0], "--tls-key", cert_key[1]]


def _one_line_refusal(p, *needles):
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr and "error:" in last, p.stderr
    for n in needles:
        assert n in last, last


def test_generate_over_mutual_tls(tmp_path, tiny_teacher, small_corpus, tls_cluster, certs):
    out = tmp_path / "out"
    p = _generate(tiny_teacher, small_corpus, out, "--scheduler", tls_cluster,
                  *_tls_flags(certs["ca"], certs["client"]))
    assert p.returncode == 0, p.stderr
    assert softlabels("verify", out).returncode == 0
    # the same certificates from Dask's own configuration (distributed.comm.tls.*), no flags
    env = dict(dask_env(), DASK_DISTRIBUTED__COMM__TLS__CA_FILE=str(certs["ca"]),
               DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT=str(certs["client"][0]),
               DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY=str(certs["client"][1]))
    p = subprocess.run([sys.executable, "-m", "softlabels", "generate", "--teacher",
                        str(tiny_teacher), "--input", str(small_corpus), "--output",
                        str(tmp_path / "out2"), "--top-k", "4", "--max-length", "128",
                        "--scheduler", tls_cluster], cwd=REPO, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert [s["sha256"] for s in json.loads((tmp_path / "out2" / "manifest.json").read_text())[
        "shards"]] == [s["sha256"] for s in json.loads((out / "manifest.json").read_text())[
            "shards"]]


def test_clients_without_valid_certificates_are_refused(tmp_path, tiny_teacher, small_corpus,
                                                        tls_cluster, certs):
    port = tls_cluster.rsplit(":", 1)[1]
    cases = {
        "no certificates": ([], "no certificates were given"),
        "plain tcp": (["--scheduler", f"tcp://127.0.0.1:{port}"], "closed the connection"),
        "certificates, tcp address": (
            ["--scheduler", f"tcp://127.0.0.1:{port}",
             *_tls_flags(certs["ca"], certs["client"])], "is plain tcp"),
        "a stranger's certificate": (_tls_flags(certs["ca"], certs["stranger"]), "TLS handshake"),
        "a stranger's CA": (_tls_flags(certs["stranger_ca"], certs["client"]), "TLS handshake"),
        "half the flags": (["--tls-cert", certs["client"][0]], "--tls-ca-file, --tls-key missing"),
    }
    for name, (flags, needle) in cases.items():
        out = tmp_path / name.replace(" ", "_").replace("'", "")
        if "--scheduler" not in flags:
            flags = ["--scheduler", tls_cluster, *flags]
        p = _generate(tiny_teacher, small_corpus, out, *flags)
        _one_line_refusal(p, needle)
        assert not out.exists(), f"{name}: something was written"


def _listening(pid) -> set[tuple[str, int]]:
    import psutil

    found = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_embedded_cluster_listens_on_loopback_only(tmp_path, tiny_teacher, small_corpus):
    """Every socket a running `generate` and its workers listen on (scheduler, workers,
    nannies, dashboard, the engine) is on loopback."""
    p = subprocess.Popen([sys.executable, "-m", "softlabels", "generate", "--teacher",
                          str(tiny_teacher), "--input", str(small_corpus), "--output",
                          str(tmp_path / "out"), "--top-k", "4", "--max-length", "128"],
                         cwd=REPO, env=dask_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int]] = set()
    most = 0
    while p.poll() is None:
        now = _listening(p.pid)
        most = max(most, len(now))
        seen |= now
        time.sleep(0.2)
    _, err = p.communicate()
    assert p.returncode == 0, err
    # scheduler + its dashboard + a worker + its nanny, at least, were seen at one time
    assert most >= 4, seen
    assert {ip for ip, _ in seen} <= {"127.0.0.1", "::1"}, seen


def test_folders_never_run_code(tmp_path, tiny_teacher, small_corpus):
    """A model folder whose config points at its own Python (auto_map) is refused unless
    --trust-remote-code is given, and that Python never runs; pickled-only weights are refused."""
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil"
    shutil.copytree(tiny_teacher, evil)
    (evil / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                       "AutoConfig": "modeling_evil.EvilConfig"}
    cfg["model_type"] = "evil"
    (evil / "config.json").write_text(json.dumps(cfg))
    p = _generate(evil, small_corpus, tmp_path / "out")
    _one_line_refusal(p, "--trust-remote-code")
    p = softlabels("eval", "--model", evil, "--data", tmp_path / "none", check=False)
    _one_line_refusal(p, "--trust-remote-code")
    assert not marker.exists()

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_teacher, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    p = _generate(pickled, small_corpus, tmp_path / "out2")
    _one_line_refusal(p, "no *.safetensors")
    p = softlabels("eval", "--model", pickled, "--data", tmp_path / "none", check=False)
    _one_line_refusal(p, "no *.safetensors")
