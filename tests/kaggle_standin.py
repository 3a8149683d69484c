"""A stand-in for the Kaggle API (standard library only), enough for the `kaggle` package 2.2.5 to
download a competition's files and submit a CSV, for tests that must not reach kaggle.com.

kaggle 2.2.5 talks to https://api.kaggle.com, or to http://localhost when
KAGGLE_API_ENVIRONMENT=LOCALHOST; with HTTP_PROXY pointing here, every such request arrives here
(in proxy form: an absolute URL). What the client does:
  download  POST /api/v1/competitions.CompetitionApiService/DownloadDataFiles {"competitionName"}
            → 302 to a signed storage URL (the file is named after its extension) → GET the zip
  submit    POST …/StartSubmissionUpload → {token, createUrl}; PUT createUrl (the CSV);
            POST …/CreateSubmission {"competitionName", "blobFileTokens", "submissionDescription"}
The RPCs carry `Authorization: Basic base64(username:key)`; storage and upload URLs carry none.
"""
from __future__ import annotations

import email.utils
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

SERVICE = "/api/v1/competitions.CompetitionApiService/"


class StandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, zip_path: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.zip_path, self.requests, self.uploads, self.submissions = Path(zip_path), [], {}, []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def client_env(self, base: dict, home: Path) -> dict:
        """`base` without any proxy or Kaggle settings, then pointed here. HOME is replaced: a
        ~/.kaggle/access_token would win over the test's credentials."""
        env = {k: v for k, v in base.items() if not k.startswith("KAGGLE_")
               and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        return {**env, "HOME": str(home), "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": self.base,
                "HTTPS_PROXY": self.base, "NO_PROXY": ""}


class _Handler(BaseHTTPRequestHandler):
    server: StandIn
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _record(self, body: bytes) -> str:
        with self.server.lock:
            self.server.requests.append({"method": self.command, "target": self.path,
                                         "headers": dict(self.headers.items()), "body": body})
        parts = urlsplit(self.path)
        return parts.path if parts.scheme else self.path.split("?")[0]

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", extra: dict | None = None):
        self.send_response(status)
        for k, v in {"Content-Type": ctype, "Content-Length": str(len(body)), **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_CONNECT(self):  # https through the proxy: the real Kaggle, which a test must never reach
        self._record(b"")
        self._send(502, b"stand-in: no https\n", "text/plain")

    def do_POST(self):
        body = self._body()
        path, request = self._record(body), json.loads(body or b"{}")
        if path == SERVICE + "DownloadDataFiles":
            url = f"{self.server.base}/storage/{request['competitionName']}.zip?X-Goog-Signature={uuid.uuid4().hex}"
            return self._send(302, extra={"Location": url})
        if path == SERVICE + "StartSubmissionUpload":
            token = uuid.uuid4().hex
            self.server.uploads[token] = b""
            return self._send(200, json.dumps({"token": token, "createUrl": f"{self.server.base}/upload/{token}"}).encode())
        if path == SERVICE + "CreateSubmission":
            self.server.submissions.append({**request, "data": self.server.uploads[request["blobFileTokens"]]})
            return self._send(200, json.dumps({"message": "Successfully submitted", "ref": 1000}).encode())
        self._send(404, json.dumps({"code": 404, "message": f"stand-in has no {path}"}).encode())

    def do_PUT(self):
        body = self._body()
        self.server.uploads[self._record(body).rsplit("/", 1)[-1]] = body
        self._send(200, b"{}")

    def do_GET(self):
        if self._record(b"").startswith("/storage/"):
            modified = email.utils.formatdate(time.time(), usegmt=True)
            return self._send(200, self.server.zip_path.read_bytes(), "application/zip", {"Last-Modified": modified})
        self._send(404, b"not found\n", "text/plain")


def serve(zip_path: Path) -> StandIn:
    server = StandIn(zip_path)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return server
