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


def test_every_name_the_docs_give_resolves():
    """`dlsr_infer.ImageLoadError` (docs/reliability.md) raised AttributeError: the error classes, upscale_file
    and Upscaler lived only in submodules. Every `dlsr_infer.X[.Y]` / `dlsr_search.X[.Y]` the README and
    docs name must import as written, and every name in `dlsr_infer.__all__` must resolve."""
    import importlib
    import importlib.util
    import re

    import dlsr_infer
    from dlsr_infer.imageio import ImageLoadError

    assert all(getattr(dlsr_infer, name) is not None for name in dlsr_infer.__all__)
    assert dlsr_infer.ImageLoadError is ImageLoadError
    docs = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"), *(REPO_ROOT / "benchmarks").glob("*.md")]
    named, missing = 0, []
    for doc in docs:
        for m in re.finditer(r"\b(dlsr_infer|dlsr_search)((?:\.[A-Za-z_]\w*)+)", doc.read_text()):
            parts = [m[1], *m[2].strip(".").split(".")]
            obj = importlib.import_module(parts[0])
            for i, name in enumerate(parts[1:], start=1):
                if hasattr(obj, name):
                    obj = getattr(obj, name)
                elif importlib.util.find_spec(".".join(parts[:i + 1])) is not None:
                    obj = importlib.import_module(".".join(parts[:i + 1]))
                else:
                    missing.append(f"{doc.name}: {m[0]}")
                    break
            named += 1
    assert named > 10 and missing == [], missing


def test_the_readme_and_docs_reliability_tables_are_one_table():
    """README's bad-input tables are copies of docs/reliability.md's: they drifted (rows changed in one only)."""
    import re

    def tables(text: str) -> dict[str, str]:
        return {m[1]: m[2] for m in re.finditer(r"^#+ (Files|Arrays)[^\n]*\n\n((?:\|[^\n]*\n)+)", text, re.M)}

    readme = tables((REPO_ROOT / "README.md").read_text())
    docs = tables((REPO_ROOT / "docs" / "reliability.md").read_text())
    assert set(readme) == set(docs) == {"Files", "Arrays"}
    assert readme == docs
