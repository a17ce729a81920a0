"""`pip install .` gives a working library from any directory, package data included."""
from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO_ROOT


def test_install_from_another_directory(tmp_path):
    target = tmp_path / "site"
    # built from a copy without build/ or *.egg-info: files a stale build left there would hide missing package data
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "runs", "checkpoints", "__pycache__", ".*cache", ".hypothesis", ".gpu*"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(target), str(source)], check=True, cwd=tmp_path)
    bundled = sorted(p.parent.name for p in (REPO_ROOT / "weights").glob("*/model.safetensors"))
    code = (
        "import dlsr_infer, sys, pathlib\n"
        "from dlsr_infer.genotype import BUILTIN, builtin\n"
        "from dlsr_infer.pretrained import bundled_weights_dir\n"
        "assert pathlib.Path(dlsr_infer.__file__).is_relative_to(sys.argv[1]), dlsr_infer.__file__\n"
        "assert all(builtin(n).num_cells == 6 for n in BUILTIN)\n"
        "root = bundled_weights_dir()\n"
        "print(sorted(p.parent.name for p in root.glob('*/model.safetensors')) if root else [])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(bundled)
    assert (target / "dlsr_infer" / "genotypes" / "dlsr_x4.json").is_file()
    assert not (target / "weights").exists()  # bundled weights live inside the package
    # each model directory installs whole: weights, config, card, curve, logs and stages.json
    def model_files(root):  # the files of each model directory (one holding config.json), not __pycache__/
        return sorted(str(f.relative_to(root)) for d in root.glob("*/config.json") for f in d.parent.iterdir())

    assert model_files(target / "dlsr_infer" / "_weights") == model_files(REPO_ROOT / "weights")
