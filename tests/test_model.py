"""The DLSR network: exact parameter counts, Multi-Adds, round trips, strict loading, import isolation."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlsr_infer import DLSR, ModelLoadError
from dlsr_infer.complexity import complexity
from dlsr_infer.genotype import BUILTIN, OP_NAMES, Genotype, builtin
from dlsr_infer.pretrained import CONFIG_NAME, WEIGHTS_NAME

PAPER_PARAMS = {"dlsr_x2": 322_620, "dlsr_x3": 329_115, "dlsr_x4": 338_208, "dlsr_s_x2": 56_268}
PAPER_MULTI_ADDS = {"dlsr_x2": 67.3e9, "dlsr_x3": 30.5e9, "dlsr_x4": 17.7e9}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper_exactly(name):
    assert DLSR.from_genotype_name(name).num_parameters == PAPER_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PAPER_MULTI_ADDS))
def test_multi_adds_at_720p_within_2_percent(name):
    c = complexity(DLSR.from_genotype_name(name))
    assert abs(c["multi_adds"] / PAPER_MULTI_ADDS[name] - 1) < 0.02, c


def test_complexity_of_a_model_in_another_precision_is_the_same_count():
    """The probe follows the model's device and dtype: a bf16 model (or a CUDA one) is counted, not refused."""
    model = DLSR.from_genotype_name("dlsr_s_x2")
    assert complexity(model.to(torch.bfloat16)) == complexity(DLSR.from_genotype_name("dlsr_s_x2"))


@pytest.mark.parametrize("name", BUILTIN)
def test_round_trip_every_bundled_genotype(name, tmp_path):
    torch.manual_seed(0)
    model = DLSR.from_genotype_name(name)
    x = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        before = model(x)
    model.save_pretrained(tmp_path / name)
    loaded = DLSR.from_pretrained(tmp_path / name)
    assert loaded.genotype == model.genotype
    with torch.no_grad():
        after = loaded(x)
    assert after.shape == (1, 3, 24 * model.scale, 20 * model.scale)
    assert torch.equal(before, after)


