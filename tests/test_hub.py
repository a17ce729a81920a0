"""`DLSR.from_pretrained("owner/repo")` over real HTTP, against a local stand-in for the Hub.

`hubserver.FakeHub` serves model directories on 127.0.0.1 the way the Hub does (resolve URLs, commit and
ETag headers, LFS redirects to a separate "CDN" origin, the Hub's error codes). Most tests point the
in-process huggingface_hub at it (`patch_huggingface_hub`); `test_environment_variables_*` runs the real
thing (HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE read at import) in child processes. Nothing here can
reach the real Hub: every URL huggingface_hub builds points at the FakeHub.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dlsr_infer import DLSR, ModelLoadError
from dlsr_infer import pretrained
from dlsr_infer.genotype import builtin
from dlsr_infer.pretrained import CARD_NAME, CONFIG_NAME, MODEL_FILES, WEIGHTS_NAME
from hubserver import FakeHub, git_blob_sha1, patch_huggingface_hub, subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[1]
X = torch.rand(1, 3, 16, 18, generator=torch.Generator().manual_seed(1))


def _make_model(seed: int) -> DLSR:
    torch.manual_seed(seed)
    return DLSR(builtin("dlsr_s_x2"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[DLSR, Path]]:
    """Two small (18-channel) models with different weights, saved as model directories."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = _make_model(seed)
        out[name] = (model, model.save_pretrained(root / name))
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running FakeHub, with the in-process huggingface_hub pointed at it and an empty cache."""
    server = FakeHub(tmp_path / "served").start()
    patch_huggingface_hub(monkeypatch, server.endpoint, tmp_path / "hf-home")
    server.cache = tmp_path / "hf-home" / "hub"  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub sleeps 1-8 s between retries; the tests need its logic, not its patience."""
    import huggingface_hub.file_download as fd
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(fd.time, "sleep", lambda s: None)
    monkeypatch.setattr(http.time, "sleep", lambda s: None)


def _same(a: DLSR, b: DLSR) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(X), b(X))


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


# --- the happy path ---------------------------------------------------------------------------------
def test_download_into_empty_cache_gives_the_served_model(hub, models):
    model, folder = models["a"]
    commit = hub.add_commit("owner/repo", folder)
    assert not hub.cache.exists()

    loaded = DLSR.from_pretrained("owner/repo")

    _same(loaded, model)
    snapshot = hub.cache / "models--owner--repo" / "snapshots" / commit
    assert Path(loaded.source) == snapshot
    assert sorted(os.listdir(snapshot)) == [CONFIG_NAME, WEIGHTS_NAME]  # only what loading needs
    assert (hub.cache / "models--owner--repo" / "refs" / "main").read_text() == commit
    # The Hub protocol as the real Hub drives it: HEAD then GET for the git file, HEAD answered by an LFS
    # redirect, then a GET on the CDN for the weights; nothing else (no Xet, no API calls). The weights are
    # asked for at the commit the config came from.
    oid = hub.blob_id("owner/repo", WEIGHTS_NAME)
    assert hub.requests == [("HEAD", "/owner/repo/resolve/main/config.json"),
                            ("GET", "/owner/repo/resolve/main/config.json"),
                            ("HEAD", f"/owner/repo/resolve/{commit}/model.safetensors"),
                            ("GET", f"/lfs/{oid}")]
    assert not list(hub.cache.rglob("*.incomplete"))


def test_second_call_is_served_from_the_cache_with_the_server_stopped(hub, models):
    model, folder = models["a"]
    hub.add_commit("owner/repo", folder)
    DLSR.from_pretrained("owner/repo")
    hub.stop()
    seen = len(hub.requests)

    _same(DLSR.from_pretrained("owner/repo", local_files_only=True), model)
    _same(DLSR.from_pretrained("owner/repo"), model)  # Hub unreachable: falls back to the cached 'main'
    assert len(hub.requests) == seen


def test_revision_pins_a_commit(hub, models):
    (model_a, folder_a), (model_b, folder_b) = models["a"], models["b"]
    commit_a = hub.add_commit("owner/repo", folder_a)
    commit_b = hub.add_commit("owner/repo", folder_b)  # main moves on to b
    assert commit_a != commit_b and len(commit_a) == 40

    _same(DLSR.from_pretrained("owner/repo", revision=commit_a), model_a)
    _same(DLSR.from_pretrained("owner/repo", revision=commit_b), model_b)
    _same(DLSR.from_pretrained("owner/repo"), model_b)
    _same(DLSR.from_pretrained("owner/repo", revision="main"), model_b)

    hub.stop()  # a pinned commit already in the cache needs no server at all
    _same(DLSR.from_pretrained("owner/repo", revision=commit_a), model_a)
    _same(DLSR.from_pretrained("owner/repo", revision=commit_b, local_files_only=True), model_b)


