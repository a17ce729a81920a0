"""Model directories (config.json + model.safetensors + README.md) and where to find them.

A name resolves, in order, to: an existing local directory; a bundled alias ('x2', 'x3', 'x4', 'x2-s');
a Hugging Face Hub repo id. Errors say which of these was tried and why it failed, so a typo in a
local path is never reported as a Hub 404 and vice versa.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .genotype import Genotype, GenotypeError, load as load_genotype

if TYPE_CHECKING:  # pragma: no cover
    from .model import DLSR

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
#: The files a model directory (and a Hub repo of ours) holds.
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

#: alias -> (bundled directory name under weights/, Hub repo id used when not bundled)
ALIASES: dict[str, tuple[str, str]] = {
    "x2": ("dlsr-x2", "dlsr-project/dlsr-x2"),
    "x3": ("dlsr-x3", "dlsr-project/dlsr-x3"),
    "x4": ("dlsr-x4", "dlsr-project/dlsr-x4"),
    "x2-s": ("dlsr-s-x2", "dlsr-project/dlsr-s-x2"),
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


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
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1 \
        or (os.altsep is not None and os.altsep in name)


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, local_files_only: bool = False,
            cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> Path:
    """Turn a directory, alias or Hub repo id into a local model directory."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"expected a model directory, alias or Hub repo id, got {name_or_path!r}")
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"{name_or_path!r} is a file, not a model directory (expected {CONFIG_NAME} + "
                             f"{WEIGHTS_NAME} inside a directory)")
    if name_or_path in ALIASES:
        bundled = bundled_model_dir(name_or_path)
        if bundled is not None:
            return bundled
        repo_id = ALIASES[name_or_path][1]
        try:
            return download(repo_id, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                            token=token)
        except ModelLoadError as e:
            raise ModelLoadError(
                f"weights for alias {name_or_path!r} are not bundled with this installation of dlsr, and "
                f"fetching them from the Hugging Face Hub repo {repo_id!r} failed: {e}"
            ) from None
    if _looks_like_path(name_or_path) or not _REPO_ID.match(name_or_path):
        raise ModelLoadError(
            f"no model directory at {name_or_path!r}; it is not a known alias ({', '.join(ALIASES)}) and not a "
            "Hub repo id of the form 'owner/name'"
        )
    return download(name_or_path, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                    token=token)


def download(repo_id: str, *, revision: str | None = None, local_files_only: bool = False,
             cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> Path:
    """Fetch a model repo's files through the Hub cache and return the snapshot directory."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ModelLoadError(f"loading {repo_id!r} from the Hub needs huggingface_hub: {e}") from None

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, token=token))

    where = f"Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        config = fetch(CONFIG_NAME)
        weights = fetch(WEIGHTS_NAME)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{where} does not exist (or needs a token)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{where}: no such revision") from None
    except EntryNotFoundError as e:
        raise ModelLoadError(f"{where} is not a DLSR model repo: it lacks {CONFIG_NAME} or {WEIGHTS_NAME} "
                             f"({type(e).__name__})") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"{where} is not in the local Hub cache and downloads are disabled "
                             "(offline mode or local_files_only=True)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"could not download {where}: {e}") from None
    if config.parent != weights.parent:  # pragma: no cover - same snapshot by construction
        raise ModelLoadError(f"{where}: files resolved to different snapshots")
    return config.parent


# --- reading and writing ----------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from a safetensors file; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: not a valid safetensors file (corrupt or truncated?): {e}") from None


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], *,
                     source: str) -> None:
    """Raise `ModelLoadError` naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
                    for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    dtypes = sorted(f"{k}: {found[k].dtype} is not a floating-point tensor"
                    for k in set(expected) & set(found) if not found[k].is_floating_point())
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if shapes:
        problems.append(f"mis-shaped tensors {shapes}")
    if dtypes:
        problems.append(f"bad dtypes {dtypes}")
    if problems:
        raise ModelLoadError(f"{source} does not match its genotype: " + "; ".join(problems))


def load_model_dir(cls: type["DLSR"], directory: Path, *, map_location: Any = "cpu") -> "DLSR":
    directory = Path(directory)
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (config, weights):
        if not f.is_file():
            raise ModelLoadError(f"{directory} is not a DLSR model directory: {f.name} is missing")
    try:
        genotype = load_genotype(config)
    except GenotypeError as e:
        raise ModelLoadError(f"invalid {CONFIG_NAME}: {e}") from None
    model = cls(genotype)
    state = read_state_dict(weights)
    check_state_dict(model.state_dict(), state, source=str(weights))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.source = str(directory)  # type: ignore[attr-defined]
    return model.to(map_location).eval()


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder, fsync, then rename: no half-written files."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model_dir(model: "DLSR", directory: str | os.PathLike, *, model_card: str | None = None,
                   metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save as st_save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    genotype: Genotype = model.genotype
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "dlsr_genotype": json.dumps(genotype.to_dict(), sort_keys=True)}
    meta.update(metadata or {})
    blob = st_save(tensors, metadata=meta)
    _atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(blob))
    _atomic_write(directory / CONFIG_NAME, lambda f: f.write(genotype.to_json().encode()))
    if model_card is not None:
        _atomic_write(directory / CARD_NAME, lambda f: f.write(model_card.encode()))
    return directory
