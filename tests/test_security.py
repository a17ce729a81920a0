"""Untrusted model directories: a config.json or model.safetensors from a Hub repo or a download is input
from a stranger. Loading must never execute code, never allocate what the input merely claims, and
refuse with a `GenotypeError` / `ModelLoadError` that says exactly what is wrong.

Each hostile input is its own test. "Never built" is checked with `NoBuild`, a DLSR subclass whose
constructor fails, and "never allocated" with `MetaOnly`, whose constructor fails unless it runs on the
meta device (where building allocates nothing).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlsr_infer import DLSR, GenotypeError, ModelLoadError
from dlsr_infer import pretrained
from dlsr_infer.genotype import MAX_CELLS, MAX_CHANNELS, MAX_CONFIG_BYTES, Genotype, builtin, load, loads
from dlsr_infer.pretrained import CONFIG_NAME, MAX_HEADER_BYTES, WEIGHTS_NAME


class NoBuild(DLSR):
    """Fails if anything tries to build a network from the config."""

    def __init__(self, genotype: Genotype) -> None:
        raise AssertionError(f"a network was built from a config that should have been refused: {genotype}")


class MetaOnly(DLSR):
    """Builds only where building allocates no memory (the meta device)."""

    built: list[str] = []

    def __init__(self, genotype: Genotype) -> None:
        device = torch.get_default_device()
        if device.type != "meta":
            raise AssertionError(f"the network was allocated on {device} before its weights were checked")
        MetaOnly.built.append(device.type)
        super().__init__(genotype)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    return DLSR(builtin("dlsr_s_x2")).save_pretrained(tmp_path / "m")


def _base() -> dict:
    return builtin("dlsr_s_x2").to_dict()


def _edit_weights(model_dir: Path, fn) -> None:
    state = load_file(model_dir / WEIGHTS_NAME)
    fn(state)
    save_file(state, model_dir / WEIGHTS_NAME)


def _refused_config(model_dir: Path, text: str | bytes, match: str) -> None:
    """The config is refused by validation (GenotypeError naming the problem) and no network is built."""
    path = model_dir / CONFIG_NAME
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(GenotypeError, match=match):
        load(path)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="invalid config.json: .*" + match) as info:
        NoBuild.from_pretrained(model_dir)
    assert time.perf_counter() - start < 5  # trivially fast: nothing was allocated or built
    assert info.value.__cause__ is None


def _with(**fields) -> str:
    return json.dumps(dict(_base(), **fields))


# --- configs ---------------------------------------------------------------------------------------
def test_config_channels_1e9(model_dir):
    _refused_config(model_dir, _with(channels=10**9), rf"'channels'=1000000000 is out of range \[4, {MAX_CHANNELS}\]")


def test_config_negative_channels(model_dir):
    _refused_config(model_dir, _with(channels=-18), r"'channels'=-18 is out of range")


def test_config_huge_integer_literal(model_dir):
    # Before: Python's int-parsing limit raised a bare ValueError out of from_pretrained.
    _refused_config(model_dir, _with().replace('"channels": 18', '"channels": ' + "9" * 5000),
                    "genotype is not valid JSON: Exceeds the limit")


def test_config_million_cells_file_is_refused_by_size(model_dir):
    cell = json.dumps({"ops": ["conv_1x1"] * 3, "inputs": [0]})
    text = _with(cells=[]).replace('"cells": []', '"cells": [' + (cell + ", ") * (10**6 - 1) + cell + "]")
    _refused_config(model_dir, text, f"over the {MAX_CONFIG_BYTES} byte limit")


def test_config_million_cells_dict_is_refused_by_count():
    cells = [{"ops": ["conv_1x1"] * 3, "inputs": [0]}] * 10**6
    start = time.perf_counter()
    with pytest.raises(GenotypeError, match=f"between 1 and {MAX_CELLS} cells, got 1000000"):
        Genotype.from_dict(dict(_base(), cells=cells))
    assert time.perf_counter() - start < 1  # counted, not walked


def test_config_33_cells(model_dir):
    cells = [{"ops": ["conv_1x1"] * 3, "inputs": [j]} for j in range(MAX_CELLS + 1)]
    _refused_config(model_dir, _with(cells=cells), f"between 1 and {MAX_CELLS} cells, got {MAX_CELLS + 1}")


def test_config_deeply_nested_json(model_dir):
    depth = MAX_CONFIG_BYTES // 2 - 10
    # Before: json raised RecursionError, which escaped as a raw traceback.
    _refused_config(model_dir, "[" * depth + "]" * depth, "genotype JSON is nested too deeply")


def test_config_deeply_nested_cells(model_dir):
    nested = {"ops": ["conv_1x1"] * 3, "inputs": [0]}
    for _ in range(200):
        nested = [nested]
    _refused_config(model_dir, _with(cells=[nested]), "cell 1 must be an object")


def test_config_deeply_nested_provenance(model_dir):
    nested: object = 1
    for _ in range(500):  # parses (under the recursion limit) but could not be serialised again
        nested = [nested]
    _refused_config(model_dir, _with(provenance={"x": nested}), "'provenance' nests deeper than 32 levels")


def test_config_50mb_file_is_not_read(model_dir, monkeypatch):
    path = model_dir / CONFIG_NAME
    with open(path, "wb") as f:  # sparse: 50 MB on paper, nothing on disk
        f.truncate(50 * 2**20)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    with pytest.raises(GenotypeError, match=f"52428800 bytes is over the {MAX_CONFIG_BYTES} byte limit"):
        load(path)
    with pytest.raises(ModelLoadError, match="invalid config.json: .*52428800 bytes is over"):
        NoBuild.from_pretrained(model_dir)


def test_config_50mb_text_is_refused_before_parsing():
    with pytest.raises(GenotypeError, match=f"52428800 bytes, over the {MAX_CONFIG_BYTES} byte limit"):
        loads(b" " * (50 * 2**20))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_config_nan_and_infinity(model_dir, constant):
    _refused_config(model_dir, _with().replace('"channels": 18', f'"channels": {constant}'),
                    f"{constant} is not a JSON number")


def test_config_nan_hidden_in_provenance(model_dir):
    _refused_config(model_dir, _with(provenance={"psnr": float("nan")}), "NaN is not a JSON number")


def test_config_boolean_as_channels(model_dir):
    _refused_config(model_dir, _with(channels=True), "'channels' must be an integer, got True")


def test_config_boolean_as_format_version(model_dir):
    # Before: True == 1 in Python, so `"format_version": true` was accepted as version 1.
    _refused_config(model_dir, _with(format_version=True), "unknown genotype format_version True")


def test_config_float_as_format_version(model_dir):
    _refused_config(model_dir, _with(format_version=1.0), "unknown genotype format_version 1.0")


def test_config_float_as_scale(model_dir):
    _refused_config(model_dir, _with(scale=2.0), "'scale' must be an integer, got 2.0")


def test_config_boolean_as_link(model_dir):
    cells = _base()["cells"]
    cells[1]["inputs"] = [True]
    _refused_config(model_dir, _with(cells=cells), "cell 2: input index True is not an integer")


def test_config_negative_link(model_dir):
    cells = _base()["cells"]
    cells[2]["inputs"] = [-1, 2]
    _refused_config(model_dir, _with(cells=cells), "cell 3: input index -1 is negative")


def test_config_unknown_op_is_not_looked_up_as_code(model_dir):
    cells = _base()["cells"]
    cells[0]["ops"] = ["__import__('os').system('true')", "conv_1x1", "conv_1x1"]
    _refused_config(model_dir, _with(cells=cells), "cell 1: unknown op")


def test_config_not_utf8(model_dir):
    text = _with(name="NAME").replace('"NAME"', '"\xff\xfe"').encode("latin-1")
    _refused_config(model_dir, text, "genotype is not valid JSON: 'utf-8' codec can't decode")


def test_largest_valid_config_is_not_allocated_before_the_weights_are_checked(model_dir):
    # 512 channels x 32 densely linked cells of 7x7 convs is a valid genotype of ~1.5e9 parameters
    # (5.5 GB, minutes of random init). A 1 KB config.json must not make us allocate that: the network is
    # built on the meta device and the (small) weights file refused against it.
    cells = [{"ops": ["conv_7x7"] * 3, "inputs": list(range(j))} for j in range(1, MAX_CELLS + 1)]
    (model_dir / CONFIG_NAME).write_text(_with(channels=MAX_CHANNELS, cells=cells, scale=4))
    MetaOnly.built.clear()
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"does not match its genotype: missing tensors \[.*\] \(\+\d+ more\)"):
        MetaOnly.from_pretrained(model_dir)
    assert MetaOnly.built == ["meta"]
    assert time.perf_counter() - start < 15


# --- weights ---------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would create the marker directory (stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_weights_that_are_a_torch_pickle_are_refused_unopened(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"stem.weight": _Payload(marker)}, model_dir / WEIGHTS_NAME)  # zip + pickle, torch's format
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a valid safetensors file"):
        DLSR.from_pretrained(model_dir)
    assert not marker.exists()


def test_weights_that_are_a_raw_pickle_are_refused_unopened(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    (model_dir / WEIGHTS_NAME).write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a valid safetensors file"):
        DLSR.from_pretrained(model_dir)
    assert not marker.exists()


def test_a_pickle_next_to_missing_safetensors_is_ignored(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, model_dir / "pytorch_model.bin")
    (model_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        DLSR.from_pretrained(model_dir)
    assert not marker.exists()


@pytest.fixture
def data_never_read(monkeypatch):
    """Tensor-level problems must be found from the header alone, before any tensor data is read."""
    monkeypatch.setattr(pretrained, "read_state_dict", lambda path: pytest.fail("tensor data was read"))


def test_weights_with_an_extra_tensor(model_dir, data_never_read):
    _edit_weights(model_dir, lambda s: s.__setitem__("evil.weight", torch.zeros(1000, 1000)))
    with pytest.raises(ModelLoadError, match=r"unexpected tensors \['evil.weight'\]"):
        DLSR.from_pretrained(model_dir)


def test_weights_with_a_missing_tensor(model_dir, data_never_read):
    _edit_weights(model_dir, lambda s: s.pop("upsampler.conv.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensors \['upsampler.conv.weight'\]"):
        DLSR.from_pretrained(model_dir)


def test_weights_with_a_misshaped_tensor(model_dir, data_never_read):
    _edit_weights(model_dir, lambda s: s.__setitem__("cells.0.fuse.weight", torch.zeros(18, 36, 3, 3)))
    with pytest.raises(ModelLoadError, match=r"mis-shaped tensors \['cells.0.fuse.weight: expected \(18, 36, 1, 1\), "
                                             r"found \(18, 36, 3, 3\)'\]"):
        DLSR.from_pretrained(model_dir)


def test_weights_with_an_int_tensor(model_dir, data_never_read):
    _edit_weights(model_dir, lambda s: s.__setitem__("stem.bias", torch.zeros(18, dtype=torch.int64)))
    with pytest.raises(ModelLoadError, match=r"bad dtypes \['stem.bias: torch.int64 is not a floating-point tensor'\]"):
        DLSR.from_pretrained(model_dir)


def test_weights_with_a_bool_tensor(model_dir, data_never_read):
    _edit_weights(model_dir, lambda s: s.__setitem__("stem.bias", torch.zeros(18, dtype=torch.bool)))
    with pytest.raises(ModelLoadError, match=r"bad dtypes \['stem.bias: torch.bool is not a floating-point tensor'\]"):
        DLSR.from_pretrained(model_dir)


def test_weights_with_20k_extra_tensors_give_a_bounded_message(model_dir, data_never_read):
    _edit_weights(model_dir, lambda s: s.update({f"junk.{i:05d}": torch.zeros(1) for i in range(20_000)}))
    with pytest.raises(ModelLoadError, match=r"unexpected tensors \['junk.00000', .*\] \(\+19980 more\)") as info:
        DLSR.from_pretrained(model_dir)
    assert len(str(info.value)) < 2000


def test_half_precision_weights_still_load(model_dir):
    torch.manual_seed(0)
    reference = DLSR(builtin("dlsr_s_x2"))
    _edit_weights(model_dir, lambda s: s.update({k: v.half() for k, v in s.items()}))
    loaded = DLSR.from_pretrained(model_dir)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded.stem.weight, reference.stem.weight, atol=1e-3, rtol=1e-3)


# --- safetensors headers -----------------------------------------------------------------------------
def _write_safetensors(path: Path, header_len: int, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", header_len) + header + data)


def _refused_weights(model_dir: Path, match: str) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a valid safetensors file \(corrupt or "
                                             r"truncated\?\): (Error while deserializing header: )?" + match):
        MetaOnly.from_pretrained(model_dir)


def test_header_length_of_2_to_the_63(model_dir):
    _write_safetensors(model_dir / WEIGHTS_NAME, 2**63, b"{}")
    _refused_weights(model_dir, f"its header claims {2**63} bytes but the file has 10")


def test_header_length_over_the_limit(model_dir):
    path = model_dir / WEIGHTS_NAME
    claimed = MAX_HEADER_BYTES + 1
    with open(path, "wb") as f:  # a sparse file that really is that long: the limit, not the size, refuses it
        f.write(struct.pack("<Q", claimed))
        f.truncate(8 + claimed)
    _refused_weights(model_dir, f"its header claims {claimed} bytes, over the {MAX_HEADER_BYTES} byte limit")


def test_header_claiming_a_terabyte_tensor(model_dir):
    header = json.dumps({"stem.weight": {"dtype": "F32", "shape": [10**12],
                                         "data_offsets": [0, 4 * 10**12]}}).encode()
    _write_safetensors(model_dir / WEIGHTS_NAME, len(header), header, b"\0" * 16)
    _refused_weights(model_dir, "incomplete metadata, file not fully covered")


def test_header_whose_shape_overflows(model_dir):
    header = json.dumps({"stem.weight": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}).encode()
    _write_safetensors(model_dir / WEIGHTS_NAME, len(header), header, b"\0" * 16)
    _refused_weights(model_dir, "overflow computing buffer size")


def test_header_whose_offsets_overlap(model_dir):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    _write_safetensors(model_dir / WEIGHTS_NAME, len(header), header, b"\0" * 16)
    _refused_weights(model_dir, "invalid offset for tensor")


def test_header_with_an_unsupported_dtype(model_dir):
    header = json.dumps({"stem.weight": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    _write_safetensors(model_dir / WEIGHTS_NAME, len(header), header, b"\0" * 16)
    with pytest.raises(ModelLoadError, match="tensor 'stem.weight' has dtype C64, which is not a supported weight"):
        MetaOnly.from_pretrained(model_dir)


def test_empty_weights_file(model_dir):
    (model_dir / WEIGHTS_NAME).write_bytes(b"")
    _refused_weights(model_dir, "only 0 bytes")