def test_a_push_between_the_config_and_the_weights_does_not_mix_two_commits(hub, models, monkeypatch):
    """config.json and model.safetensors are fetched one after the other: the weights now come from the
    commit the config came from (a push to main in between gave one commit's config with the next's weights)."""
    import huggingface_hub

    (model_a, folder_a), (model_b, folder_b) = models["a"], models["b"]
    hub.add_commit("owner/repo", folder_a)
    real = huggingface_hub.hf_hub_download
    asked = []

    def push_after_the_config(repo_id, filename, **kw):
        path = real(repo_id, filename, **kw)
        asked.append((filename, kw.get("revision")))
        if filename == "config.json":
            hub.add_commit("owner/repo", folder_b)  # main moves on while we fetch
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", push_after_the_config)
    _same(DLSR.from_pretrained("owner/repo"), model_a)
    assert asked[0] == ("config.json", None) and asked[1][0] == "model.safetensors" and len(asked[1][1]) == 40


def test_unknown_revision_is_a_clear_error(hub, models):
    hub.add_commit("owner/repo", models["a"][1])
    for revision in ("no-such-branch", "f" * 40):
        with pytest.raises(ModelLoadError, match=f"Hub repo 'owner/repo' at revision '{revision}': no such revision"):
            DLSR.from_pretrained("owner/repo", revision=revision)


def test_alias_falls_back_to_its_hub_repo_when_not_bundled(hub, models, monkeypatch):
    monkeypatch.setattr(pretrained, "bundled_model_dir", lambda alias: None)
    model, folder = models["a"]
    hub.add_commit(pretrained.ALIASES["x2-s"][1], folder)
    _same(DLSR.from_pretrained("x2-s"), model)


def test_a_revision_of_a_bundled_alias_comes_from_the_hub(hub, models):
    # The bundled copy used to be returned whatever revision was asked for.
    model, folder = models["a"]
    commit = hub.add_commit(pretrained.ALIASES["x2"][1], folder)
    assert pretrained.bundled_model_dir("x2") is not None
    _same(DLSR.from_pretrained("x2", revision=commit), model)
    with pytest.raises(ModelLoadError, match="revision 'f+' of alias 'x2' was asked for, so the bundled weights"):
        DLSR.from_pretrained("x2", revision="f" * 40)


def test_paths_the_file_system_cannot_take_are_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a usable model directory path"):
        DLSR.from_pretrained("~no-such-user-dlsr/model")
    with pytest.raises(ModelLoadError, match="is not a usable model directory path"):
        DLSR.from_pretrained("./" + "a" * 300)
    model_dir = tmp_path / "m"
    (model_dir / CONFIG_NAME).mkdir(parents=True)
    (model_dir / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"{CONFIG_NAME} is not a file"):
        DLSR.from_pretrained(model_dir)


# --- failures ---------------------------------------------------------------------------------------
def test_truncated_download_is_refused_and_not_cached(hub, models):
    model, folder = models["a"]
    hub.add_commit("owner/repo", folder)
    hub.faults[hub.blob_id("owner/repo", WEIGHTS_NAME)] = "truncate"

    with pytest.raises(ModelLoadError, match=r"could not download model\.safetensors from Hub repo 'owner/repo'"
                                             r".*Consistency check failed"):
        DLSR.from_pretrained("owner/repo")
    blobs = hub.cache / "models--owner--repo" / "blobs"
    assert [p.name for p in blobs.iterdir()] == [git_blob_sha1((folder / CONFIG_NAME).read_bytes())]  # no partial

    hub.faults.clear()  # the next try downloads again and works
    _same(DLSR.from_pretrained("owner/repo"), model)


def test_corrupted_download_is_detected_by_checksum(hub, models):
    model, folder = models["a"]
    hub.add_commit("owner/repo", folder)
    oid = hub.blob_id("owner/repo", WEIGHTS_NAME)
    hub.faults[oid] = "corrupt"  # same size, one byte of tensor data flipped: parses fine, wrong weights

    with pytest.raises(ModelLoadError, match=r"model\.safetensors of Hub repo 'owner/repo' is corrupt: .*"
                                             f"checksum the Hub announced \\({oid}\\).*removed from the cache"):
        DLSR.from_pretrained("owner/repo")
    assert not (hub.cache / "models--owner--repo" / "blobs" / oid).exists()

    hub.faults.clear()
    _same(DLSR.from_pretrained("owner/repo"), model)


