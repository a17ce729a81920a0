"""Model directories (config.json + model.safetensors + README.md) and where to find them.

A name resolves, in order, to: an existing local directory; a bundled alias ('x2', 'x3', 'x4', 'x2-s');
a Hugging Face Hub repo id. A local folder named like an alias is taken only if it holds a config.json: an
output folder called x4 does not hide the bundled x4. Errors say which of these was tried and why it failed, so a typo in a
local path is never reported as a Hub 404 and vice versa.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .genotype import Genotype, GenotypeError, load as load_genotype, loads as load_genotype_text
from .imageio import atomic_write_all

if TYPE_CHECKING:  # pragma: no cover
    from .model import DLSR

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
#: The files a model directory (and a Hub repo of ours) holds.
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
#: safetensors metadata key under which the weights record the genotype they were saved from
GENOTYPE_METADATA = "dlsr_genotype"
#: metadata keys `save_model_dir` writes itself (a caller's metadata may not replace them)
RESERVED_METADATA = ("format", GENOTYPE_METADATA)

#: alias -> (bundled directory name under weights/, Hub repo id used when not bundled)
ALIASES: dict[str, tuple[str, str]] = {
    "x2": ("dlsr-x2", "dlsr-project/dlsr-x2"),
    "x3": ("dlsr-x3", "dlsr-project/dlsr-x3"),
    "x4": ("dlsr-x4", "dlsr-project/dlsr-x4"),
    "x2-s": ("dlsr-s-x2", "dlsr-project/dlsr-s-x2"),
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")

#: Largest safetensors JSON header we agree to parse. Ours are a few KB (tensor index + the genotype as
#: metadata); the format itself allows 100 MB, which a hostile file could use to make us parse junk.
MAX_HEADER_BYTES = 16 << 20
#: safetensors dtype names -> torch dtypes (for describing a file's tensors without reading them).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
del _name, _attr


class ModelLoadError(RuntimeError):
    """A model could not be found or its files are not a valid DLSR model directory."""


# --- locating -------------------------------------------------------------------------------------
def bundled_weights_dir() -> Path | None:
    """Where the bundled model directories live: installed package data, or the source checkout."""
    try:
        installed = Path(str(resources.files("dlsr_infer").joinpath("_weights")))
        if installed.is_dir():
            return installed
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    checkout = Path(__file__).resolve().parents[1] / "weights"
    return checkout if checkout.is_dir() else None


def bundled_model_dir(alias: str) -> Path | None:
    """The bundled directory for an alias, or None when that alias has no bundled weights."""
    root = bundled_weights_dir()
    if alias not in ALIASES or root is None:
        return None
    path = root / ALIASES[alias][0]
    return path if (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file() else None


def _looks_like_path(name: str) -> bool:
    """A name no Hub repo id can be ('./m', '/m', '~/m', 'a/b/c', 'a\\b', 'C:m'), on every platform: on
    Windows '/' is also a path separator, yet 'owner/name' is still a repo id there."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 \
        or re.match(r"^[A-Za-z]:", name) is not None


