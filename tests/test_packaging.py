"""The installed distribution claims one import name, `softlabels`, and nothing else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.helpers import REPO


def test_outside_the_repo_only_softlabels_is_importable(tmp_path):
    code = (
        "import importlib.util as u, pathlib, sys\n"
        "repo = pathlib.Path(sys.argv[1])\n"
        "for name in ('data', 'generate', 'train_student', 'demo'):\n"
        "    s = u.find_spec(name)\n"
        "    assert s is None or repo not in pathlib.Path(s.origin).parents, (name, s)\n"
        "import softlabels.data.format, softlabels.generate.plan, softlabels.train_student.losses\n"
        "print(softlabels.data.format.__file__)\n"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no PYTHONPATH: only what is installed
    p = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(REPO / "data" / "format.py")


def test_wheel_holds_only_the_softlabels_package(tmp_path):
    # built from a copy: an in-tree build would leave build/ in the repository
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", ".cache", "demo_out", "runs", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("softlabels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"softlabels"}, tops
    for f in ("softlabels/data/format.py", "softlabels/generate/engine.py",
              "softlabels/train_student/train.py", "softlabels/data/FORMAT.md",
              "softlabels/data/corpus/kjv-train.parquet", "softlabels/cli.py"):
        assert f in names, f


def test_help_of_every_command_imports_no_torch():
    """`softlabels --help` and each command's --help answer without torch (2.5 s) or vLLM."""
    code = (
        "import sys\n"
        "from softlabels.cli import build_parser\n"
        "p = build_parser()\n"
        "for argv in ([], ['generate'], ['train'], ['eval'], ['verify'], ['inspect'], ['demo']):\n"
        "    try:\n"
        "        p.parse_args([*argv, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stderr, p.stderr[-500:]
