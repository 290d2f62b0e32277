"""A small local server that speaks the Hugging Face Hub HTTP API, for push / download round-trip tests.

It implements the endpoints that the real `huggingface_hub` client (2.x) and `transformers` /
`snapshot_download` call, with real on-disk storage and git-like revisions, so a test can push with
`HfApi.create_commit` and load back with `AutoModel.from_pretrained("user/repo")`:

    POST /api/repos/create                                    create a model or dataset repo
    GET  /api/whoami-v2                                       the (single) user, any bearer token accepted
    POST /api/validate-yaml                                   README front matter check (create_commit calls it)
    GET  /api/{models|datasets}/{ns}/{name}[/revision/{rev}]  repo info: sha, siblings (with sizes/LFS when ?blobs)
    POST /api/{type}s/{ns}/{name}/preupload/{rev}             upload mode per file ("regular" or "lfs") + remote oid
    POST /api/{type}s/{ns}/{name}/commit/{rev}                NDJSON commit: header / file / lfsFile / deletedFile / deletedFolder
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]         tree listing (recursive or not, Link-header pagination)
    POST /api/{type}s/{ns}/{name}/paths-info/{rev}            info on given paths
    GET  /api/{type}s/{ns}/{name}/refs                        branches
    POST /[datasets/]{ns}/{name}.git/info/lfs/objects/batch   git-LFS batch API, "basic" transfer (upload + verify)
    PUT  /lfs-upload/{sha256}                                 the upload "href" of the batch answer (sha256 checked)
    POST /lfs-verify/{sha256}                                 the verify "href"
    HEAD/GET /[datasets/]{ns}/{name}/resolve/{rev}/{path}     file download with ETag / X-Repo-Commit / Content-Length;
                                                              LFS files answer 302 to a "CDN" URL with X-Linked-Etag /
                                                              X-Linked-Size, like the real Hub
    GET  /lfs-objects/{sha256}                                the "CDN" (Range requests supported)

Storage (under `root`): `blobs/<git sha1>` for regular files and LFS pointer files, `lfs/<sha256>` for
LFS content, and `repos/<type>/<ns>/<name>.json` with branches and commits. A commit oid is the SHA-1 of
the canonical JSON of (parent, message, tree), so it is a 40-hex git-like hash that changes with content.

**Xet.** `huggingface_hub` >= 0.32 uploads through the Xet protocol whenever `hf_xet` is installed, and that
choice is made on the client side (`huggingface_hub.utils.is_xet_available()`), not by the server: the
preupload answer cannot turn it off. This server does not implement Xet (CAS chunk/shard storage), so
clients must run with `HF_HUB_DISABLE_XET=1`, which makes `create_commit` use the preupload -> LFS batch
-> PUT -> verify -> commit path that this server implements. On downloads the server never sends
`X-Xet-Hash` / xet link headers, so the client always downloads plain HTTP. (`HfApi.upload_folder` with
Xet enabled goes through a different, Xet-only pipeline and would fail here.)

The client reads `HF_ENDPOINT` at import time, so point it at this server in a fresh subprocess:
`HF_ENDPOINT=http://127.0.0.1:<port> HF_HUB_DISABLE_XET=1 HF_HUB_OFFLINE=0 HF_TOKEN=dummy`.

Run standalone for manual tests: `python tests/hub_server.py --port 8000 --root /tmp/hub`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "user"
#: Files stored with git-LFS even when small (the Hub's default .gitattributes patterns, abridged).
LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.npy", "*.npz", "*.pkl",
    "*.parquet", "*.arrow", "*.zip", "*.gz", "*.tar", "*.h5ad", "*.msgpack", "*.model",
)
#: Larger files always go to LFS, like the Hub (which uses 10 MB).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
TREE_PAGE_SIZE = 1000
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)

# /api/{models|datasets|spaces}/{ns}/{name}[/rest]
_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
# /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+?)\.git/info/lfs/objects/batch$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def git_blob_oid(data: bytes) -> str:
    """The git SHA-1 of a blob, as `git hash-object` computes it (what the Hub calls a file's `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error answered with the Hub's `X-Error-Code` header, so the client raises the right class."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.headers = status, message, error_code, headers or {}


@dataclass
class Repo:
    """One repository: its branches and commits. A tree maps path -> entry dict (blob oid, size, lfs)."""

    repo_type: str
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict] = field(default_factory=dict)

    def resolve(self, revision: str) -> str:
        """A branch name or a (possibly abbreviated) commit oid -> full commit oid."""
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        if len(revision) >= 7:
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def to_json(self) -> dict:
        return dict(repo_type=self.repo_type, repo_id=self.repo_id, private=self.private,
                    branches=self.branches, commits=self.commits)