def test_corruption_in_the_cache_is_detected_offline(hub, models):
    hub.add_commit("owner/repo", models["a"][1])
    loaded = DLSR.from_pretrained("owner/repo")
    config = Path(loaded.source) / CONFIG_NAME
    blob = config.resolve()
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes().replace(b'"channels": 18', b'"channels": 19'))
    with pytest.raises(ModelLoadError, match=r"config\.json of Hub repo 'owner/repo' is corrupt"):
        DLSR.from_pretrained("owner/repo", local_files_only=True)


def test_blob_linked_into_the_shared_xet_store_is_not_mistaken_for_corrupt(hub, models):
    # With Xet, huggingface_hub makes blobs/<etag> a link into a cache-wide store named by *Xet hash*
    # (also 64 hex). The checksum must be taken against the etag, never against the store file's name.
    model, folder = models["a"]
    hub.add_commit("owner/repo", folder)
    DLSR.from_pretrained("owner/repo")
    blob = hub.cache / "models--owner--repo" / "blobs" / hub.blob_id("owner/repo", WEIGHTS_NAME)
    store = hub.cache / "blobs" / "ab" / ("ab" + "0" * 62)
    store.parent.mkdir(parents=True)
    blob.rename(store)
    blob.symlink_to(os.path.relpath(store, blob.parent))
    _same(DLSR.from_pretrained("owner/repo", local_files_only=True), model)
    assert blob.is_symlink() and store.is_file()


def test_dropped_connection_is_resumed(hub, models, no_backoff):
    model, folder = models["a"]
    hub.add_commit("owner/repo", folder)
    oid = hub.blob_id("owner/repo", WEIGHTS_NAME)
    hub.faults[oid] = "drop-once"
    _same(DLSR.from_pretrained("owner/repo"), model)
    ranged = [p for m, p in hub.requests if p == f"/lfs/{oid}"]
    assert len(ranged) == 2  # the first GET died half-way; the second resumed with a Range header


def test_connection_that_keeps_dropping_is_a_model_load_error(hub, models, no_backoff):
    hub.add_commit("owner/repo", models["a"][1])
    hub.faults[hub.blob_id("owner/repo", WEIGHTS_NAME)] = "drop"
    # Before: a raw httpx2.RemoteProtocolError escaped from from_pretrained.
    with pytest.raises(ModelLoadError, match=r"could not download model\.safetensors from Hub repo 'owner/repo': "
                                             r"RemoteProtocolError"):
        DLSR.from_pretrained("owner/repo")


def test_truncated_safetensors_in_the_repo_is_refused(hub, models):
    folder = models["a"][1]
    blob = (folder / WEIGHTS_NAME).read_bytes()
    files = {CONFIG_NAME: (folder / CONFIG_NAME).read_bytes(), WEIGHTS_NAME: blob[: len(blob) - 100]}
    hub.add_commit("owner/repo", files)  # the Hub itself holds a damaged file: sizes and checksums agree
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a valid safetensors file \(corrupt or "
                                             r"truncated\?\)"):
        DLSR.from_pretrained("owner/repo")


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_repo_without_a_model_file_names_it(hub, models, missing):
    folder = models["a"][1]
    hub.add_commit("owner/repo", {n: (folder / n).read_bytes() for n in MODEL_FILES if n != missing})
    with pytest.raises(ModelLoadError, match=f"Hub repo 'owner/repo' is not a DLSR model repo: it has no {missing}"):
        DLSR.from_pretrained("owner/repo")


def test_unknown_repo_does_not_exist(hub):
    with pytest.raises(ModelLoadError, match=r"Hub repo 'nobody/nothing' does not exist on http://127\.0\.0\.1:"):
        DLSR.from_pretrained("nobody/nothing")
    assert hub.requests == [("HEAD", "/nobody/nothing/resolve/main/config.json")]


def test_alias_without_bundled_weights_names_alias_and_repo(hub, monkeypatch):
    monkeypatch.setattr(pretrained, "bundled_model_dir", lambda alias: None)
    with pytest.raises(ModelLoadError) as info:
        DLSR.from_pretrained("x2")
    message = str(info.value)
    assert "alias 'x2' are not bundled" in message
    assert "Hugging Face Hub repo 'dlsr-project/dlsr-x2'" in message and "does not exist" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one clear error, no chain