def hides_no_alias(name: str, local: Path) -> bool:
    """False for a file, or a folder that holds no config.json (an output folder), named like an alias
    ('x4'): it is not the model that name means, the bundled alias is. How `resolve` (and `upscale()`'s
    model cache) read a name given as a string."""
    return name not in ALIASES or (local / CONFIG_NAME).exists()


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, local_files_only: bool = False,
            cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> Path:
    """Turn a directory, alias or Hub repo id into a local model directory. A `Path` (any `os.PathLike`) is
    a local directory only: it is never looked up as an alias or sent to the Hub."""
    path_only = isinstance(name_or_path, os.PathLike)
    if path_only:
        name_or_path = os.fspath(name_or_path)
    revision = revision or None  # "" is no revision: the bundled weights still serve an alias
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"expected a model directory, alias or Hub repo id, got {name_or_path!r}")
    try:
        local = Path(name_or_path).expanduser()
        is_dir, exists = local.is_dir(), local.exists()
        if not path_only and exists and not hides_no_alias(name_or_path, local):
            is_dir = exists = False  # an output folder (or file) called x4 is not the model x4 means
    except (RuntimeError, OSError) as e:  # '~nosuchuser/...', a name too long for the file system
        raise ModelLoadError(f"{name_or_path!r} is not a usable model directory path: {e}") from None
    if is_dir:
        if revision is not None:  # loading the folder would quietly ignore the pin
            raise ModelLoadError(f"revision {revision!r} was asked for, but {name_or_path!r} is a local directory "
                                 "(a revision applies to Hub repos): pass a Hub repo id, or no revision")
        return local
    if exists:
        raise ModelLoadError(f"{name_or_path!r} is a file, not a model directory (expected {CONFIG_NAME} + "
                             f"{WEIGHTS_NAME} inside a directory)")
    if path_only:
        broken = " (a broken symbolic link)" if local.is_symlink() else ""
        raise ModelLoadError(f"no model directory at {name_or_path!r}{broken}")
    if name_or_path in ALIASES:
        bundled = bundled_model_dir(name_or_path)
        if bundled is not None and revision is None:  # a pinned revision is the Hub's to give
            return bundled
        repo_id = ALIASES[name_or_path][1]
        why = (f"revision {revision!r} of alias {name_or_path!r} was asked for, so the bundled weights were not "
               "used" if bundled is not None else
               f"weights for alias {name_or_path!r} are not bundled with this installation of dlsr")
        try:
            return download(repo_id, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                            token=token)
        except ModelLoadError as e:
            raise ModelLoadError(f"{why}, and fetching them from the Hugging Face Hub repo {repo_id!r} failed: {e}") \
                from None
    if _looks_like_path(name_or_path) or not _REPO_ID.match(name_or_path):
        raise ModelLoadError(
            f"no model directory at {name_or_path!r}; it is not a known alias ({', '.join(ALIASES)}) and not a "
            "Hub repo id of the form 'owner/name'"
        )
    try:
        return download(name_or_path, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                        token=token)
    except ModelLoadError as e:  # 'models/goood' beside a local models/: most likely a typo of a local path
        owner = Path(name_or_path.split("/", 1)[0]).expanduser()
        if owner.is_dir():
            raise ModelLoadError(f"no model directory at {name_or_path!r} (the folder {str(owner)!r} exists here), "
                                 f"and as a Hub repo id: {e}") from None
        raise


def download(repo_id: str, *, revision: str | None = None, local_files_only: bool = False,
             cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> Path:
    """Fetch a model repo's files through the Hub cache and return the snapshot directory.

    Every failure is a `ModelLoadError` that names the repo (and revision, and file where it matters).
    Files are checked against the ETag the Hub announced for them (sha256 for LFS files, the git blob
    id otherwise), so bytes corrupted in transit or on disk are refused, not loaded.
    """
    try:
        from huggingface_hub import constants as hf_constants, hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ModelLoadError(f"loading {repo_id!r} from the Hub needs huggingface_hub: {e}") from None

    where = f"Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    endpoint = getattr(hf_constants, "ENDPOINT", "the Hugging Face Hub")

    def fetch(filename: str, revision: str | None = revision) -> Path:
        try:
            path = Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=local_files_only, token=token))
        except RepositoryNotFoundError:  # also GatedRepoError
            raise ModelLoadError(f"{where} does not exist on {endpoint} (or it is private or gated and needs a "
                                 "token)") from None
        except RevisionNotFoundError:
            raise ModelLoadError(f"{where}: no such revision") from None
        except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base class
            offline = local_files_only or bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))
            if offline:
                raise ModelLoadError(f"{filename} of {where} is not in the local Hub cache and downloads are "
                                     "disabled (HF_HUB_OFFLINE=1 or local_files_only=True)") from None
            cause = e.__cause__
            detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
            raise ModelLoadError(f"{filename} of {where} is not in the local Hub cache and {endpoint} could not "
                                 f"be reached{detail}") from None
        except EntryNotFoundError:
            raise ModelLoadError(f"{where} is not a DLSR model repo: it has no {filename}") from None
        except Exception as e:  # HTTP errors, size mismatches (OSError), dropped connections (httpx errors)
            raise ModelLoadError(f"could not download {filename} from {where}: {type(e).__name__}: {e}") from e
        _verify_cached_file(path, f"{filename} of {where}")
        return path

    config = fetch(CONFIG_NAME)
    # the weights of the very commit the config came from: a push to the branch between the two fetches
    # would otherwise pair one commit's config with another's weights
    commit = config.parent.name
    weights = fetch(WEIGHTS_NAME, commit if _GIT_SHA1.match(commit) else revision)
    if config.parent != weights.parent:  # pragma: no cover - same snapshot by construction
        raise ModelLoadError(f"{where}: files resolved to different snapshots")
    return config.parent


