"""Genotype JSON: the shipped genotypes, and one specific error per malformed case."""
from __future__ import annotations

import copy
import json

import pytest

from dlsr_infer.genotype import (BUILTIN, OP_NAMES, Genotype, GenotypeError, builtin, load, loads,
                                 receptive_radius, save)

PAPER_OPS = ["conv_1x1", "sep_conv_7x7", "sep_conv_5x5"]
PAPER_INPUTS = [[0], [1], [1, 2], [2, 3], [2, 4], [4, 5]]


def valid() -> dict:
    return copy.deepcopy(builtin("dlsr_x2").to_dict())


@pytest.mark.parametrize("name,scale,channels", [("dlsr_x2", 2, 48), ("dlsr_x3", 3, 48), ("dlsr_x4", 4, 48),
                                                 ("dlsr_s_x2", 2, 18)])
def test_shipped_genotypes_are_the_papers(name, scale, channels):
    g = builtin(name)
    assert (g.scale, g.channels, g.in_channels, g.out_channels) == (scale, channels, 3, 3)
    assert [list(c.ops) for c in g.cells] == [PAPER_OPS] * 6
    assert [list(c.inputs) for c in g.cells] == PAPER_INPUTS


def test_builtin_names_and_unknown():
    assert set(BUILTIN) == {"dlsr_x2", "dlsr_x3", "dlsr_x4", "dlsr_s_x2"}
    with pytest.raises(KeyError, match="no built-in genotype"):
        builtin("dlsr_x8")


def test_json_round_trip(tmp_path):
    g = builtin("dlsr_x4").replace(provenance={"alphas": [[0.1] * 9] * 3, "seed": 3})
    save(g, tmp_path / "g.json")
    back = load(tmp_path / "g.json")
    assert back == g and back.provenance["seed"] == 3
    assert back.architecture_equals(builtin("dlsr_x4"))
    assert json.loads(g.to_json())["format_version"] == 1


def test_provenance_is_not_needed_to_build():
    d = valid()
    d.pop("provenance", None)
    d.pop("name", None)
    assert Genotype.from_dict(d).architecture_equals(builtin("dlsr_x2"))


def _mutate(fn):
    d = valid()
    fn(d)
    return d