def test_not_cached_and_offline_says_so(hub, models):
    hub.add_commit("owner/repo", models["a"][1])
    # Before: LocalEntryNotFoundError was caught as EntryNotFoundError -> "not a DLSR model repo".
    with pytest.raises(ModelLoadError, match=r"config\.json of Hub repo 'owner/repo' is not in the local Hub cache "
                                             r"and downloads are disabled"):
        DLSR.from_pretrained("owner/repo", local_files_only=True)
    assert hub.requests == []


def test_not_cached_and_hub_unreachable_says_so(hub, no_backoff):
    hub.stop()
    with pytest.raises(ModelLoadError, match=r"not in the local Hub cache and http://127\.0\.0\.1:\d+ could not be "
                                             r"reached \(ConnectError"):
        DLSR.from_pretrained("owner/repo")


@pytest.mark.parametrize("typo", ["./no/such/dir", "no/such/dir", "/no/such/dir", "~/no-such-dlsr-dir/x",
                                  "not a repo", "x5"])
def test_local_path_typo_is_a_local_error_and_never_contacts_the_hub(hub, typo):
    with pytest.raises(ModelLoadError, match=f"no model directory at {typo!r}"):
        DLSR.from_pretrained(typo)
    assert hub.requests == [] and hub.side_requests == []


def test_a_typo_of_a_local_folder_that_looks_like_a_repo_id_says_the_folder_exists(hub, tmp_path, monkeypatch):
    """'models/goood' beside a local models/ reads as a Hub repo id: the Hub is asked, and its error also
    says that the local folder exists (it said only 'Hub repo ... does not exist')."""
    (tmp_path / "models" / "good").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no model directory at 'models/goood' \(the folder 'models' exists "
                                             r"here\), and as a Hub repo id: "):
        DLSR.from_pretrained("models/goood")


def test_a_folder_named_like_an_alias_hides_it_only_if_it_holds_a_model(hub, tmp_path, monkeypatch):
    """`dlsr-upscale shots/ -o x2/` makes a folder x2 in the working directory: the default model of
    every later `upscale(scale=2)` from there is still the bundled x2, not 'x2 is not a model directory'."""
    from dlsr_infer import upscale
    from dlsr_infer.pretrained import bundled_model_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x2").mkdir()
    (tmp_path / "x2" / "a.png").write_bytes(b"an earlier output")
    assert DLSR.from_pretrained("x2").source == str(bundled_model_dir("x2"))
    assert upscale(np.zeros((8, 9, 3), np.uint8), scale=2).shape == (16, 18, 3)
    DLSR.from_genotype_name("dlsr_s_x2").save_pretrained(tmp_path / "x2")  # now it holds a model: it is taken
    assert DLSR.from_pretrained("x2").source == "x2" and DLSR.from_pretrained("x2").num_parameters == 56_268
    assert hub.requests == []


# --- the environment variables, for real (child processes) ------------------------------------------
_CHILD = """
import sys, torch
from safetensors.torch import save_file
from dlsr_infer import DLSR
m = DLSR.from_pretrained(sys.argv[1])
x = torch.rand(1, 3, 16, 18, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    save_file(dict(m.state_dict(), __output__=m(x).contiguous()), sys.argv[2])
print(m.source)
"""


