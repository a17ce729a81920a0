"""The authors' checkpoints convert onto our network, with the [0,255] -> [0,1] change made exactly."""
from __future__ import annotations

import json

import pytest
import torch

from dlsr_infer import DLSR, ModelLoadError
from dlsr_infer.convert import (convert_authors_checkpoint, load_authors_state_dict, main, rename_key,
                                rescale_for_unit_range)
from dlsr_infer.genotype import Genotype, builtin

PAPER_X2 = "RFDN_beta21_ps128_20210128_1000.pt"
TINY = "RFDN_beta21_tiny18_ps128_20210306_lr4_700.pt"
BETA1 = "RFDN_beta1_para_loss.pt"


def beta1_genotype() -> Genotype:
    """The authors' earlier search result: note its links list the later cell first."""
    ops = ["sep_conv_3x3", "sep_conv_5x5", "sep_conv_5x5"]
    inputs = [[0], [1], [2, 1], [3, 2], [4, 3], [1, 3]]
    return Genotype.from_dict({"format_version": 1, "scale": 2, "in_channels": 3, "out_channels": 3,
                               "channels": 48, "cells": [{"ops": ops, "inputs": i} for i in inputs]})


def raw_model(path, genotype):
    """Our architecture holding the authors' weights unchanged (so it works on [0,255] images)."""
    m = DLSR(genotype)
    m.load_state_dict({rename_key(k): v for k, v in load_authors_state_dict(path).items()})
    return m


@pytest.mark.parametrize("ckpt,genotype,params", [(PAPER_X2, builtin("dlsr_x2"), 322_620),
                                                  (TINY, builtin("dlsr_s_x2"), 56_268),
                                                  (BETA1, beta1_genotype(), 327_804)])
def test_converted_model_equals_authors_network_on_unit_range(authors_dir, ckpt, genotype, params):
    converted = convert_authors_checkpoint(authors_dir / ckpt, genotype)
    assert converted.num_parameters == params
    raw = raw_model(authors_dir / ckpt, genotype)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 40, 36)
    with torch.no_grad():
        ours = converted(x)
        theirs = raw(x * 255) / 255
    assert (ours - theirs).abs().max() < 1e-4
    # and the rescaling matters: the raw weights on [0,1] input give something else entirely
    with torch.no_grad():
        assert (raw(x) - theirs).abs().max() > 1e-2


def test_wrong_genotype_is_refused_naming_tensors(authors_dir):
    with pytest.raises(ModelLoadError, match="mis-shaped tensors"):
        convert_authors_checkpoint(authors_dir / TINY, builtin("dlsr_x2"))