def hash_file(path: Path, digest: Any = None) -> str:
    """Hex digest of a file, read in 1 MiB blocks: sha256 unless another (possibly pre-fed) hash is given."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_cached_file(path: Path, what: str) -> None:
    """Check a file from the Hub cache against its ETag, which names the blob it links to.

    The Hub's ETag is the file's sha256 for LFS files and its git blob id otherwise; huggingface_hub checks
    only the size of a plain HTTP download. A mismatch removes the bad copy (so a retry downloads it again)
    and raises. Without symlinks (some Windows setups) the cache holds copies and there is nothing to check.

    Only the snapshot link is followed to find the name: `blobs/<etag>` may itself link on into
    huggingface_hub's shared Xet store, whose entries are named by Xet hash, not by checksum.
    """
    if not path.is_symlink():
        return
    target = Path(os.readlink(path))
    blob = target if target.is_absolute() else path.parent / target
    etag = blob.name
    if _SHA256.match(etag):
        digest = hashlib.sha256()
    elif _GIT_SHA1.match(etag):
        digest = hashlib.sha1(b"blob %d\0" % blob.stat().st_size)
    else:
        return
    if hash_file(blob, digest) != etag:
        for stale in (path, blob):
            try:
                stale.unlink()
            except OSError:  # pragma: no cover - read-only cache
                pass
        raise ModelLoadError(f"{what} is corrupt: its content does not match the checksum the Hub announced "
                             f"({etag}); the bad copy was removed from the cache, try again")


# --- reading and writing ----------------------------------------------------------------------------
def _invalid(path: Path, why: object) -> ModelLoadError:
    return ModelLoadError(f"{path}: not a valid safetensors file (corrupt or truncated?): {why}")


def _check_header_size(path: Path) -> None:
    """Refuse a file whose 8-byte header length is absurd before safetensors parses anything."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise _invalid(path, f"only {size} bytes")
    claimed = int.from_bytes(head, "little")
    if claimed > size - 8:
        raise _invalid(path, f"its header claims {claimed} bytes but the file has {size}")
    if claimed > MAX_HEADER_BYTES:
        raise _invalid(path, f"its header claims {claimed} bytes, over the {MAX_HEADER_BYTES} byte limit")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a safetensors file holds, as data-less 'meta' tensors (name, shape, dtype), and its
    metadata (``{}`` when it has none).

    Reads and validates only the header (safetensors checks that the offsets tile the file exactly),
    so a file can be checked against a network before any of its data is read.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_header_size(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            specs = [(name, f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) for name in f.keys()]
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _invalid(path, e) from None
    out: dict[str, torch.Tensor] = {}
    for name, dtype_name, shape in specs:
        dtype = _ST_DTYPES.get(dtype_name)
        if dtype is None:
            raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype_name}, which is not a supported "
                                 "weight type")
        out[name] = torch.empty(shape, dtype=dtype, device="meta")
    return out, metadata


