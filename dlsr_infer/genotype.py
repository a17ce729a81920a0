"""The genotype: the single JSON description of a DLSR network (format version 1).

A genotype says everything needed to build a network and nothing about its weights:

    {
      "format_version": 1,
      "scale": 4, "in_channels": 3, "out_channels": 3, "channels": 48,
      "cells": [
        {"ops": ["conv_1x1", "sep_conv_7x7", "sep_conv_5x5"], "inputs": [0]},
        ...
      ],
      "provenance": {...}            # optional, never needed to build
    }

`inputs` are indices into {0: stem features, 1..j-1: outputs of earlier cells}; a cell with more than
one input sees their concatenation, in the order listed, through a 1x1 conv. Validation is strict and
bounded so that a hostile config cannot make us allocate absurd amounts of memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

FORMAT_VERSION = 1

#: The paper's nine candidate operations for a Mixed Residual Block, in a fixed order
#: (the order of the architecture weights alpha in the supernet).
OP_NAMES: tuple[str, ...] = (
    "conv_1x1",
    "conv_3x3",
    "conv_5x5",
    "conv_7x7",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "sep_conv_7x7",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

OPS_PER_CELL = 3
SCALES = (2, 3, 4)

# Limits that keep a hostile or mistyped config from allocating absurd memory.
MAX_CHANNELS = 512
MAX_CELLS = 32
MAX_IO_CHANNELS = 4
MAX_CONFIG_BYTES = 1 << 20
#: How deeply the free-form `provenance` object may nest (deeper JSON cannot be re-serialised safely).
MAX_PROVENANCE_DEPTH = 32

_TOP_KEYS = {"format_version", "scale", "in_channels", "out_channels", "channels", "cells", "provenance", "name"}


class GenotypeError(ValueError):
    """A genotype/config that cannot describe a valid DLSR network."""


@dataclass(frozen=True)
class CellSpec:
    """One distillation cell: its three MRB ops and the indices of the tensors it reads."""

    ops: tuple[str, ...]
    inputs: tuple[int, ...]


@dataclass(frozen=True)
class Genotype:
    """A validated, immutable network description. Build one with `Genotype.from_dict` or `load`."""

    scale: int
    cells: tuple[CellSpec, ...]
    channels: int = 48
    in_channels: int = 3
    out_channels: int = 3
    name: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # held as tuples, whatever sequences were passed: validated once, it cannot be changed afterwards
        cells = self.cells
        if isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence) \
                or not all(isinstance(c, CellSpec) for c in cells):
            raise GenotypeError("Genotype(cells=...) takes a sequence of CellSpec (for JSON-style dicts use "
                                f"Genotype.from_dict), got {cells!r:.80}")
        for j, c in enumerate(cells, start=1):
            for what, value in (("ops", c.ops), ("inputs", c.inputs)):
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                    raise GenotypeError(f"cell {j}: {what} must be a list, got {value!r:.80}")
        object.__setattr__(self, "cells", tuple(CellSpec(tuple(c.ops), tuple(c.inputs)) for c in cells))
        validate(self.to_dict())

    # --- conversion -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Genotype":
        validate(data)
        return cls(
            scale=int(data["scale"]),
            cells=tuple(CellSpec(tuple(c["ops"]), tuple(int(i) for i in c["inputs"])) for c in data["cells"]),
            channels=int(data["channels"]),
            in_channels=int(data["in_channels"]),
            out_channels=int(data["out_channels"]),
            name=data.get("name"),
            provenance=dict(data.get("provenance") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        if self.name is not None:
            out["name"] = self.name
        out.update(
            scale=self.scale,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            channels=self.channels,
            cells=[{"ops": list(c.ops), "inputs": list(c.inputs)} for c in self.cells],
        )
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **changes: Any) -> "Genotype":
        """A copy with some fields changed (e.g. `scale=4` to warm-start x4 from x2)."""
        data = self.to_dict()
        if "cells" in changes:
            changes["cells"] = [{"ops": list(c.ops), "inputs": list(c.inputs)} for c in changes["cells"]]
        data.update(changes)
        return Genotype.from_dict(data)

    def architecture_equals(self, other: "Genotype") -> bool:
        """True when both describe the same network (name and provenance ignored)."""
        strip = lambda g: {k: v for k, v in g.to_dict().items() if k not in ("name", "provenance")}  # noqa: E731
        return strip(self) == strip(other)

    @property
    def num_cells(self) -> int:
        return len(self.cells)


# --- validation --------------------------------------------------------------------------------
def _int_field(data: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    if key not in data:
        raise GenotypeError(f"genotype is missing the field {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenotypeError(f"genotype field {key!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise GenotypeError(f"genotype field {key!r}={value} is out of range [{lo}, {hi}]")
    return value


def _nesting_depth(value: Any, limit: int) -> int:
    """Depth of nested lists/dicts in `value` (iterative; stops counting once past `limit`)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((c, depth + 1) for c in children)
    return deepest