def test_cli_writes_a_loadable_model_dir(authors_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main([str(authors_dir / TINY), "--genotype", "dlsr_s_x2", "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["channels"] == 18
    m = DLSR.from_pretrained(out)
    assert m.num_parameters == 56_268
    assert main([str(tmp_path / "nope.pt"), "--genotype", "dlsr_s_x2", "-o", str(tmp_path / "other")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(ModelLoadError, match="refused: it holds objects that weights_only=True does not unpickle"):
        load_authors_state_dict(path)
    # a truncated file is damage, not a security refusal: the message says which
    torch.save({"state_dict": {"x": torch.zeros(3)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        load_authors_state_dict(path)


def _eval_converted(authors_dir, benchmarks_dir, tmp_path, ckpt, genotype_name, sets):
    from dlsr_infer.evaluate import main as dlsr_eval

    out = tmp_path / "m"
    assert main([str(authors_dir / ckpt), "--genotype", genotype_name, "-o", str(out)]) == 0
    report = tmp_path / "r.json"
    argv = [str(out), "--data", str(benchmarks_dir), "--sets", *sets, "--json", str(report)]
    assert dlsr_eval(argv) == 0
    rows = json.loads(report.read_text())
    rows = rows["results"] if isinstance(rows, dict) else rows
    return {r["dataset"]: r for r in rows}


def test_paper_x2_reproduces_set5(authors_dir, benchmarks_dir, tmp_path):
    """The paper's Table 2: DLSR x2 on Set5 is 38.04 dB / 0.9606."""
    r = _eval_converted(authors_dir, benchmarks_dir, tmp_path, PAPER_X2, "dlsr_x2", ["Set5"])["Set5"]
    assert r["images"] == 5
    assert abs(r["psnr"] - 38.04) <= 0.01 and abs(r["ssim"] - 0.9606) <= 0.0005, r


def test_tiny18_converts_and_evaluates(authors_dir, benchmarks_dir, tmp_path):
    r = _eval_converted(authors_dir, benchmarks_dir, tmp_path, TINY, "dlsr_s_x2", ["Set5"])["Set5"]
    assert 37.0 < r["psnr"] < 38.04, r  # a working 56K model: far above bicubic (33.66), below DLSR


@pytest.mark.slow
def test_paper_x2_reproduces_set14_and_b100(authors_dir, benchmarks_dir, tmp_path):
    r = _eval_converted(authors_dir, benchmarks_dir, tmp_path, PAPER_X2, "dlsr_x2", ["Set14", "B100"])
    assert abs(r["Set14"]["psnr"] - 33.63) <= 0.01 and abs(r["Set14"]["ssim"] - 0.9184) <= 0.0005, r["Set14"]
    assert abs(r["B100"]["psnr"] - 32.23) <= 0.01 and abs(r["B100"]["ssim"] - 0.9003) <= 0.0005, r["B100"]


def test_input_range_must_be_finite_and_positive(tmp_path, capsys):
    state = DLSR(builtin("dlsr_s_x2")).state_dict()
    for bad in (0.0, -255.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input_range must be a finite number > 0"):
            rescale_for_unit_range(state, bad)
    for bad in ("0", "-255", "nan", "x"):
        with pytest.raises(SystemExit) as e:
            main(["ckpt.pt", "--genotype", "dlsr_s_x2", "-o", str(tmp_path / "m"), "--input-range", bad])
        assert e.value.code == 2 and "must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_tensor_given_twice_is_refused_not_overwritten(authors_dir, tmp_path):
    state = load_authors_state_dict(authors_dir / TINY)
    key = next(iter(state))
    doubled = {**state, "module." + key: torch.zeros_like(state[key])}
    torch.save({"state_dict": doubled}, tmp_path / "doubled.pt")
    with pytest.raises(ModelLoadError, match=f"'{key}' and 'module.{key}' are both the tensor"):
        convert_authors_checkpoint(tmp_path / "doubled.pt", builtin("dlsr_s_x2"))


def test_output_that_is_a_file_is_a_usage_error(authors_dir, tmp_path, capsys):
    (tmp_path / "m").write_text("precious")
    with pytest.raises(SystemExit) as e:
        main([str(authors_dir / TINY), "--genotype", "dlsr_s_x2", "-o", str(tmp_path / "m")])
    assert e.value.code == 2 and "is a file; give a model directory" in capsys.readouterr().err
    assert (tmp_path / "m").read_text() == "precious"
    # below a file: a clean error (it was a NotADirectoryError traceback, after the conversion)
    assert main([str(authors_dir / TINY), "--genotype", "dlsr_s_x2", "-o", str(tmp_path / "m" / "sub")]) == 1
    err = capsys.readouterr().err
    assert f"dlsr-convert: error: cannot write {tmp_path / 'm' / 'sub'}" in err and "Traceback" not in err
    # tensors under keys that are not names: refused, not an AttributeError from the renaming
    torch.save({"state_dict": {0: torch.zeros(1)}}, tmp_path / "intkey.pt")
    with pytest.raises(ModelLoadError, match="a 'state_dict' of tensors by name"):
        load_authors_state_dict(tmp_path / "intkey.pt")


def test_weights_that_convert_to_nan_or_inf_are_refused_before_anything_is_written(authors_dir, tmp_path, capsys):
    """x255 pushes a large ESA weight past float32 (or the file holds NaN): a model no loader would take."""
    state = load_authors_state_dict(authors_dir / TINY)
    key = next(k for k in state if k.endswith("esa.conv4.weight"))
    torch.save({"state_dict": {**state, key: torch.full_like(state[key], 3e37)}}, tmp_path / "big.pt")
    with pytest.raises(ModelLoadError, match=r"1 tensor\(s\) hold NaN or infinite values after conversion"):
        convert_authors_checkpoint(tmp_path / "big.pt", builtin("dlsr_s_x2"))
    assert main([str(tmp_path / "big.pt"), "--genotype", "dlsr_s_x2", "-o", str(tmp_path / "m")]) == 1
    assert "NaN or infinite" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_an_existing_model_directory_is_replaced_only_with_overwrite(authors_dir, tmp_path, capsys):
    out = DLSR.from_genotype_name("dlsr_s_x2").save_pretrained(tmp_path / "mine")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        main([str(authors_dir / TINY), "--genotype", "dlsr_s_x2", "-o", str(out)])
    assert e.value.code == 2 and "holds a model already (config.json, model.safetensors, README.md); pass " \
        "--overwrite" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert main([str(authors_dir / TINY), "--genotype", "dlsr_s_x2", "-o", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]