class HubStore:
    """On-disk storage of repos, blobs and LFS objects; every method is thread-safe."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        for sub in ("blobs", "lfs", "repos"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        for meta in (self.root / "repos").rglob("*.json"):
            data = json.loads(meta.read_text())
            self.repos[(data["repo_type"], data["repo_id"])] = Repo(**data)

    # ------------------------------------------------------------------ storage primitives
    def _save(self, repo: Repo) -> None:
        path = self.root / "repos" / repo.repo_type / f"{repo.repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo.to_json()))
        tmp.replace(path)  # atomic: a crash never leaves half a repo file

    def put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = self.root / "blobs" / oid
        if not path.exists():
            path.write_bytes(data)
        return oid

    def lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256

    def has_lfs(self, sha256: str, size: int | None = None) -> bool:
        path = self.lfs_path(sha256)
        return path.exists() and (size is None or path.stat().st_size == size)

    def put_lfs(self, sha256: str, stream_chunks) -> int:
        """Store LFS content streamed in chunks; refuse it when its SHA-256 is not `sha256`."""
        tmp = self.root / "lfs" / f".{sha256}.{threading.get_ident()}.part"
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            for chunk in stream_chunks:
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha256:
            tmp.unlink()
            raise HubError(400, f"LFS upload content has sha256 {digest.hexdigest()}, expected {sha256}")
        tmp.replace(self.lfs_path(sha256))
        return size

    # ------------------------------------------------------------------ repos and commits
    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_type}/{repo_id} not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, "You already created this repo", headers={"X-Error-Message": "repo exists"})
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            self.repos[(repo_type, repo_id)] = repo
            # Like the Hub: a new repo starts with one commit holding `.gitattributes`.
            self.commit(repo, "main", "initial commit", [("file", ".gitattributes", DEFAULT_GITATTRIBUTES.encode())])
            return repo

    def commit(self, repo: Repo, branch: str, message: str, operations: list, parent: str | None = None,
               description: str = "") -> str:
        """Apply operations to the branch head and record a new commit; returns its oid.

        operations: ("file", path, bytes) | ("lfsFile", path, sha256, size) | ("deletedFile", path)
        | ("deletedFolder", path).
        """
        with self._lock:
            head = repo.branches.get(branch)
            if head is None and repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and head is not None and not head.startswith(parent):
                raise HubError(412, f"A commit has happened since: parent commit {parent} is not the head {head}")
            tree = dict(repo.commits[head]["tree"]) if head else {}
            for op in operations:
                kind, path = op[0], op[1]
                if kind == "file":
                    data = op[2]
                    tree[path] = dict(oid=self.put_blob(data), size=len(data), lfs=None)
                elif kind == "lfsFile":
                    sha256, size = op[2], op[3]
                    if not self.has_lfs(sha256):
                        raise HubError(422, f"LFS object {sha256} for '{path}' was never uploaded (call the LFS batch API first)")
                    size = self.lfs_path(sha256).stat().st_size if size is None else size
                    pointer = lfs_pointer(sha256, size)
                    tree[path] = dict(oid=self.put_blob(pointer), size=size,
                                      lfs=dict(oid=sha256, size=size, pointerSize=len(pointer)))
                elif kind == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"unknown commit operation {kind!r}")
            date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            body = json.dumps(dict(parent=head, message=message, tree=tree, date=date, nonce=time.time_ns()),
                              sort_keys=True)
            oid = hashlib.sha1(b"commit %d\0" % len(body) + body.encode()).hexdigest()
            repo.commits[oid] = dict(parent=head, title=message, message=description, tree=tree, date=date)
            repo.branches[branch] = oid
            self._save(repo)
            return oid


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the store. `self.server` is a `LocalHubServer`."""

    protocol_version = "HTTP/1.1"  # keep-alive, which httpx uses; every answer carries Content-Length

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        return

    @property
    def store(self) -> HubStore:
        return self.server.store

    def _read_body_chunks(self):
        """Yield the request body, whether sent with Content-Length or chunked transfer encoding."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def _body(self) -> bytes:
        if not hasattr(self, "_cached_body"):
            self._cached_body = b"".join(self._read_body_chunks())
        return self._cached_body

    def _json_body(self):
        raw = self._body()
        ctype = self.headers.get("Content-Type", "")
        if "application/x-www-form-urlencoded" in ctype:  # paths-info may be sent as a form
            form = parse_qs(raw.decode())
            return {k: (v if k == "paths" else v[0]) for k, v in form.items()}
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"invalid JSON body: {err}") from err

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json",
              content_length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _base_url(self) -> str:
        return self.server.endpoint

    def _dispatch(self):
        self.server.requests.append((self.command, self.path))
        # One handler instance serves every request of a keep-alive connection: forget the last body.
        self.__dict__.pop("_cached_body", None)
        try:
            self._route()
        except HubError as err:
            headers = dict(err.headers)
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            headers.setdefault("X-Error-Message", err.message)
            self._send_json(err.status, {"error": err.message}, headers)
        if not hasattr(self, "_cached_body") and self.command in ("POST", "PUT"):
            self._body()  # drain a body no route read, so the next request on this connection parses

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ routing
    def _route(self):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        method = self.command

        if path == "/api/whoami-v2" and method == "GET":
            return self._send_json(200, {"type": "user", "name": DEFAULT_USER, "fullname": "Local Hub user",
                                         "orgs": [], "auth": {"type": "access_token",
                                                              "accessToken": {"displayName": "dummy", "role": "write"}}})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml()
        if (m := _LFS_BATCH.match(path)) and method == "POST":
            return self._lfs_batch(_repo_type(m.group(1)), f"{m.group(2)}/{m.group(3)}")
        if path.startswith("/lfs-upload/") and method == "PUT":
            return self._lfs_upload(path.rsplit("/", 1)[1])
        if path.startswith("/lfs-verify/") and method == "POST":
            return self._lfs_verify(path.rsplit("/", 1)[1])
        if path.startswith("/lfs-objects/") and method in ("GET", "HEAD"):
            return self._serve_lfs(path.rsplit("/", 1)[1])
        if (m := _RESOLVE.match(url.path)) and method in ("GET", "HEAD"):
            # Match on the raw path: the revision is URL-quoted (e.g. refs%2Fpr%2F1) but the file path has "/".
            repo_type = _repo_type(m.group(1))
            return self._resolve(repo_type, f"{unquote(m.group(2))}/{unquote(m.group(3))}", unquote(m.group(4)),
                                 unquote(m.group(5)))
        if m := _API_REPO.match(url.path):
            repo_type = m.group(1)[:-1]
            repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
            return self._api_repo(method, repo_type, repo_id, m.group(4) or "", query)
        self.server.unrouted.append((method, self.path))
        raise HubError(404, f"no route for {method} {path} in the local Hub test server")

    def _api_repo(self, method: str, repo_type: str, repo_id: str, rest: str, query: dict):
        parts = rest.split("/") if rest else []
        if method == "GET" and (not parts or parts[0] == "revision"):
            revision = unquote("/".join(parts[1:])) if parts else "main"
            return self._repo_info(repo_type, repo_id, revision, query)
        if not parts:
            self.server.unrouted.append((method, self.path))
            raise HubError(404, f"no route for {method} /api/{repo_type}s/{repo_id}")
        action, args = parts[0], parts[1:]
        if action == "preupload" and method == "POST":
            return self._preupload(repo_type, repo_id, unquote("/".join(args)))
        if action == "commit" and method == "POST":
            return self._commit(repo_type, repo_id, unquote("/".join(args)))
        if action == "tree" and method == "GET":
            # The revision is quoted (a branch like "refs/pr/1" arrives as refs%2Fpr%2F1): one segment.
            revision = unquote(args[0]) if args else "main"
            sub_path = unquote("/".join(args[1:]))
            return self._tree(repo_type, repo_id, revision, sub_path, query)
        if action == "paths-info" and method == "POST":
            return self._paths_info(repo_type, repo_id, unquote("/".join(args)))
        if action == "refs" and method == "GET":
            repo = self.store.get_repo(repo_type, repo_id)
            branches = [dict(name=b, ref=f"refs/heads/{b}", targetCommit=oid) for b, oid in repo.branches.items()]
            return self._send_json(200, {"branches": branches, "converts": [], "tags": []})
        self.server.unrouted.append((method, self.path))
        raise HubError(404, f"no route for {method} /api/{repo_type}s/{repo_id}/{rest}")

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self):
        payload = self._json_body()
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, f"invalid repo name {name!r}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.store.create_repo(repo_type, repo_id, private)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send_json(200, {"url": f"{self._base_url()}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self):
        import yaml  # pyyaml is a dependency of huggingface_hub

        content = self._json_body().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                return self._send_json(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
            if meta is not None and not isinstance(meta, dict):
                return self._send_json(400, {"errors": [{"message": "metadata must be a YAML mapping"}],
                                             "warnings": []})
        self._send_json(200, {"errors": [], "warnings": []})

    def _entry_json(self, path: str, entry: dict) -> dict:
        out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            out["lfs"] = dict(entry["lfs"])
        return out

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, query: dict):
        repo = self.store.get_repo(repo_type, repo_id)
        sha = repo.resolve(revision)
        commit = repo.commits[sha]
        siblings = []
        for path, entry in sorted(commit["tree"].items()):
            sib = {"rfilename": path}
            if query.get("blobs", ["false"])[0].lower() in ("1", "true"):
                sib.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sib["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["lfs"]["size"],
                                  "pointerSize": entry["lfs"]["pointerSize"]}
            siblings.append(sib)
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo_id.split("/")[0],
            "sha": sha, "lastModified": commit["date"], "createdAt": repo.commits[_first_commit(repo)]["date"],
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings,
        }
        card = commit["tree"].get("README.md")
        if card and not card["lfs"]:
            info["cardData"] = _front_matter((self.store.root / "blobs" / card["oid"]).read_text())
        if repo_type == "model":
            config = commit["tree"].get("config.json")
            if config and not config["lfs"]:
                cfg = json.loads((self.store.root / "blobs" / config["oid"]).read_text())
                info["config"] = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
        self._send_json(200, info)

    def _preupload(self, repo_type: str, repo_id: str, revision: str):
        repo = self.store.get_repo(repo_type, repo_id)
        tree = repo.commits[repo.resolve(revision)]["tree"]
        files = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = (size >= LFS_SIZE_THRESHOLD or b"\0" in sample
                   or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], pat) for pat in LFS_PATTERNS))
            existing = tree.get(path)
            # The client compares this with its local oid (sha256 for LFS files, git sha1 otherwise).
            remote_oid = None if existing is None else (existing["lfs"]["oid"] if existing["lfs"] else existing["oid"])
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": remote_oid})
        # No "xet" anywhere in the answer: this server only speaks git-LFS (see the module docstring).
        self._send_json(200, {"files": files, "commitOid": repo.branches.get(revision)})

    def _commit(self, repo_type: str, repo_id: str, revision: str):
        repo = self.store.get_repo(repo_type, repo_id)
        query = parse_qs(urlsplit(self.path).query)
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the local Hub test server")
        if revision not in repo.branches:
            repo.resolve(revision)  # raises RevisionNotFound for unknown names
            raise HubError(400, f"can only commit on a branch, not on commit {revision}")
        header, operations = None, []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                operations.append(("file", value["path"], base64.b64decode(value["content"])))
            elif key == "lfsFile":
                operations.append(("lfsFile", value["path"], value["oid"], value.get("size")))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append((key, value["path"]))
            else:
                raise HubError(400, f"unknown NDJSON commit key {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "commit payload needs a 'header' line with a non-empty 'summary'")
        oid = self.store.commit(repo, revision, header["summary"], operations, parent=header.get("parentCommit"),
                                description=header.get("description", ""))
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send_json(200, {"success": True, "commitOid": oid, "pullRequestUrl": None,
                              "commitUrl": f"{self._base_url()}/{prefix}{repo_id}/commit/{oid}"})

    def _tree(self, repo_type: str, repo_id: str, revision: str, sub_path: str, query: dict):
        repo = self.store.get_repo(repo_type, repo_id)
        tree = repo.commits[repo.resolve(revision)]["tree"]
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = sub_path.strip("/") + "/" if sub_path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"{sub_path} does not exist on {revision}", "EntryNotFound")
        entries, folders = [], set()
        for path, entry in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            rel_parts = path[len(prefix):].split("/")
            # Every folder between prefix and the file is listed (all of them when recursive, else the first).
            for depth in range(1, len(rel_parts) if recursive else min(2, len(rel_parts))):
                folders.add(prefix + "/".join(rel_parts[:depth]))
            if recursive or len(rel_parts) == 1:
                entries.append(self._entry_json(path, entry))
        for folder in sorted(folders):
            entries.append({"type": "directory", "path": folder, "oid": _folder_oid(tree, folder)})
        entries.sort(key=lambda e: e["path"])
        cursor = int(query.get("cursor", ["0"])[0])
        page = entries[cursor:cursor + TREE_PAGE_SIZE]
        headers = {}
        if cursor + TREE_PAGE_SIZE < len(entries):
            next_query = f"recursive={str(recursive).lower()}&cursor={cursor + TREE_PAGE_SIZE}"
            headers["Link"] = f'<{self._base_url()}{urlsplit(self.path).path}?{next_query}>; rel="next"'
        self._send_json(200, page, headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str):
        repo = self.store.get_repo(repo_type, repo_id)
        tree = repo.commits[repo.resolve(revision)]["tree"]
        payload = self._json_body()
        paths = payload.get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        out = []
        for path in paths:
            path = path.strip("/")
            if path in tree:
                out.append(self._entry_json(path, tree[path]))
            elif any(p.startswith(path + "/") for p in tree):
                out.append({"type": "directory", "path": path, "oid": _folder_oid(tree, path)})
        self._send_json(200, out)

    def _lfs_batch(self, repo_type: str, repo_id: str):
        self.store.get_repo(repo_type, repo_id)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "only the LFS 'upload' operation is implemented (downloads use /resolve)")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(422, "only the 'basic' LFS transfer is implemented")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not _SHA256.match(oid) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "oid must be a sha256 hex digest, size an int"}})
                continue
            answer = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_lfs(oid, size):  # already stored => no actions, the client skips the upload
                base = self._base_url()
                answer["actions"] = {
                    "upload": {"href": f"{base}/lfs-upload/{oid}?size={size}", "header": {}},
                    "verify": {"href": f"{base}/lfs-verify/{oid}", "header": {}},
                }
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str):
        if not _SHA256.match(oid):
            raise HubError(400, f"bad LFS oid {oid!r}")
        expected = parse_qs(urlsplit(self.path).query).get("size", [None])[0]
        size = self.store.put_lfs(oid, self._read_body_chunks())
        self._cached_body = b""  # consumed by put_lfs
        if expected is not None and int(expected) != size:
            raise HubError(400, f"LFS upload has {size} bytes, the batch request announced {expected}")
        self._send(200)

    def _lfs_verify(self, oid: str):
        payload = self._json_body()
        if not self.store.has_lfs(oid, payload.get("size")):
            raise HubError(404, f"LFS object {oid} of size {payload.get('size')} was not uploaded")
        self._send_json(200, {"success": True})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str):
        repo = self.store.get_repo(repo_type, repo_id)
        sha = repo.resolve(revision)
        entry = repo.commits[sha]["tree"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            # Like the Hub: LFS files redirect to a CDN; the metadata travels on the redirect itself. The CDN
            # here is this same server under another host name, so the client treats it as off-Hub.
            sha256 = entry["lfs"]["oid"]
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"',
                            "X-Linked-Size": str(entry["lfs"]["size"]),
                            "Location": f"{self.server.cdn_url}/lfs-objects/{sha256}"})
            return self._send(302, b"", headers)
        data = (self.store.root / "blobs" / entry["oid"]).read_bytes()
        headers["ETag"] = f'"{entry["oid"]}"'
        self._send(200, data, headers, content_type="application/octet-stream")

    def _serve_lfs(self, sha256: str):
        path = self.store.lfs_path(sha256)
        if not _SHA256.match(sha256) or not path.exists():
            raise HubError(404, f"LFS object {sha256} not found")
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        if m := re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", "")):
            start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        if self.command == "HEAD":
            return self._send(status, b"", headers, "application/octet-stream", content_length=length)
        with open(path, "rb") as f:
            f.seek(start)
            self._send(status, f.read(length), headers, "application/octet-stream")


def _repo_type(prefix: str | None) -> str:
    return {None: "model", "datasets": "dataset", "spaces": "space"}[prefix]


def _first_commit(repo: Repo) -> str:
    oid = repo.branches["main"]
    while repo.commits[oid]["parent"]:
        oid = repo.commits[oid]["parent"]
    return oid


def _folder_oid(tree: dict, folder: str) -> str:
    listing = json.dumps(sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(folder + "/")))
    return hashlib.sha1(listing.encode()).hexdigest()


def _front_matter(text: str) -> dict | None:
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class LocalHubServer(ThreadingHTTPServer):
    """The threaded HTTP server, its store, a log of the (method, path) requests it answered and of the unrouted ones.

    Use as a context manager: `with LocalHubServer(tmp_dir) as hub: ... hub.endpoint ...`.
    """

    daemon_threads = True

    def __init__(self, root: str | Path | None = None, port: int = 0, cdn_host: str = "localhost"):
        super().__init__(("127.0.0.1", port), HubRequestHandler)
        self._tmp = tempfile.TemporaryDirectory(prefix="local-hub-") if root is None else None
        self.store = HubStore(root if root is not None else self._tmp.name)
        self.port = self.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # LFS downloads are redirected to this "CDN" origin: same socket, different host name, so the client
        # takes the Hub's off-host redirect path (metadata from the 302 answer, no auth header forwarded).
        self.cdn_url = f"http://{cdn_host}:{self.port}"
        self.requests: list[tuple[str, str]] = []
        #: Requests no route understood: a client call this server does not implement (tests assert it is empty).
        self.unrouted: list[tuple[str, str]] = []
        self._thread: threading.Thread | None = None

    def start(self) -> "LocalHubServer":
        self._thread = threading.Thread(target=self.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalHubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home: str | Path) -> dict[str, str]:
        """Environment variables that point a fresh `huggingface_hub` process at this server."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "dummy",
                "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Local Hugging Face Hub API server for tests.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--root", default=None, help="storage folder (default: a temporary folder)")
    args = parser.parse_args()
    server = LocalHubServer(args.root, port=args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
