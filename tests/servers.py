"""Servers on loopback for the storage tests, each reached by the real client over HTTP:

- S3Server: moto's S3 API server (ThreadedMotoServer) on 127.0.0.1, with real IAM authentication on demand;
- FaultProxy: an HTTP proxy of our own between a client and a server, recording every request and failing the
  ones a rule picks: dropped connections, stalls, delays, 503s;
- SilentServer: accepts connections and never answers (a hung load balancer, a stopped process behind a live port);
- FakeHub: the routes huggingface_hub calls to read a repository (info, tree, resolve) and to write one (whoami,
  create, branch, preupload, LFS batch and upload, commit), with tokens, private repositories and commits.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.client
import json
import logging
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DUMMY_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def start_http(handler: type[BaseHTTPRequestHandler], owner) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.owner = owner
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


class S3Server:
    """moto's S3 (and IAM) API on a free loopback port, starting empty: moto keeps its buckets in the process, shared
    by every server a test session starts, so a new server clears what an earlier module's left."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.reset()

    def env(self, url: str | None = None) -> dict[str, str]:
        """What a job needs to reach this server (or a proxy in front of it): only the standard AWS variables."""
        return {"AWS_ENDPOINT_URL": url or self.url, "AWS_REGION": "us-east-1", **DUMMY_KEYS}

    @functools.cache  # noqa: B019 - one client per server and service, for the life of the server
    def client(self, service: str = "s3"):
        """An independent boto3 client, configured explicitly rather than from the environment, never proxied."""
        import boto3

        return boto3.session.Session().client(service, endpoint_url=self.url, region_name="us-east-1",
                                              aws_access_key_id="testing", aws_secret_access_key="testing")

    def _moto_api(self, path: str, body: bytes = b"") -> None:
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

    def reset(self) -> None:
        self._moto_api("/moto-api/reset")

    @contextlib.contextmanager
    def authenticated(self):
        """Requests need a valid IAM key and a policy allowing them while inside; anything goes again after."""
        self._moto_api("/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            self._moto_api("/moto-api/reset-auth", b"inf")

    def user(self, name: str, actions: list[str]) -> dict[str, str]:
        """An IAM user allowed only `actions`; returns its keys as environment variables."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="only", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def stop(self) -> None:
        self._server.stop()


class SilentServer:
    """A loopback port that accepts every connection and never sends a byte; `url` is its address."""

    def __init__(self):
        import socket

        self._socket = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.accepted: list = []  # held open, so that clients wait for an answer rather than see a reset
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self._socket.accept()[0])
            except OSError:  # closed by stop()
                return

    def stop(self) -> None:
        self._socket.close()
        for connection in self.accepted:
            connection.close()


@dataclass
class Fault:
    matches: object  # (method, path) -> bool
    action: object  # "drop" | "503" | ("stall", seconds) | ("delay", seconds)
    times: int | None = None  # None: every matching request


@dataclass
class FaultProxy:
    """Forwards HTTP requests to 127.0.0.1:`upstream`, headers untouched (SigV4 signatures stay valid)."""

    upstream: int
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, what happened)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._server = start_http(_ProxyHandler, self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, action, method: str | None = None, path: str = "", times: int | None = None) -> None:
        """Fail requests whose method is `method` (any when None) and whose path contains `path`."""
        self.faults.append(Fault(lambda m, p: (method is None or m == method) and path in p, action, times))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def decide(self, method: str, path: str):
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path) and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    self.requests.append((method, path, str(fault.action)))
                    return fault.action
            self.requests.append((method, path, "forwarded"))
            return None

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and path in p)

    def stop(self) -> None:
        self._server.shutdown()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _handle(self):
        proxy: FaultProxy = self.server.owner
        assert "chunked" not in self.headers.get("Transfer-Encoding", ""), "chunked bodies are not proxied"
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        action = proxy.decide(self.command, self.path)
        if action == "drop" or (isinstance(action, tuple) and action[0] == "stall"):
            if action != "drop":
                time.sleep(action[1])
            self.close_connection = True
            return
        if action == "503":
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self._reply(503, "Service Unavailable", [("Content-Type", "application/xml")], payload)
            return
        if isinstance(action, tuple) and action[0] == "delay":
            time.sleep(action[1])
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            upstream.putheader(name, value)
        upstream.endheaders(body or None)
        response = upstream.getresponse()
        data = response.read()
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
        self._reply(response.status, response.reason, headers, data)
        upstream.close()

    def _reply(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status, reason)
        head = self.command == "HEAD"
        for name, value in headers:
            if name.lower() != "content-length" or head:
                self.send_header(name, value)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


# --- the Hub ------------------------------------------------------------------------------------------------------

@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A Hugging Face Hub on loopback. Tokens map to roles ("read" or "write"); `requests` records every request
    with its Authorization header, `commits_received` every commit payload."""

    LFS_MIN = 10_000  # bytes from which preupload answers "lfs" (the real Hub goes by .gitattributes and size)

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.commits_received: list[dict] = []
        self.created: list[dict] = []
        self.faults: list[list] = []  # [path fragment, status, times left or None]
        self._lock = threading.Lock()
        self._server = start_http(_HubHandler, self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self, token: str | None = None) -> dict[str, str]:
        """What a job needs to talk to this Hub: HF_ENDPOINT, HF_TOKEN, and no Xet (this Hub speaks LFS only)."""
        env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        return {**env, "HF_TOKEN": token} if token else env

    def seed(self, repo_type: str, repo_id: str, files: dict[str, bytes], private: bool = False,
             message: str = "seed") -> str:
        """Commit `files` (replacing the whole tree) to `main`, creating the repository; returns the commit."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id, private))
        return self._commit(repo, "main", dict(files), message)

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = repo.branches.get(branch)
        oid = hashlib.sha1(f"{parent}{message}{sorted(files)}{time.time_ns()}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, files, message, parent)
        repo.branches[branch] = oid
        return oid

    def fail(self, fragment: str, status: int, times: int | None = None) -> None:
        """Answer `status` to requests whose path contains `fragment` (`times` of them, or all)."""
        self.faults.append([fragment, status, times])

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> Commit:
        repo = self.repo(repo_id, repo_type)
        return repo.commits[repo.branches[branch]]

    def stop(self) -> None:
        self._server.shutdown()


class _HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = "", **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


REPO = r"(?:(?P<kind>models|datasets)/)?(?P<repo>[\w.-]+/[\w.-]+)"


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.owner

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.hub.requests.append((self.command, path, self.headers.get("Authorization")))
        try:
            with self.hub._lock:
                for fault in self.hub.faults:
                    if fault[0] in path and fault[2] != 0:
                        fault[2] = None if fault[2] is None else fault[2] - 1
                        raise _HubError(fault[1], None, "injected failure")
                self._route(path, query, body)
        except _HubError as e:
            headers = {"X-Error-Code": e.code} if e.code else {}
            self._json(e.status, {"error": e.message or e.code or "error", **e.extra}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def _json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send(self, status: int, data: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # --- auth and lookup ------------------------------------------------------------------------------------------
    def _role(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        role = self.hub.tokens.get(auth.removeprefix("Bearer "))
        if role is None:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        return role

    def _repo(self, kind: str | None, repo_id: str, write: bool = False) -> Repo:
        role = self._role()
        repo = self.hub.repos.get(("dataset" if kind == "datasets" else "model", repo_id))
        if repo is None or (repo.private and role is None):
            raise _HubError(401 if role is None else 404, "RepoNotFound", "Repository not found")
        if write and role != "write":
            raise _HubError(403, None, "You don't have the rights to write to this repository")
        return repo

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision, revision)
        if oid not in repo.commits:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[oid]

    # --- routes ---------------------------------------------------------------------------------------------------
    def _route(self, path: str, query: dict, body: bytes) -> None:
        routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", lambda **_: self._json(200, {"errors": [], "warnings": []})),
            ("GET", rf"/api/{REPO}(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("GET", rf"/api/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("POST", rf"/api/{REPO}/branch/(?P<branch>[^/]+)", self._branch),
            ("POST", rf"/api/{REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/{REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_upload),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method == self.command:
                return handler(**match.groupdict(), query=query, body=body)
        raise _HubError(404, None, f"no route for {self.command} {path}")

    def _whoami(self, **_):
        role = self._role()
        if role is None:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": "tester", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "t", "role": role}}})

    def _create(self, body: bytes, **_):
        if self._role() != "write":
            raise _HubError(403 if self._role() else 401, None, "You don't have the rights to create a repository")
        spec = json.loads(body)
        repo_type = spec.get("type") or "model"
        repo_id = f"{spec['organization']}/{spec['name']}"
        self.hub.created.append(spec)
        if (repo_type, repo_id) in self.hub.repos:
            raise _HubError(409, None, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
        repo = self.hub.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, spec.get("visibility") == "private")
        self.hub._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         "initial commit")
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _info(self, kind, repo, rev=None, **_):
        r = self._repo(kind, repo)
        commit = self._commit_of(r, rev or "main")
        self._json(200, {"id": repo, "sha": commit.oid, "private": r.private,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _entry(self, path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
        if hashlib.sha256(data).hexdigest() in self.hub.lfs:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _tree(self, kind, repo, rev, sub=None, **_):
        commit = self._commit_of(self._repo(kind, repo), rev)
        prefix = f"{sub.strip('/')}/" if sub else ""
        self._json(200, [self._entry(p, d) for p, d in sorted(commit.files.items()) if p.startswith(prefix)])

    def _resolve(self, kind, repo, rev, file, **_):
        commit = self._commit_of(self._repo(kind, repo), rev)
        if file not in commit.files:
            raise _HubError(404, "EntryNotFound", f"{file} does not exist")
        data = commit.files[file]
        sha = hashlib.sha256(data).hexdigest()
        etag = sha if sha in self.hub.lfs else git_blob_oid(data)
        self._send(200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"',
                               "Content-Type": "application/octet-stream"})

    def _branch(self, kind, repo, branch, body, **_):
        r = self._repo(kind, repo, write=True)
        if branch in r.branches:
            raise _HubError(409, None, "Branch already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        r.branches[branch] = self._commit_of(r, start).oid
        self._json(200, {})

    def _preupload(self, kind, repo, rev, body, **_):
        r = self._repo(kind, repo, write=True)
        self._commit_of(r, rev)
        files = json.loads(body)["files"]
        self._json(200, {"files": [
            {"path": f["path"], "shouldIgnore": False, "oid": None,
             "uploadMode": "lfs" if f["size"] >= FakeHub.LFS_MIN or f["path"].endswith(".safetensors") else "regular"}
            for f in files]})

    def _lfs_batch(self, kind, repo, body, **_):
        self._repo(kind, repo, write=True)
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_upload(self, oid, body, **_):
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, None, "sha256 mismatch")
        self.hub.lfs[oid] = body
        self._send(200, b"", {})

    def _commit(self, kind, repo, rev, body, **_):
        r = self._repo(kind, repo, write=True)
        parent = self._commit_of(r, rev)
        if rev not in r.branches:
            raise _HubError(400, None, "can only commit to a branch")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        self.hub.commits_received.append({"repo": repo, "revision": rev, "lines": lines,
                                          "authorization": self.headers.get("Authorization")})
        files = dict(parent.files)
        header = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    raise _HubError(422, None, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = self.hub.lfs[value["oid"]]
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, "EntryNotFound", "A file with this name doesn't exist")
        oid = self.hub._commit(r, rev, files, header.get("summary", ""))
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}"})