def _reject_constant(name: str) -> Any:
    raise GenotypeError(f"genotype is not valid JSON: {name} is not a JSON number")


def validate(data: Mapping[str, Any]) -> None:
    """Raise `GenotypeError` naming the first problem found in a genotype dict."""
    if not isinstance(data, Mapping):
        raise GenotypeError(f"genotype must be a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    # `type(...) is int`: True == 1 and 1.0 == 1 in Python, but neither is format version 1.
    if type(version) is not int or version != FORMAT_VERSION:
        raise GenotypeError(
            f"unknown genotype format_version {version!r}; this dlsr understands version {FORMAT_VERSION}"
        )
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise GenotypeError(f"unknown genotype field(s): {sorted(unknown)}")
    scale = _int_field(data, "scale", 1, 8)
    if scale not in SCALES:
        raise GenotypeError(f"genotype scale {scale} is not supported; use one of {SCALES}")
    _int_field(data, "in_channels", 1, MAX_IO_CHANNELS)
    _int_field(data, "out_channels", 1, MAX_IO_CHANNELS)
    _int_field(data, "channels", 4, MAX_CHANNELS)  # >= 4: ESA works on channels // 4
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise GenotypeError("genotype field 'name' must be a string")
    prov = data.get("provenance")
    if prov is not None and not isinstance(prov, Mapping):
        raise GenotypeError("genotype field 'provenance' must be an object")
    if prov is not None and _nesting_depth(prov, MAX_PROVENANCE_DEPTH) > MAX_PROVENANCE_DEPTH:
        raise GenotypeError(f"genotype field 'provenance' nests deeper than {MAX_PROVENANCE_DEPTH} levels")
    if prov is not None:  # what we save must load again: JSON has no NaN/Infinity, and no other types
        try:
            json.dumps(prov, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GenotypeError(f"genotype field 'provenance' must be plain JSON without NaN/Infinity: {e}") from None
    for field in ("name", "provenance"):  # '\ud800' parses as JSON but is no text a file can hold
        try:
            json.dumps(data.get(field), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise GenotypeError(f"genotype field {field!r} holds a lone surrogate (\\ud800-\\udfff): not text "
                                "that UTF-8 can store") from None

    cells = data.get("cells")
    if not isinstance(cells, Sequence) or isinstance(cells, (str, bytes)):
        raise GenotypeError("genotype field 'cells' must be a list")
    if not 1 <= len(cells) <= MAX_CELLS:
        raise GenotypeError(f"genotype must have between 1 and {MAX_CELLS} cells, got {len(cells)}")
    for j, cell in enumerate(cells, start=1):
        where = f"cell {j}"
        if not isinstance(cell, Mapping):
            raise GenotypeError(f"{where} must be an object with 'ops' and 'inputs'")
        extra = set(cell) - {"ops", "inputs"}
        if extra:
            raise GenotypeError(f"{where} has unknown field(s): {sorted(extra)}")
        ops = cell.get("ops")
        if not isinstance(ops, Sequence) or isinstance(ops, (str, bytes)) or len(ops) != OPS_PER_CELL:
            raise GenotypeError(f"{where} must list exactly {OPS_PER_CELL} ops, got {ops!r}")
        for op in ops:
            if op not in OP_NAMES:
                raise GenotypeError(f"{where}: unknown op {op!r}; known ops: {', '.join(OP_NAMES)}")
        inputs = cell.get("inputs")
        if not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes)) or not inputs:
            raise GenotypeError(f"{where} must list at least one input index, got {inputs!r}")
        if len(inputs) > j:
            raise GenotypeError(f"{where} lists {len(inputs)} inputs but only {j} tensors precede it")
        for i in inputs:
            if isinstance(i, bool) or not isinstance(i, int):
                raise GenotypeError(f"{where}: input index {i!r} is not an integer")
            if i < 0:
                raise GenotypeError(f"{where}: input index {i} is negative")
            if i >= j:
                raise GenotypeError(
                    f"{where}: input {i} is a forward link (a cell may read the stem (0) and cells 1..{j - 1})"
                )
        if len(set(inputs)) != len(inputs):
            raise GenotypeError(f"{where}: duplicate input link in {list(inputs)}")


# --- files ---------------------------------------------------------------------------------------
def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise GenotypeError(f"genotype JSON gives the field {key!r} twice")
        data[key] = value
    return data


def loads(text: str | bytes) -> Genotype:
    """Parse and validate genotype JSON text."""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > MAX_CONFIG_BYTES:
        raise GenotypeError(f"genotype JSON is {size} bytes, over the {MAX_CONFIG_BYTES} byte limit")
    try:  # NaN / Infinity are not JSON; a field given twice would silently keep its last value
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_fields)
    except RecursionError:
        raise GenotypeError("genotype JSON is nested too deeply") from None
    except GenotypeError:
        raise
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer with > 4300 digits
        raise GenotypeError(f"genotype is not valid JSON: {e}") from None
    return Genotype.from_dict(data)


