"""A local, in-memory, Hub-compatible HTTP server for push/download tests (standard library only).

It implements what huggingface_hub's client calls when pushing a folder with HF_HUB_DISABLE_XET=1 and downloading it
back: repo create, branch create, README yaml validation, preupload (`regular` for small files, `lfs` for
*.safetensors), the LFS batch API with a basic-transfer upload URL, ndjson commits, the recursive tree listing, repo
info, and HEAD/GET resolve with X-Repo-Commit / ETag / Content-Length. `fail_first` makes chosen routes answer 503 a
number of times first; `token` makes every request without `Authorization: Bearer <token>` answer 401.

Why here and not in tests/conftest.py: it is a tool, not a fixture (300 lines of HTTP routes; conftest.py keeps the
`hub_env` fixture that starts it), and code that pushes with medusa_toolkit (`MedusaHeads.push_to_hub`, `medusa-export
--push`) can be tested against it offline from anywhere, like the rest of medusa_toolkit.testing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"
ROUTES = [
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "create_branch", re.compile(rf"^/api/models/{_REPO}/branch/{_REV}$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/{_REV}$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/{_REV}$")),
    ("POST", "lfs_batch", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")),
    ("PUT", "lfs_upload", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")),
    ("GET", "tree", re.compile(rf"^/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?$")),
    ("GET", "info", re.compile(rf"^/api/models/{_REPO}(?:/revision/{_REV})?$")),
    ("GET", "resolve", re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<path>.+)$")),
    ("HEAD", "resolve", re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<path>.+)$")),
]


class HubState:
    """Repos -> branches -> {path: bytes}; LFS blobs by sha256; request log; failure injection."""

    def __init__(self, token: str | None = None, fail_first: dict[str, int] | None = None):
        self.token = token
        self.fail_first = dict(fail_first or {})
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.calls: list[tuple[str, str, int]] = []  # (route, path, status)
        self.commits: list[dict] = []
        self.lock = threading.Lock()
        self.counts: dict[str, int] = defaultdict(int)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The files of a repo's branch (`rev`), path -> bytes, as the pushes left them."""
        return self.repos[repo_id]["branches"][rev]["files"]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # -------------------------------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, route: str = "") -> None:
        self.server.state.calls.append((route, self.path, status))
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, route: str = "", headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers, route)

    def _error(self, status: int, message: str, route: str, code: str | None = None) -> None:
        self._json(status, {"error": message}, route, {"X-Error-Code": code} if code else None)

    def _dispatch(self) -> None:
        state: HubState = self.server.state
        url = urlsplit(self.path)
        body = self._body() if self.command in ("POST", "PUT") else b""
        hit = next(
            ((n, p.match(url.path)) for meth, n, p in ROUTES if meth == self.command and p.match(url.path)), None
        )
        if hit is None:
            return self._error(404, f"no route for {self.command} {url.path}", "?")
        name, m = hit
        with state.lock:
            state.counts[name] += 1
            failing = state.counts[name] <= state.fail_first.get(name, 0)
        if failing:
            return self._error(503, "Service temporarily unavailable (injected)", name)
        if state.token is not None and name != "lfs_upload":
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                return self._error(401, "Invalid credentials in Authorization header", name)
        groups = {k: unquote(v) if v else v for k, v in m.groupdict().items()}
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        getattr(self, f"_{name}")(state, groups, query, body, name)

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # -------------------------------------------------------------------------------------------- routes
    def _base(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    def _repo(self, state: HubState, g: dict, route: str) -> dict | None:
        repo = state.repos.get(g["repo"])
        if repo is None:
            self._error(404, "Repository not found", route, "RepoNotFound")
            return None
        return repo

    def _create(self, state, g, q, body, route):
        data = json.loads(body)
        repo_id = f"{data.get('organization') or 'user'}/{data['name']}"
        if repo_id in state.repos:  # the Hub's 409 still carries the url (create_repo(exist_ok=True) returns it)
            return self._json(
                409, {"error": "You already created this model repo", "url": f"{self._base()}/{repo_id}"}, route
            )
        state.repos[repo_id] = {
            "private": data.get("visibility") == "private" or bool(data.get("private")),
            "branches": {"main": {"sha": "0" * 40, "files": {}}},
            "prs": 0,
        }
        self._json(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id, "id": repo_id}, route)

    def _validate_yaml(self, state, g, q, body, route):
        self._json(200, {"errors": [], "warnings": []}, route)

    def _create_branch(self, state, g, q, body, route):
        repo = self._repo(state, g, route)
        if repo is None:
            return
        if g["rev"] in repo["branches"]:
            return self._error(409, "Reference already exists", route)
        main = repo["branches"]["main"]
        repo["branches"][g["rev"]] = {"sha": main["sha"], "files": dict(main["files"])}
        self._json(200, {}, route)

    def _preupload(self, state, g, q, body, route):
        if self._repo(state, g, route) is None:
            return
        files = json.loads(body)["files"]
        modes = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
             "shouldIgnore": False, "oid": None}
            for f in files
        ]  # fmt: skip
        self._json(200, {"files": modes, "commitOid": "0" * 40}, route)

    def _lfs_batch(self, state, g, q, body, route):
        if self._repo(state, g, route) is None:
            return
        data = json.loads(body)
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in state.lfs:
                entry["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._json(
            200, {"transfer": "basic", "objects": objects}, route, {"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_upload(self, state, g, q, body, route):
        if hashlib.sha256(body).hexdigest() != g["oid"]:
            return self._error(400, "sha256 of the uploaded content does not match the oid", route)
        state.lfs[g["oid"]] = body
        self._send(200, b"", route=route)

    def _commit(self, state, g, q, body, route):
        repo = self._repo(state, g, route)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._error(400, "commit payload must start with a header line", route)
        create_pr = q.get("create_pr") == "1"
        rev = g["rev"]
        if rev not in repo["branches"]:
            return self._error(404, f"Invalid rev id: {rev}", route, "RevisionNotFound")
        files = dict(repo["branches"][rev]["files"])
        for line in lines[1:]:
            v = line["value"]
            if line["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif line["key"] == "lfsFile":
                if v["oid"] not in state.lfs:
                    return self._error(400, f"LFS object {v['oid']} was never uploaded", route)
                files[v["path"]] = state.lfs[v["oid"]]
            elif line["key"] in ("deletedFile", "deletedFolder"):
                files = {
                    p: b for p, b in files.items() if p != v["path"] and not p.startswith(v["path"].rstrip("/") + "/")
                }
        sha = hashlib.sha1(
            json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())).encode()
            + str(len(state.commits)).encode()
        ).hexdigest()
        target = rev
        pr_url = None
        if create_pr:
            repo["prs"] += 1
            target = f"refs/pr/{repo['prs']}"
            pr_url = f"{self._base()}/{g['repo']}/discussions/{repo['prs']}"
        repo["branches"][target] = {"sha": sha, "files": files}
        state.commits.append(
            {"repo": g["repo"], "rev": target, "summary": lines[0]["value"].get("summary"), "files": sorted(files)}
        )
        self._json(
            200,
            {"commitUrl": f"{self._base()}/{g['repo']}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url},
            route,
        )

    def _tree(self, state, g, q, body, route):
        branch = self._branch_lookup(state, g, route)
        if branch is None:
            return
        prefix = (g.get("path") or "").strip("/")
        entries = []
        for path, blob in sorted(branch["files"].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            entry = {"type": "file", "path": path, "size": len(blob), "oid": _git_sha(blob)}
            if path.endswith(".safetensors"):
                entry["lfs"] = {"oid": hashlib.sha256(blob).hexdigest(), "size": len(blob), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries, route)

    def _info(self, state, g, q, body, route):
        branch = self._branch_lookup(state, g, route)
        if branch is None:
            return
        repo = state.repos[g["repo"]]
        siblings = [{"rfilename": p} for p in sorted(branch["files"])]
        self._json(
            200,
            {
                "id": g["repo"],
                "modelId": g["repo"],
                "sha": branch["sha"],
                "private": repo["private"],
                "siblings": siblings,
            },
            route,
        )

    def _resolve(self, state, g, q, body, route):
        branch = self._branch_lookup(state, g, route)
        if branch is None:
            return
        blob = branch["files"].get(g["path"])
        headers = {"X-Repo-Commit": branch["sha"]}
        if blob is None:
            return self._send(404, b'{"error": "Entry not found"}', {**headers, "X-Error-Code": "EntryNotFound"}, route)
        lfs = g["path"].endswith(".safetensors")
        etag = hashlib.sha256(blob).hexdigest() if lfs else _git_sha(blob)
        headers.update({"ETag": f'"{etag}"', "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"})
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(blob))})
        self._send(200, blob, headers, route)

    def _branch_lookup(self, state, g, route):
        repo = self._repo(state, g, route)
        if repo is None:
            return None
        rev = g.get("rev") or "main"
        branch = repo["branches"].get(rev) or next((b for b in repo["branches"].values() if b["sha"] == rev), None)
        if branch is None:
            self._error(404, f"Invalid rev id: {rev}", route, "RevisionNotFound")
        return branch


def _git_sha(blob: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class HubServer:
    """`with HubServer(token=..., fail_first={"create": 2}) as hub:` -> hub.endpoint, hub.state."""

    def __init__(self, token: str | None = None, fail_first: dict[str, int] | None = None):
        self.state = HubState(token, fail_first)
        self._server = _Server(self.state)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubServer:
        """Start serving (a daemon thread) on `self.endpoint`."""
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