CASES = {
    "unknown op": (lambda d: d["cells"][0]["ops"].__setitem__(1, "conv_9x9"), "unknown op 'conv_9x9'"),
    "forward link": (lambda d: d["cells"][2].__setitem__("inputs", [1, 3]), "forward link"),
    "self link": (lambda d: d["cells"][2].__setitem__("inputs", [3]), "forward link"),
    "duplicate link": (lambda d: d["cells"][3].__setitem__("inputs", [2, 2]), "duplicate input link"),
    "negative link": (lambda d: d["cells"][3].__setitem__("inputs", [-1, 2]), "negative"),
    "no inputs": (lambda d: d["cells"][3].__setitem__("inputs", []), "at least one input"),
    "two ops": (lambda d: d["cells"][0].__setitem__("ops", ["conv_1x1", "conv_3x3"]), "exactly 3 ops"),
    "no cells": (lambda d: d.__setitem__("cells", []), "between 1 and"),
    "bad scale": (lambda d: d.__setitem__("scale", 5), "scale 5 is not supported"),
    "scale as string": (lambda d: d.__setitem__("scale", "2"), "must be an integer"),
    "scale as bool": (lambda d: d.__setitem__("scale", True), "must be an integer"),
    "zero channels": (lambda d: d.__setitem__("channels", 0), "out of range"),
    "huge channels": (lambda d: d.__setitem__("channels", 10**9), "out of range"),
    "bad in_channels": (lambda d: d.__setitem__("in_channels", 0), "'in_channels'=0 is out of range"),
    "missing channels": (lambda d: d.pop("channels"), "missing the field 'channels'"),
    "format version": (lambda d: d.__setitem__("format_version", 2), "unknown genotype format_version 2"),
    "no format version": (lambda d: d.pop("format_version"), "format_version None"),
    "unknown field": (lambda d: d.__setitem__("colour", 1), "unknown genotype field"),
    "unknown cell field": (lambda d: d["cells"][0].__setitem__("kernel", 3), "unknown field"),
    "too many cells": (lambda d: d.__setitem__("cells", [d["cells"][0]] * 33), "between 1 and 32"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_genotype_gives_specific_error(case):
    mutate, message = CASES[case]
    with pytest.raises(GenotypeError, match=message):
        Genotype.from_dict(_mutate(mutate))


def test_not_json_and_not_object(tmp_path):
    with pytest.raises(GenotypeError, match="not valid JSON"):
        loads("{oops")
    with pytest.raises(GenotypeError, match="must be a JSON object"):
        loads("[1, 2]")
    p = tmp_path / "config.json"
    p.write_text("{")
    with pytest.raises(GenotypeError, match="config.json"):
        load(p)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.json")


def test_a_field_given_twice_is_refused_not_taken_from_its_last_value():
    text = builtin("dlsr_x2").to_json().replace('"scale": 2,', '"scale": 2, "scale": 4,', 1)
    assert text.count('"scale"') == 2
    with pytest.raises(GenotypeError, match="gives the field 'scale' twice"):
        loads(text)
    compact, cell = json.dumps(valid()), json.dumps(valid()["cells"][0])
    assert cell in compact
    with pytest.raises(GenotypeError, match="gives the field 'ops' twice"):
        loads(compact.replace(cell[:-1], cell[:-1] + ', "ops": ["conv_1x1"]', 1))


def test_a_genotype_built_directly_is_as_immutable_and_checked_as_one_from_json():
    from dlsr_infer.genotype import CellSpec

    ref = builtin("dlsr_x2")
    cells = [CellSpec(list(c.ops), list(c.inputs)) for c in ref.cells]
    direct = Genotype(scale=2, cells=cells)
    assert direct.cells == ref.cells and isinstance(direct.cells, tuple)
    assert all(isinstance(c.ops, tuple) and isinstance(c.inputs, tuple) for c in direct.cells)
    cells.append(CellSpec(("nope",) * 3, (0,)))  # the caller's list changes; the validated genotype does not
    assert direct.num_cells == 6 and hash(direct) == hash(Genotype(scale=2, cells=ref.cells))
    with pytest.raises(GenotypeError, match="takes a sequence of CellSpec"):
        Genotype(scale=2, cells=[{"ops": PAPER_OPS, "inputs": [0]}])
    with pytest.raises(GenotypeError, match="cell 1: ops must be a list, got 'conv_1x1'"):
        Genotype(scale=2, cells=[CellSpec("conv_1x1", (0,))])


def test_the_size_limit_counts_bytes_not_characters(monkeypatch):
    import dlsr_infer.genotype as genotype_mod

    text = builtin("dlsr_x2").to_dict()
    text["name"] = "\u00e9" * 200  # 200 characters, 400 bytes in UTF-8
    text = json.dumps(text, ensure_ascii=False)
    monkeypatch.setattr(genotype_mod, "MAX_CONFIG_BYTES", len(text) + 100)
    with pytest.raises(GenotypeError, match=f"is {len(text.encode())} bytes, over the"):
        loads(text)
    monkeypatch.setattr(genotype_mod, "MAX_CONFIG_BYTES", len(text.encode()))
    assert loads(text).name == "\u00e9" * 200


def test_all_ops_known_and_receptive_radius_grows_with_kernels():
    assert len(OP_NAMES) == 9
    small = Genotype.from_dict(_mutate(lambda d: [c.__setitem__("ops", ["conv_1x1"] * 3) for c in d["cells"]]))
    assert receptive_radius(small) < receptive_radius(builtin("dlsr_x2"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1, 2}, b"bytes"])
def test_provenance_must_be_json_that_loads_again(value):
    # NaN used to be accepted, saved as the non-JSON token NaN, and then refused on load.
    with pytest.raises(GenotypeError, match="provenance' must be plain JSON"):
        builtin("dlsr_s_x2").replace(provenance={"final_loss": [1.0, value]})


@pytest.mark.parametrize("field, value", [("name", "\ud800"), ("provenance", {"note": "a\udfffb"})])
def test_text_utf8_cannot_store_is_refused(field, value, tmp_path):
    """A config.json with "\\ud800" in its name loaded; save_pretrained then failed (UnicodeEncodeError) and
    left an empty folder behind."""
    with pytest.raises(GenotypeError, match=f"'{field}' holds a lone surrogate"):
        builtin("dlsr_s_x2").replace(**{field: value})
    text = builtin("dlsr_s_x2").to_json().replace('"name": "dlsr_s_x2"', '"name": "\\ud800"')
    with pytest.raises(GenotypeError, match="lone surrogate"):
        loads(text)
    assert builtin("dlsr_s_x2").replace(name="ünï 😀").name == "ünï 😀"  # any real text is fine