def check_recorded_genotype(genotype: Genotype, metadata: Mapping[str, str], weights: Path) -> None:
    """Refuse a config.json that describes another network than the one its weights were saved from (as
    the weights' safetensors `metadata` records it, `dlsr_genotype`): a cell's links change no tensor's
    shape, so such a pair would load and give wrong images without a word. Files without the record
    (written by other tools) are checked by their tensors alone."""
    recorded = metadata.get(GENOTYPE_METADATA)
    if recorded is None:
        return
    try:
        saved = load_genotype_text(recorded)
    except GenotypeError as e:
        raise ModelLoadError(f"{weights}: its recorded genotype ({GENOTYPE_METADATA}) is not valid: {e}") from None
    if not saved.architecture_equals(genotype):
        ours, theirs = genotype.to_dict(), saved.to_dict()
        fields = [k for k in sorted(set(ours) | set(theirs)) if k not in ("name", "provenance")
                  and ours.get(k) != theirs.get(k)]
        cells = [i for i, (a, b) in enumerate(zip(ours.get("cells", []), theirs.get("cells", [])), start=1) if a != b]
        where = f"cell {cells[0]}: config {ours['cells'][cells[0] - 1]}, weights {theirs['cells'][cells[0] - 1]}" \
            if cells else ", ".join(f"{k}: config {ours.get(k)!r}, weights {theirs.get(k)!r}" for k in fields)
        raise ModelLoadError(f"{weights.parent / CONFIG_NAME} describes another network than {weights.name} was "
                             f"saved from ({where}): the config was edited or belongs to other weights")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from a safetensors file; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        _check_header_size(path)
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _invalid(path, e) from None


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], *,
                     source: str) -> None:
    """Raise `ModelLoadError` naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
                    for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    dtypes = sorted(f"{k}: {found[k].dtype} is not a floating-point tensor"
                    for k in set(expected) & set(found) if not found[k].is_floating_point())

    def listing(items: list[str], limit: int = 20) -> str:  # a hostile file may hold 100k names
        return repr(items) if len(items) <= limit else f"{items[:limit]!r} (+{len(items) - limit} more)"

    problems = []
    if missing:
        problems.append(f"missing tensors {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {listing(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped tensors {listing(shapes)}")
    if dtypes:
        problems.append(f"bad dtypes {listing(dtypes)}")
    if problems:
        raise ModelLoadError(f"{source} does not match its genotype: " + "; ".join(problems))


def load_model_dir(cls: type["DLSR"], directory: Path, *, map_location: Any = "cpu") -> "DLSR":
    directory = Path(directory)
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (config, weights):
        if not f.is_file():
            what = "is not a file" if f.exists() else "is a broken symbolic link" if f.is_symlink() else "is missing"
            raise ModelLoadError(f"{directory} is not a DLSR model directory: {f.name} {what}")
    try:
        genotype = load_genotype(config)
    except GenotypeError as e:
        raise ModelLoadError(f"invalid {CONFIG_NAME}: {e}") from None
    # A valid config can still describe a network of several GB (512 channels x 32 cells). Build it on the
    # meta device (no memory), check the weights file's header against it, and allocate only once the
    # file is known to hold exactly those tensors: memory then never exceeds what the file really holds.
    try:
        with torch.device("meta"):
            model = cls(genotype)
    except Exception:  # pragma: no cover - a subclass whose constructor needs real tensors
        model = cls(genotype)
    expected = model.state_dict()
    header, metadata = read_safetensors_header(weights)
    check_state_dict(expected, header, source=str(weights))
    check_recorded_genotype(genotype, metadata, weights)
    state = read_state_dict(weights)
    check_state_dict(expected, state, source=str(weights))  # the file may have changed since
    state = {k: v.float() for k, v in state.items()}  # the network runs in float32: 1e300 in F64 is inf here
    check_finite(state, weights, why="corrupt weights, or a training run that diverged")
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        if all(name in expected for name, _ in model.named_buffers()):
            model = model.to_empty(device="cpu")  # uninitialised; every tensor is loaded below
        else:  # pragma: no cover - non-persistent buffers need the real constructor
            model = cls(genotype)
    model.load_state_dict(state, strict=True)
    model.source = str(directory)  # type: ignore[attr-defined]
    return model.to(map_location).eval()


def check_finite(state: Mapping[str, torch.Tensor], where: object, *, after: str = "", why: str = "") -> None:
    """Refuse (`ModelLoadError`, naming them) weights holding NaN or inf, as float32 holds them: such a
    network gives a black (or NaN) image without a word."""
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v.float()).all()))
    if bad:
        raise ModelLoadError(f"{where}: {len(bad)} tensor(s) hold NaN or infinite values{after} ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''})" + (f": {why}" if why else ""))


def canonical_safetensors(blob: bytes) -> bytes:
    """`blob` (a safetensors file) with its JSON header's keys sorted, so that the same tensors and
    metadata always give the same bytes (safetensors writes its metadata in hash-map order, which
    changes from process to process). Tensor data and offsets are unchanged."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()  # sorts __metadata__ too
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def save_model_dir(model: "DLSR", directory: str | os.PathLike, *, model_card: str | None = None,
                   metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save as st_save

    directory = Path(directory).expanduser()  # as from_pretrained reads it: '~/m' is not a folder named '~'
    metadata = dict(metadata or {})
    bad = [f"{k!r}: {v!r}" for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str, got {', '.join(bad[:3])}")
    if reserved := sorted(set(metadata) & set(RESERVED_METADATA)):
        raise ValueError(f"metadata {reserved} is written by save_pretrained itself (from the model's genotype)")
    genotype: Genotype = model.genotype
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    check_finite(tensors, f"not saving {directory}", why="a model that would give black or NaN images")
    meta = {**metadata, "format": "pt", GENOTYPE_METADATA: json.dumps(genotype.to_dict(), sort_keys=True)}
    blob = canonical_safetensors(st_save(tensors, metadata=meta))
    config = genotype.to_json().encode()
    files = [(directory / WEIGHTS_NAME, lambda f: f.write(blob)), (directory / CONFIG_NAME, lambda f: f.write(config))]
    if model_card is None and not (directory / CARD_NAME).exists():
        model_card = default_model_card(genotype)  # a Hub repo needs a card; never clobber an edited one
    if model_card is not None:
        card = model_card.encode()
        files.append((directory / CARD_NAME, lambda f: f.write(card)))
    directory.mkdir(parents=True, exist_ok=True)  # only once everything is encoded: a failure leaves no folder
    # all or none: new weights beside the old config.json would be a directory that no longer loads
    atomic_write_all(files, overwrite=True)
    return directory


def default_model_card(genotype: Genotype, repo_id: str | None = None) -> str:
    """A minimal Hub model card (README.md) for a model directory; `save_model_dir` writes it by default."""
    title = " ".join((genotype.name or f"dlsr-x{genotype.scale}").split()) or f"dlsr-x{genotype.scale}"
    return f"""---
library_name: dlsr
pipeline_tag: image-to-image
tags:
- super-resolution
- image-to-image
- dlsr
---

# {title}

A DLSR super-resolution network: x{genotype.scale} upscaling, {genotype.channels} channels,
{genotype.num_cells} distillation cells.

- `config.json`: the genotype (the architecture, format version {genotype.to_dict()["format_version"]})
- `model.safetensors`: the weights (safetensors, float32)

```python
from dlsr_infer import DLSR

model = DLSR.from_pretrained("{repo_id or "owner/name"}")
```
"""