def test_save_pretrained_expands_the_home_folder_as_from_pretrained_does(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = DLSR.from_genotype_name("dlsr_s_x2")
    assert model.save_pretrained("~/m") == tmp_path / "home" / "m"  # not ./~/m
    assert not (tmp_path / "~").exists()
    assert DLSR.from_pretrained("~/m").genotype == model.genotype


def test_random_genotype_with_all_ops_builds_and_round_trips(tmp_path):
    cells = [{"ops": list(OP_NAMES[i:i + 3]), "inputs": inputs}
             for i, inputs in zip(range(0, 9, 3), ([0], [0, 1], [2, 0, 1]))]
    g = Genotype.from_dict({"format_version": 1, "scale": 3, "in_channels": 3, "out_channels": 3,
                            "channels": 16, "cells": cells})
    torch.manual_seed(1)
    m = DLSR(g)
    m.save_pretrained(tmp_path)
    x = torch.rand(2, 3, 16, 17)
    with torch.no_grad():
        assert torch.equal(m(x), DLSR.from_pretrained(tmp_path)(x))


def test_saved_weights_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes metadata in hash-map order, which differs between processes: the file is
    canonicalised (sorted header) so that re-exporting the same weights never changes the file."""
    code = ("import sys, torch; from dlsr_infer import DLSR; from dlsr_infer.pretrained import save_model_dir; "
            "torch.manual_seed(0); m = DLSR.from_genotype_name('dlsr_s_x2'); "
            "save_model_dir(m, sys.argv[1], metadata={k: str(i) for i, k in enumerate('abcdefghij')})")
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, timeout=120)
    blobs = {(tmp_path / n / WEIGHTS_NAME).read_bytes() for n in "abc"}
    assert len(blobs) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in "abcdefghij"} == {k: str(i) for i, k in enumerate("abcdefghij")}
    torch.manual_seed(0)
    ref = DLSR.from_genotype_name("dlsr_s_x2").state_dict()
    loaded = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert loaded.keys() == ref.keys() and all(torch.equal(loaded[k], ref[k]) for k in ref)


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    return DLSR.from_genotype_name("dlsr_s_x2").save_pretrained(tmp_path / "m")


def _edit_weights(model_dir, fn):
    path = model_dir / WEIGHTS_NAME
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_strict_loading_names_a_missing_tensor(model_dir):
    _edit_weights(model_dir, lambda s: s.pop("cells.2.esa.conv4.bias"))
    with pytest.raises(ModelLoadError, match=r"missing tensors \['cells.2.esa.conv4.bias'\]"):
        DLSR.from_pretrained(model_dir)


def test_strict_loading_names_an_unexpected_tensor(model_dir):
    _edit_weights(model_dir, lambda s: s.__setitem__("extra.weight", torch.zeros(1)))
    with pytest.raises(ModelLoadError, match=r"unexpected tensors \['extra.weight'\]"):
        DLSR.from_pretrained(model_dir)


def test_strict_loading_names_a_misshaped_tensor(model_dir):
    _edit_weights(model_dir, lambda s: s.__setitem__("stem.weight", torch.zeros(18, 3, 5, 5)))
    with pytest.raises(ModelLoadError, match=r"stem.weight: expected \(18, 3, 3, 3\), found \(18, 3, 5, 5\)"):
        DLSR.from_pretrained(model_dir)


def test_weights_holding_nan_or_inf_are_refused_by_name(model_dir):
    """A diverged run's weights load fine as tensors but give a black image without a word."""
    def poison(s):
        s["stem.weight"] = torch.full_like(s["stem.weight"], float("nan"))
        s["stem.bias"] = torch.full_like(s["stem.bias"], float("inf"))
    _edit_weights(model_dir, poison)
    with pytest.raises(ModelLoadError, match=r"2 tensor\(s\) hold NaN or infinite values \(stem.bias, stem.weight\)"):
        DLSR.from_pretrained(model_dir)


def test_weights_finite_only_in_wider_precision_are_refused_and_float8_is_read(model_dir):
    """The check runs on the float32 tensors the network will hold: 1e300 in F64 is inf there; F8 weights
    (which torch.isfinite cannot test as stored) load, or are refused by name, not with a traceback."""
    state = load_file(model_dir / WEIGHTS_NAME)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        save_file({k: v.to(dtype) for k, v in state.items()}, model_dir / WEIGHTS_NAME)
        model = DLSR.from_pretrained(model_dir)
        assert all(torch.equal(p, state[k].to(dtype).float()) for k, p in model.state_dict().items())
    wide = {k: v.double() for k, v in state.items()}
    wide["stem.bias"] = torch.full_like(wide["stem.bias"], 1e300)
    save_file(wide, model_dir / WEIGHTS_NAME)
    with pytest.raises(ModelLoadError, match=r"1 tensor\(s\) hold NaN or infinite values \(stem.bias\)"):
        DLSR.from_pretrained(model_dir)


def test_saving_over_a_model_directory_changes_all_its_files_or_none(model_dir, monkeypatch):
    """New weights beside the old config.json would be a directory that loads as neither model."""
    import dlsr_infer.imageio as imageio_mod

    before = {f.name: f.read_bytes() for f in model_dir.iterdir()}
    real_stage = imageio_mod._stage_temp

    def disk_full_for_config(path, write, suffix):
        if path.name == CONFIG_NAME:
            raise OSError(28, "No space left on device")
        return real_stage(path, write, suffix)

    monkeypatch.setattr(imageio_mod, "_stage_temp", disk_full_for_config)
    torch.manual_seed(1)
    other = DLSR(builtin("dlsr_s_x2").replace(scale=4))
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(model_dir)
    assert {f.name: f.read_bytes() for f in model_dir.iterdir()} == before
    monkeypatch.undo()
    other.save_pretrained(model_dir)
    assert DLSR.from_pretrained(model_dir).scale == 4


def test_config_that_does_not_match_weights(model_dir):
    (model_dir / CONFIG_NAME).write_text(builtin("dlsr_x2").to_json())
    with pytest.raises(ModelLoadError, match="does not match its genotype"):
        DLSR.from_pretrained(model_dir)


def test_invalid_config_and_missing_files(model_dir, tmp_path):
    (model_dir / CONFIG_NAME).write_text('{"format_version": 1, "scale": 2}')
    with pytest.raises(ModelLoadError, match="invalid config.json"):
        DLSR.from_pretrained(model_dir)
    (model_dir / CONFIG_NAME).unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        DLSR.from_pretrained(model_dir)
    with pytest.raises(ModelLoadError, match="no model directory at"):
        DLSR.from_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_corrupt_weights_file(model_dir):
    (model_dir / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        DLSR.from_pretrained(model_dir)


def test_bad_input_shapes_are_clear():
    m = DLSR.from_genotype_name("dlsr_s_x2")
    with pytest.raises(ValueError, match="expects an N x 3 x H x W"):
        m(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="smaller than 15x15"):
        m(torch.rand(1, 3, 8, 40))


def test_import_dlsr_infer_does_not_import_dlsr_search():
    code = "import sys, dlsr_infer, dlsr_infer.model, dlsr_infer.pretrained; " \
           "print(any(m.split('.')[0] == 'dlsr_search' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
