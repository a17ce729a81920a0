"""A tiny local stand-in for the Hugging Face Hub, for testing `from_pretrained("owner/repo")` over HTTP.

It speaks the part of the Hub's protocol that `huggingface_hub.hf_hub_download` (2.x) uses for a model
repo, read from huggingface_hub's ``file_download.py`` / ``utils/_http.py``:

* ``HEAD`` and ``GET /{owner}/{name}/resolve/{revision}/{filename}`` where ``revision`` is a branch name
  or a full 40-hex commit hash (URL-quoted, as ``hf_hub_url`` sends it).
* Every answer carries ``X-Repo-Commit`` (the resolved commit). Plain git files answer ``200`` with
  ``ETag: "<git blob sha1>"`` and ``Content-Length``. LFS files (``*.safetensors``, ``*.bin``...) answer
  ``302`` with ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size`` and a ``Location`` on a second server
  (the "CDN", another port, so another origin): huggingface_hub reads the metadata from the 302 itself
  and then GETs the CDN URL, exactly as with the real Hub's LFS/S3 redirect.
* Errors use the Hub's ``X-Error-Code`` header, which is how huggingface_hub tells them apart:
  unknown repo -> ``401`` + ``RepoNotFound``; unknown revision -> ``404`` + ``RevisionNotFound``;
  missing file -> ``404`` + ``EntryNotFound`` (with ``X-Repo-Commit``).
* No ``X-Xet-Hash`` / ``X-Xet-Refresh-Route`` header is ever sent, so huggingface_hub never takes the
  Xet download path (``hf_xet`` is installed, but ``parse_xet_file_data_from_response`` returns None).
* ``GET /api/agent-harnesses`` (huggingface_hub's User-Agent bookkeeping, once per process) gets a 404
  and is logged in `side_requests`, not `requests`.
* The CDN honours ``Range`` (huggingface_hub resumes a dropped download with ``Range: bytes=N-``).

Repos live as plain directories in a temp folder: ``<root>/<owner>/<name>/<commit>/<files>``.
`faults` lets a test make the CDN misbehave for one blob (truncate, corrupt, drop the connection).
The servers speak HTTP/1.0 (one request per connection), so once `stop()` returns nothing can still
answer from a kept-alive connection. Every request is recorded in `requests`.
"""
from __future__ import annotations

import hashlib
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