def load(path: str | Path) -> Genotype:
    """Read a genotype JSON file (`config.json` of a model directory, or a bare genotype)."""
    path = Path(path)
    if path.is_dir():
        hint = f": give {path / 'config.json'}" if (path / "config.json").is_file() else ""
        raise FileNotFoundError(f"genotype file not found: {path} is a directory{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"genotype file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise GenotypeError(f"{path}: {size} bytes is over the {MAX_CONFIG_BYTES} byte limit for a genotype")
    try:
        return loads(path.read_bytes())
    except GenotypeError as e:
        raise GenotypeError(f"{path}: {e}") from None
    except OSError as e:  # a file we may not read: say so, not a traceback
        raise GenotypeError(f"{path}: cannot be read: {e.strerror or e}") from None


def save(genotype: Genotype, path: str | Path) -> None:
    Path(path).write_text(genotype.to_json())


# --- the genotypes we ship ---------------------------------------------------------------------
BUILTIN = ("dlsr_x2", "dlsr_x3", "dlsr_x4", "dlsr_s_x2")


def builtin(name: str) -> Genotype:
    """One of the shipped genotypes: 'dlsr_x2', 'dlsr_x3', 'dlsr_x4' (the paper's) or 'dlsr_s_x2' (18 ch)."""
    if name not in BUILTIN:
        raise KeyError(f"no built-in genotype {name!r}; choose from {', '.join(BUILTIN)}")
    text = resources.files("dlsr_infer.genotypes").joinpath(f"{name}.json").read_text()
    return loads(text)


def mrb_param_count(op: str, channels: int) -> int:
    """Parameters of one MRB op at `channels` (used by the supernet's parameter loss L_P)."""
    k = int(op[-1])
    if op.startswith("conv_"):
        return channels * channels * k * k
    if op.startswith("sep_conv_"):
        return 2 * (channels * k * k + channels * channels)
    if op.startswith("dil_conv_"):
        return channels * k * k + channels * channels
    raise GenotypeError(f"unknown op {op!r}")


def receptive_radius(genotype: Genotype) -> int:
    """A bound, in LR pixels, on how far one output pixel's value reaches into the input.

    ESA pools globally-ish (stride-2 conv, 7x7/3 max pool), so this is the local-conv radius only;
    tiled inference uses it to size overlaps, and ESA's wide context is why overlaps stay generous.
    """
    radius = 1  # stem 3x3
    for cell in genotype.cells:
        for op in cell.ops:
            k = int(op[-1])
            dil = 2 if op.startswith("dil_") else 1
            reps = 2 if op.startswith("sep_") else 1
            radius += reps * dil * (k // 2)
        radius += 1  # c4 3x3
    radius += 2  # LR conv 3x3 and upsampler 3x3
    return radius


__all__ = [
    "BUILTIN",
    "CellSpec",
    "FORMAT_VERSION",
    "Genotype",
    "GenotypeError",
    "OP_NAMES",
    "builtin",
    "load",
    "loads",
    "mrb_param_count",
    "receptive_radius",
    "save",
    "validate",
]