def _child(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = dict(env, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_environment_variables_endpoint_cache_and_offline(tmp_path, models):
    model, folder = models["b"]
    home = tmp_path / "hf-home"
    with FakeHub(tmp_path / "served") as hub:
        commit = hub.add_commit("owner/repo", folder)
        online = _child(subprocess_env(hub.endpoint, home), "owner/repo", str(tmp_path / "online.safetensors"))
        assert online.returncode == 0, online.stderr
        assert len(hub.requests) == 4  # HF_ENDPOINT was honoured
    assert online.stdout.strip() == str(home / "hub" / "models--owner--repo" / "snapshots" / commit)

    # Server gone, HF_HUB_OFFLINE=1: straight from the cache in HF_HUB_CACHE, no connection attempted.
    offline = _child(subprocess_env(hub.endpoint, home, offline=True), "owner/repo",
                     str(tmp_path / "offline.safetensors"))
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online.stdout

    with torch.no_grad():
        expected = dict(model.state_dict(), __output__=model(X))
    for run in ("online", "offline"):
        got = load_file(tmp_path / f"{run}.safetensors")
        assert got.keys() == expected.keys()
        for k in expected:
            if k == "__output__":  # another process: allow for a different thread count's rounding
                torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(got[k], expected[k]), k


def test_environment_offline_without_cache_is_a_clear_error(tmp_path):
    result = _child(subprocess_env("http://127.0.0.1:9", tmp_path / "hf-home", offline=True), "owner/repo",
                    str(tmp_path / "out.safetensors"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dlsr_infer.pretrained.ModelLoadError: config.json of Hub repo 'owner/repo' is not in "
                           "the local Hub cache and downloads are disabled"), result.stderr


# --- what a Hub repo should hold --------------------------------------------------------------------
def test_save_pretrained_writes_exactly_the_repo_files(tmp_path):
    model = _make_model(3)
    out = model.save_pretrained(tmp_path / "repo")
    assert _files_under(out) == sorted(MODEL_FILES)  # no temp files, nothing else
    umask = os.umask(0)
    os.umask(umask)
    for name in MODEL_FILES:  # shareable like any other file, not mkstemp's owner-only 0600
        assert ((out / name).stat().st_mode & 0o777) == 0o666 & ~umask, name

    card = (out / CARD_NAME).read_text()
    assert card.startswith("---\nlibrary_name: dlsr\n") and "\n---\n" in card[4:]
    assert "x2 upscaling, 18 channels" in card and 'DLSR.from_pretrained("owner/name")' in card
    assert (out / CONFIG_NAME).read_text() == model.genotype.to_json()
    _same(DLSR.from_pretrained(out), model)

    # Saving again over it: same three files; a card the maintainer edited is kept unless one is given.
    (out / CARD_NAME).write_text("# edited\n")
    model.save_pretrained(out)
    assert _files_under(out) == sorted(MODEL_FILES)
    assert (out / CARD_NAME).read_text() == "# edited\n"
    model.save_pretrained(out, model_card="# given\n")
    assert (out / CARD_NAME).read_text() == "# given\n"


def test_saved_directory_served_by_the_hub_round_trips(hub, tmp_path):
    model = _make_model(4)
    folder = model.save_pretrained(tmp_path / "upload")
    hub.add_commit("me/dlsr-s-x2", folder)  # what `upload_folder` of this directory would commit
    _same(DLSR.from_pretrained("me/dlsr-s-x2"), model)
    assert load_file(folder / WEIGHTS_NAME).keys() == model.state_dict().keys()


# --- what a name means ------------------------------------------------------------------------------
def test_names_read_the_same_on_every_platform(monkeypatch):
    """On Windows '/' is os.altsep: 'owner/repo' read as a local path there, so no Hub repo id ever
    reached the Hub. A name is now classified by its characters, whatever the platform's separators."""
    for sep, altsep in (("/", None), ("\\", "/")):
        monkeypatch.setattr(os, "sep", sep)
        monkeypatch.setattr(os, "altsep", altsep)
        assert not pretrained._looks_like_path("owner/repo") and not pretrained._looks_like_path("x4")
        for path in ("C:\\models\\x4", "C:x4", "a\\b", "a/b/c", "./x", "/x", "~/x"):
            assert pretrained._looks_like_path(path), (sep, path)


def test_a_path_object_is_only_ever_a_local_directory(hub, tmp_path, monkeypatch):
    """A `Path` names a folder: a missing one is a local error (it was sent to the Hub as a repo id, and
    Path('x4') loaded the bundled x4), and `upscale()`'s model cache reads it the same way."""
    from dlsr_infer import upscale

    monkeypatch.chdir(tmp_path)
    for missing in (Path("runs/best"), Path("x4")):
        with pytest.raises(ModelLoadError, match=f"no model directory at {str(missing)!r}"):
            DLSR.from_pretrained(missing)
    (tmp_path / "x2").mkdir()  # an output folder named like the alias: a string still means the alias
    assert upscale(np.zeros((8, 9, 3), np.uint8), scale=2, model="x2").shape == (16, 18, 3)
    with pytest.raises(ModelLoadError, match="x2 is not a DLSR model directory: config.json is missing"):
        upscale(np.zeros((8, 9, 3), np.uint8), scale=2, model=Path("x2"))
    (tmp_path / "link").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ModelLoadError, match=r"no model directory at 'dangling' \(a broken symbolic link\)"):
        DLSR.from_pretrained(Path("dangling"))
    (tmp_path / "link" / CONFIG_NAME).write_text(builtin("dlsr_s_x2").to_json())
    (tmp_path / "link" / WEIGHTS_NAME).symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(ModelLoadError, match="model.safetensors is a broken symbolic link"):
        DLSR.from_pretrained(Path("link"))
    assert hub.requests == [] and hub.side_requests == []


def test_a_file_named_like_an_alias_does_not_hide_it(hub, tmp_path, monkeypatch):
    from dlsr_infer import upscale
    from dlsr_infer.pretrained import bundled_model_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x2").write_bytes(b"an earlier output, saved without an extension")
    assert DLSR.from_pretrained("x2").source == str(bundled_model_dir("x2"))
    assert upscale(np.zeros((8, 9, 3), np.uint8), scale=2).shape == (16, 18, 3)
    with pytest.raises(ModelLoadError, match="'x2' is a file, not a model directory"):
        DLSR.from_pretrained(Path("x2"))  # a Path means that file
    assert hub.requests == []


def test_a_revision_is_never_quietly_ignored_for_a_local_directory(hub, models, tmp_path, monkeypatch):
    local = models["a"][1]
    with pytest.raises(ModelLoadError, match=r"revision 'f{40}' was asked for, but .* is a local directory"):
        DLSR.from_pretrained(str(local), revision="f" * 40)
    monkeypatch.chdir(tmp_path)
    models["a"][0].save_pretrained(tmp_path / "owner" / "repo")
    with pytest.raises(ModelLoadError, match="a revision applies to Hub repos"):
        DLSR.from_pretrained("owner/repo", revision="main")
    _same(DLSR.from_pretrained("owner/repo", revision=""), models["a"][0])  # "" is no revision
    assert hub.requests == []


# --- config and weights belong together ----------------------------------------------------------------
def test_a_config_that_describes_other_links_than_the_weights_is_refused(tmp_path, models):
    """A cell's links change no tensor's shape: an edited config.json loaded the weights into another
    network, which gave wrong images without a word. The weights record their genotype; it must agree."""
    import json
    import shutil

    from safetensors.torch import save_file

    src = models["a"][1]
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    config = json.loads((edited / CONFIG_NAME).read_text())
    assert config["cells"][2]["inputs"] != [0, 2]
    config["cells"][2]["inputs"] = [0, 2]
    (edited / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"edited/config.json describes another network than model.safetensors "
                                             r"was saved from \(cell 3: config .*\[0, 2\].*weights .*\[1, 2\]"):
        DLSR.from_pretrained(edited)
    config["cells"][2]["inputs"] = [1, 2]
    config["name"], config["provenance"] = "renamed", {"note": "edited"}  # name and provenance are not the network
    (edited / CONFIG_NAME).write_text(json.dumps(config))
    _same(DLSR.from_pretrained(edited), models["a"][0])
    # weights written by another tool carry no record: their tensors alone are checked, as before
    save_file(load_file(str(src / WEIGHTS_NAME)), str(edited / WEIGHTS_NAME))
    _same(DLSR.from_pretrained(edited), models["a"][0])


def test_save_pretrained_refuses_what_it_could_not_load_back_before_writing_anything(tmp_path):
    model = _make_model(4)
    with pytest.raises(TypeError, match=r"metadata must map str to str, got 'epoch': 5"):
        model.save_pretrained(tmp_path / "a", metadata={"epoch": 5})
    with pytest.raises(ValueError, match=r"metadata \['dlsr_genotype'\] is written by save_pretrained itself"):
        model.save_pretrained(tmp_path / "b", metadata={"dlsr_genotype": "{}"})
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(ModelLoadError, match="not saving .*c: 1 tensor.* NaN or infinite"):
        model.save_pretrained(tmp_path / "c")
    assert list(tmp_path.iterdir()) == []  # no empty folder left behind
    model = _make_model(4)
    out = model.save_pretrained(tmp_path / "d", metadata={"epoch": "5"})
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()["epoch"] == "5" and f.metadata()["format"] == "pt"


def test_cache_dir_and_token_reach_the_download(hub, models, tmp_path):
    """`cache_dir=` and `token=` are passed through to huggingface_hub: the files land in that cache (not
    the default one) and the token is sent to the Hub."""
    hub.add_commit("owner/private", models["a"][1])
    cache = tmp_path / "elsewhere"
    model = DLSR.from_pretrained("owner/private", cache_dir=cache, token="hf_not_a_real_token")
    _same(model, models["a"][0])
    assert Path(model.source).is_relative_to(cache)
    assert not (hub.cache / "models--owner--private").exists()
    assert hub.authorization and set(hub.authorization) == {"Bearer hf_not_a_real_token"}