#: Files stored through git-lfs on the Hub (as its default .gitattributes does for weights).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: the Hub's ETag for a file stored in plain git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    """The Hub's ETag (X-Linked-Etag) for a file stored in git-lfs."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit
    commits: list[str] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FakeHub:
    """A local Hub on 127.0.0.1 (random ports). Use as a context manager or call start()/stop()."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, Path] = {}  # sha256 -> file
        #: sha256 of an LFS blob -> what the CDN does wrong with it: "truncate" (a short but well-formed
        #: response), "corrupt" (right size, one byte flipped), "drop" (hang up before any body byte, every
        #: time), "drop-once" (hang up half-way through the first GET only)
        self.faults: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path), hub and CDN alike
        #: Requests for huggingface_hub's own bookkeeping, kept apart from `requests` (see `_dispatch`).
        self.side_requests: list[tuple[str, str]] = []
        #: the Authorization header of each request to the hub (None: none sent)
        self.authorization: list[str | None] = []
        self._lock = threading.Lock()
        self._hub: _Server | None = None
        self._cdn: _Server | None = None
        self._threads: list[threading.Thread] = []

    # --- content ---------------------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: Path | dict[str, bytes], *, branch: str | None = "main") -> str:
        """Commit the files of a directory (or a name -> bytes dict) as a new snapshot; return its hash.

        The snapshot holds exactly the given files (it replaces, not amends, the previous one).
        """
        if isinstance(files, (str, Path)):
            files = {p.name: p.read_bytes() for p in sorted(Path(files).iterdir()) if p.is_file()}
        repo = self.repos.setdefault(repo_id, Repo())
        digest = hashlib.sha1(repo_id.encode() + b"\0" + str(len(repo.commits)).encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        commit = digest.hexdigest()
        folder = self.root / repo_id / commit
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
            if name.endswith(LFS_SUFFIXES):
                self.lfs[sha256(data)] = folder / name
        repo.commits.append(commit)
        if branch is not None:
            repo.branches[branch] = commit
        return commit

    def blob_id(self, repo_id: str, filename: str, revision: str = "main") -> str:
        """The sha256 of an LFS file as served (the key for `faults`)."""
        return sha256(self._snapshot(repo_id, revision)[filename].read_bytes())  # type: ignore[index]

    def _snapshot(self, repo_id: str, revision: str) -> dict[str, Path] | None:
        repo = self.repos[repo_id]
        commit = repo.branches.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return None
        return {p.name: p for p in (self.root / repo_id / commit).iterdir()}

    # --- servers ---------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._hub is not None, "FakeHub is not running"
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        assert self._cdn is not None, "FakeHub is not running"
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> "FakeHub":
        self._hub = _Server(("127.0.0.1", 0), _handler(self, self._serve_hub))
        self._cdn = _Server(("127.0.0.1", 0), _handler(self, self._serve_cdn))
        for server in (self._hub, self._cdn):
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            if server is not None:
                server.shutdown()
                server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # --- protocol --------------------------------------------------------------------------------
    def _serve_hub(self, h: "_Handler") -> None:
        self.authorization.append(h.headers.get("Authorization"))
        parts = urlsplit(h.path).path.split("/")
        # ['', owner, name, 'resolve', revision, *filename]
        if len(parts) < 6 or parts[3] != "resolve":
            return h.reply(404, headers={"X-Error-Message": "Not Found"})
        repo_id = f"{unquote(parts[1])}/{unquote(parts[2])}"
        revision = unquote(parts[4])
        filename = unquote("/".join(parts[5:]))
        if repo_id not in self.repos:
            # The real Hub answers 401 (not 404) for a repo that does not exist or is private.
            return h.reply(401, headers={"X-Error-Code": "RepoNotFound",
                                         "X-Error-Message": "Repository not found"})
        snapshot = self._snapshot(repo_id, revision)
        if snapshot is None:
            return h.reply(404, headers={"X-Error-Code": "RevisionNotFound",
                                         "X-Error-Message": "Invalid rev id: " + revision})
        commit = self.repos[repo_id].branches.get(revision, revision)
        if filename not in snapshot:
            return h.reply(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                                         "X-Error-Message": "Entry not found"})
        data = snapshot[filename].read_bytes()
        if filename.endswith(LFS_SUFFIXES):
            oid = sha256(data)
            return h.reply(302, headers={
                "Location": f"{self.cdn}/lfs/{oid}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{oid}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_sha1(data)}"',  # the etag of the LFS pointer file; X-Linked-Etag wins
            })
        return h.reply(200, data, headers={"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'})

    def _serve_cdn(self, h: "_Handler") -> None:
        parts = urlsplit(h.path).path.split("/")
        if len(parts) != 3 or parts[1] != "lfs" or parts[2] not in self.lfs:
            return h.reply(404)
        oid = parts[2]
        data = self.lfs[oid].read_bytes()
        fault = self.faults.get(oid)
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
        body = data[start:]
        status = 206 if start else 200
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        if fault == "truncate":  # a well-formed response that is simply short
            return h.reply(status, body[: len(body) // 2], headers=headers)
        if fault == "corrupt":  # right size, wrong bytes (in the tensor data, past the header)
            flipped = bytearray(body)
            flipped[-5] ^= 0xFF
            return h.reply(status, bytes(flipped), headers=headers)
        if fault == "drop" and h.command == "GET":  # announce the full body, send none of it, hang up
            return h.reply(status, body, headers=headers, send_only=0)
        if fault == "drop-once" and h.command == "GET":  # hang up half-way once; the resumed request succeeds
            del self.faults[oid]
            return h.reply(status, body, headers=headers, send_only=len(body) // 2)
        return h.reply(status, body, headers=headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    hub: FakeHub
    serve: Callable[["_Handler"], None]

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        # huggingface_hub 2.x GETs {ENDPOINT}/api/agent-harnesses once per process (and once a day per
        # HF_HOME) while building its User-Agent; it is best-effort and a 404 just means "no agent".
        side = self.path.startswith("/api/agent-harnesses")
        with self.hub._lock:
            (self.hub.side_requests if side else self.hub.requests).append((self.command, self.path))
        if side:
            return self.reply(404)
        self.serve(self)

    def reply(self, status: int, body: bytes = b"", *, headers: dict[str, str] | None = None,
              send_only: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body if send_only is None else body[:send_only])
        if send_only is not None:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


def _handler(hub: FakeHub, serve: Callable[[_Handler], None]) -> type[_Handler]:
    return type("Handler", (_Handler,), {"hub": hub, "serve": staticmethod(serve)})


# --- pointing huggingface_hub at a FakeHub ------------------------------------------------------------
#: Environment variables that would let the real Hub, a token or a user's settings leak into a test.
HF_VARS = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
           "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_HUB_ETAG_TIMEOUT",
           "HF_HUB_DOWNLOAD_TIMEOUT", "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_XET")


def subprocess_env(endpoint: str, home: Path, *, offline: bool = False) -> dict[str, str]:
    """The environment for a child process whose huggingface_hub talks only to `endpoint`.

    huggingface_hub reads these once, at import, which is why the real thing runs in a child process.
    """
    import os

    env = {k: v for k, v in os.environ.items() if k not in HF_VARS}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_CACHE=str(Path(home) / "hub"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_HUB_DISABLE_SYMLINKS_WARNING="1", NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def patch_huggingface_hub(monkeypatch, endpoint: str, home: Path) -> None:  # type: ignore[no-untyped-def]
    """In-process equivalent of `subprocess_env` (cheaper than a child process per test).

    Patches the module constants huggingface_hub derived from the environment at import time and that
    `hf_hub_download` reads at call time: ENDPOINT and the URL template built from it, the cache folder,
    offline mode and the token file. `test_hub.py` checks the real environment-variable path in a child
    process, so a constant missed here would show up as a difference there (or as a request that never
    reaches the FakeHub).
    """
    from huggingface_hub import constants

    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    home = Path(home)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
