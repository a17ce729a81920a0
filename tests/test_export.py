"""ONNX export (`dlsr-export --onnx`) and its parity under onnxruntime (skipped when the optional
`onnx` / `onnxruntime` extra is missing)."""
from __future__ import annotations

import pytest
import torch

from dlsr_infer.export import export_onnx, main, onnx_available
from dlsr_infer.genotype import builtin
from dlsr_infer.model import DLSR


def _model(name: str = "dlsr_s_x2") -> DLSR:
    torch.manual_seed(0)
    return DLSR(builtin(name))


def test_export_writes_file_and_leaves_model_alone(tmp_path):
    pytest.importorskip("onnx")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "sub").mkdir()
    bystander = tmp_path / "sub" / "m.onnx.tmp"  # a file the export must not take for its own temp file
    bystander.write_bytes(b"someone else's")
    path = export_onnx(model, tmp_path / "sub" / "m.onnx")
    assert path.is_file() and path.stat().st_size > 10_000
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.tmp"]
    assert bystander.read_bytes() == b"someone else's"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # dynamic N/H/W


@pytest.mark.parametrize("name", ["dlsr_s_x2", "dlsr_x3"])
def test_onnxruntime_parity_dynamic_shapes(tmp_path, name):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dlsr_infer.export import OnnxUpscaler

    model = _model(name)
    path = export_onnx(model, tmp_path / "m.onnx")
    runner = OnnxUpscaler(path, threads=1)
    for shape in [(1, 3, 64, 64), (2, 3, 23, 41), (1, 3, 15, 15)]:
        x = torch.rand(*shape)
        with torch.enable_grad():
            ref = model(x).detach()
        y = runner(x)
        assert y.shape == ref.shape
        assert (y - ref).abs().max().item() <= 1e-4


def test_cli_export_and_check(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "x.onnx"
    assert main(["--genotype", "dlsr_s_x2", "--onnx", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "dynamic" in text and "max abs diff" in text
    # a failed check leaves the earlier export as it was and no unverified file, under any name
    import dlsr_infer.export as export_mod

    before = out.read_bytes()

    def fails(*a, **k):
        raise AssertionError("ONNX output differs from the network by 0.003 (> 0.0001)")

    monkeypatch.setattr(export_mod, "check_onnx", fails)
    assert main(["--genotype", "dlsr_s_x2", "--onnx", str(out), "--check", "--overwrite"]) == 2
    assert "check failed: ONNX output differs" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # '~' as from_pretrained reads it, --check or not
    (tmp_path / "home").mkdir()
    assert main(["--genotype", "dlsr_s_x2", "--onnx", "~/m.onnx", "--check"]) == 0
    assert (tmp_path / "home" / "m.onnx").is_file() and sorted(p.name for p in (tmp_path / "home").iterdir()) == ["m.onnx"]


def test_cli_usage_errors(tmp_path, capsys):
    for argv in (["--onnx", str(tmp_path / "a.onnx")],  # neither MODEL nor --genotype
                 ["x2", "--genotype", "dlsr_x2", "--onnx", str(tmp_path / "a.onnx")]):  # both
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "give exactly one of MODEL or --genotype" in capsys.readouterr().err
    if not onnx_available():  # the optional extra missing: said first, with how to install it, nothing written
        assert main(["--genotype", "dlsr_s_x2", "--onnx", str(tmp_path / "sub" / "a.onnx")]) == 2
        assert "dlsr-export: error: ONNX export needs the onnx package: pip install 'dlsr[onnx]'" in capsys.readouterr().err
        with pytest.raises(ImportError, match="needs the onnx package"):
            export_onnx(DLSR.from_genotype_name("dlsr_s_x2"), tmp_path / "sub" / "a.onnx")
        assert not list(tmp_path.iterdir())
        return
    assert main(["--genotype", "no_such", "--onnx", str(tmp_path / "a.onnx")]) == 2
    assert "cannot load" in capsys.readouterr().err
    before = sorted(tmp_path.parent.iterdir())
    assert main(["--genotype", "dlsr_s_x2", "--onnx", str(tmp_path)]) == 2  # a folder, not a file
    assert f"dlsr-export: error: {tmp_path} is a folder" in capsys.readouterr().err
    assert sorted(tmp_path.parent.iterdir()) == before and not list(tmp_path.iterdir())
    assert main(["--genotype", "dlsr_s_x2", "--onnx", str(tmp_path / "sub" / "old.onnx"), "--opset", "5"]) == 2
    assert "dlsr-export: error: ONNX export failed (opset 5)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # not even the folder it would have gone in
    (tmp_path / "old.onnx").write_bytes(b"an earlier export")
    assert main(["--genotype", "dlsr_s_x2", "--onnx", str(tmp_path / "old.onnx")]) == 2
    assert "old.onnx already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (tmp_path / "old.onnx").read_bytes() == b"an earlier export"
    assert main(["--genotype", "dlsr_s_x2", "--onnx", str(tmp_path / "old.onnx"), "--overwrite"]) == 0
    assert (tmp_path / "old.onnx").read_bytes() != b"an earlier export"
