# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The embedded AWS endpoint used by tests, benchmarks and the demo.

``MotoServer`` runs moto in server mode as a child process on a free loopback
port. ``FaultProxy`` is a small HTTP proxy on loopback in front of it that
counts every API call by service and operation and can inject latency,
throttling, server errors, dropped connections and truncated bodies. Code under
test reaches either only through ``endpoint_url``, as it would reach AWS.

The proxy also emulates what moto lacks for Auto Scaling launch lifecycle hooks
(instances held in ``Pending:Wait``, CompleteLifecycleAction,
RecordLifecycleActionHeartbeat, the hook's notifications to SQS/SNS): see
``lab/lifecycle.py`` and docs/lifecycle.md; and ``SourceVersion`` of
CreateLaunchTemplateVersion (``lab/launch_templates.py``).

Run as a script it starts both and prints the proxy's URL, for manual use::

    python lab/awsemu.py --port 5000
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:  # run as ``python lab/awsemu.py`` or imported as lab.awsemu
    from lab.launch_templates import SourceVersionEmulation
    from lab.lifecycle import LifecycleEmulation, query_params
except ImportError:  # pragma: no cover - script mode
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lab.launch_templates import SourceVersionEmulation
    from lab.lifecycle import LifecycleEmulation, query_params

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAFLEETKEEPERTEST",
    "AWS_SECRET_ACCESS_KEY": "fleetkeeper-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}

# Error codes each service uses to say "slow down"; botocore retries all of them.
THROTTLE_CODES = {"ec2": "RequestLimitExceeded", "s3": "SlowDown"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback only
                response.read()
                return
        except Exception as exc:  # pylint: disable=broad-exception-caught
            last_error = exc
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s: {last_error}")


class MotoServer:
    """moto in server mode, as a child process bound to 127.0.0.1."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path or os.path.join(tempfile.gettempdir(), f"fleetkeeper-moto-{self.port}.log")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MotoServer":
        env = dict(os.environ)
        env.update(TEST_CREDENTIALS)
        # moto must never try to reach the internet (for example for SSM parameters).
        env.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "false")
        log = open(self.log_path, "ab")  # pylint: disable=consider-using-with
        self.process = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        try:
            wait_for_http(f"{self.url}/moto-api/data.json")
        except RuntimeError:
            self.stop()
            raise
        return self

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback only
            response.read()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass
class Fault:
    """One injected misbehaviour.

    ``kind`` is ``throttle`` (a 400 with the service's throttling code),
    ``error`` (``status`` with an InternalError body), ``drop`` (close the
    connection without answering), ``truncate`` (send the real answer cut in
    half, with the full Content-Length) or ``deny`` (403 AccessDenied).
    ``code`` replaces the error code of ``error`` (for example
    ``ResourceContention`` with status 500, Auto Scaling's contention fault).
    ``service`` and ``operation`` restrict it (None matches all); ``where``
    restricts it to requests whose query parameters hold one of the given values
    (``{"InstanceId": [ids]}``, ``{"LaunchTemplateId": "lt-..."}``), so that
    one group's calls fail and the others' do not; ``times`` limits how often it
    fires (None: always).
    """

    kind: str
    service: str | None = None
    operation: str | None = None
    times: int | None = None
    status: int = 500
    code: str | None = None
    where: dict | None = None
    fired: int = 0

    def matches(self, service: str, operation: str, params: dict | None = None) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.service and self.service != service:
            return False
        if self.operation and self.operation != operation:
            return False
        for key, wanted in (self.where or {}).items():
            values = wanted if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
            if (params or {}).get(key) not in values:
                return False
        return True


@dataclass
class Call:
    service: str
    operation: str
    status: int
    injected: str | None = None


@dataclass
class ProxyState:
    latency: float = 0.0
    faults: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    lifecycle: LifecycleEmulation | None = None
    launch_templates: SourceVersionEmulation | None = None
    # Bumped by every reset: a call is counted only if it arrived after the last reset, so a request that
    # began before it (a 20 s SQS long poll of a process a test has stopped) is never counted in the next test.
    epoch: int = 0

    def record(self, epoch: int, call: Call) -> None:
        with self.lock:
            if epoch == self.epoch:
                self.calls.append(call)


def scope_of(headers) -> list:
    """The SigV4 credential scope (KEY/DATE/REGION/SERVICE/aws4_request) as a list."""
    auth = headers.get("Authorization", "")
    marker = "Credential="
    if marker in auth:
        return auth.split(marker, 1)[1].split(",", 1)[0].split("/")
    return []


def service_of(headers) -> str:
    """The service name from the SigV4 credential scope (…/REGION/SERVICE/aws4_request)."""
    auth = headers.get("Authorization", "")
    marker = "Credential="
    if marker in auth:
        scope = auth.split(marker, 1)[1].split(",", 1)[0].split("/")
        if len(scope) >= 5:
            return scope[3]
    return "unknown"


def operation_of(method: str, path: str, headers, body: bytes) -> str:
    """The API operation a request stands for, across the query, JSON and REST protocols."""
    target = headers.get("X-Amz-Target")
    if target:
        return target.rsplit(".", 1)[-1]
    parsed = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    if "Action" in query:
        return query["Action"][0]
    content_type = headers.get("Content-Type", "")
    if body and "x-www-form-urlencoded" in content_type:
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        if "Action" in form:
            return form["Action"][0]
    # S3 REST: path-style /bucket or /bucket/key
    parts = [p for p in parsed.path.split("/") if p]
    has_key = len(parts) > 1
    if "notification" in query and not has_key and method in ("GET", "PUT"):
        return "GetBucketNotificationConfiguration" if method == "GET" else "PutBucketNotificationConfiguration"
    if method == "GET":
        if not parts:
            return "ListBuckets"
        if not has_key:
            return "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"
        return "GetObject"
    mapping = {
        ("PUT", True): "PutObject",
        ("PUT", False): "CreateBucket",
        ("HEAD", True): "HeadObject",
        ("HEAD", False): "HeadBucket",
        ("DELETE", True): "DeleteObject",
        ("DELETE", False): "DeleteBucket",
        ("POST", False): "DeleteObjects" if "delete" in query else "PostBucket",
    }
    return mapping.get((method, has_key), f"{method} {parsed.path}")


def error_body(service: str, code: str, message: str) -> tuple[bytes, str]:
    request_id = str(uuid.uuid4())
    if service == "ec2":
        body = (
            f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code>"
            f"<Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
        )
    elif service == "s3":
        body = (
            f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        )
    else:
        body = (
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
            f"<RequestId>{request_id}</RequestId></ErrorResponse>"
        )
    return body.encode(), "text/xml"


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


def _make_handler(upstream: str, state: ProxyState):
    upstream_parts = urllib.parse.urlsplit(upstream)
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - signature from the base class
            return

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _upstream(self, method, body):
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            for attempt in range(2):
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = http.client.HTTPConnection(upstream_parts.hostname, upstream_parts.port, timeout=300)
                    local.conn = conn
                try:
                    conn.request(method, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    return response.status, response.getheaders(), response.read()
                except (http.client.HTTPException, OSError):
                    conn.close()
                    local.conn = None
                    if attempt:
                        raise
            raise RuntimeError("unreachable")

        def _send(self, status, headers, body, truncate=False):
            self.send_response(status)
            for key, value in headers:
                if key.lower() in HOP_BY_HOP or key.lower() == "content-length":
                    continue
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if truncate:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
            else:
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    # The client went away (a long poll cut short when its process stopped): nothing to answer.
                    self.close_connection = True

        def _handle(self):
            epoch = state.epoch
            body = self._read_body()
            service = service_of(self.headers)
            operation = operation_of(self.command, self.path, self.headers, body)
            if state.latency:
                time.sleep(state.latency)
            fault = None
            with state.lock:
                wants_params = any(f.where for f in state.faults)
            params = query_params(self.path, body) if wants_params else None
            with state.lock:
                for candidate in state.faults:
                    if candidate.matches(service, operation, params):
                        candidate.fired += 1
                        fault = candidate
                        break
            kind = fault.kind if fault else None
            if kind == "drop":
                state.record(epoch, Call(service, operation, 0, kind))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if kind in ("throttle", "error", "deny"):
                if kind == "throttle":
                    status, code, message = 400, THROTTLE_CODES.get(service, "Throttling"), "Rate exceeded"
                    if service == "s3":
                        status = 503
                elif kind == "deny":
                    status, code, message = 403, "AccessDenied", "Injected access denied"
                    if service == "ec2":
                        code = "UnauthorizedOperation"
                else:
                    status, code, message = fault.status, fault.code or "InternalError", "Injected server error"
                    if service == "s3" and status == 503:
                        code = "ServiceUnavailable"
                payload, content_type = error_body(service, code, message)
                state.record(epoch, Call(service, operation, status, kind))
                self._send(status, [("Content-Type", content_type)], payload)
                return
            lifecycle = state.lifecycle if service == "autoscaling" else None
            if lifecycle is not None:
                scope = scope_of(self.headers)
                region = scope[2] if len(scope) >= 5 else "us-east-1"
                params = query_params(self.path, body)
                made_up = lifecycle.before(region, operation, params)
                if made_up is not None:
                    status, payload = made_up
                    state.record(epoch, Call(service, operation, status, "emulated"))
                    self._send(status, [("Content-Type", "text/xml")], payload)
                    return
            if service == "ec2" and operation == "CreateLaunchTemplateVersion" and state.launch_templates:
                scope = scope_of(self.headers)
                rewritten = state.launch_templates.before(scope[2] if len(scope) >= 5 else "us-east-1", operation,
                                                          query_params(self.path, body))
                if rewritten is not None:
                    body = rewritten
            try:
                status, headers, payload = self._upstream(self.command, body)
            except (http.client.HTTPException, OSError) as exc:
                # The upstream (moto) is gone, as when a test or the harness stops it: answer like an AWS
                # front end whose back end is down (a retryable 502), never a traceback on the test's output.
                payload, content_type = error_body(service, "ServiceUnavailable",
                                                   f"the endpoint's upstream {upstream} did not answer: {exc}")
                state.record(epoch, Call(service, operation, 502, "upstream-down"))
                self._send(502, [("Content-Type", content_type)], payload)
                return
            if lifecycle is not None:
                payload = lifecycle.after(region, operation, params, status, payload)
            state.record(epoch, Call(service, operation, status, kind))
            self._send(status, headers, payload, truncate=(kind == "truncate"))

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle  # noqa: N815

    return Handler


class _ProxyServer(ThreadingHTTPServer):
    """The proxy's server: a client that hangs up (a test stopping a run, a killed ansible-playbook, a timeout)
    ends its request quietly instead of printing socketserver's traceback; other errors still print."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class FaultProxy:
    """Loopback HTTP proxy in front of an AWS endpoint that counts calls and injects faults."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        self.upstream = upstream
        self.state = ProxyState()
        self._clients: dict = {}
        self.lifecycle = self.state.lifecycle = LifecycleEmulation(self._upstream_client)
        self.state.launch_templates = SourceVersionEmulation(self._upstream_client)
        self.server = _ProxyServer((host, port), _make_handler(upstream, self.state))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _upstream_client(self, service: str, region: str):
        """A boto3 client that reaches the upstream directly (the lifecycle emulation's own calls)."""
        key = (service, region)
        if key not in self._clients:
            import boto3  # pylint: disable=import-outside-toplevel

            self._clients[key] = boto3.client(
                service, region_name=region, endpoint_url=self.upstream,
                aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            )
        return self._clients[key]

    # --- control -------------------------------------------------------
    def set_latency(self, milliseconds: float) -> None:
        self.state.latency = milliseconds / 1000.0

    def inject(self, kind: str, service: str | None = None, operation: str | None = None,
               times: int | None = None, status: int = 500, code: str | None = None,
               where: dict | None = None) -> Fault:
        if kind not in ("throttle", "error", "drop", "truncate", "deny"):
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(kind=kind, service=service, operation=operation, times=times, status=status, code=code,
                      where=where)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def reset(self) -> None:
        """Forget faults, latency, counted calls and lifecycle actions."""
        with self.state.lock:
            self.state.faults.clear()
            self.state.calls.clear()
            self.state.epoch += 1
        self.state.latency = 0.0
        self.lifecycle.reset()

    def calls(self, service: str | None = None, operation: str | None = None) -> list:
        return [c for c in list(self.state.calls)
                if (service is None or c.service == service) and (operation is None or c.operation == operation)]

    def count(self, service: str | None = None, operation: str | None = None) -> int:
        return len(self.calls(service, operation))

    def summary(self) -> dict:
        counter = collections.Counter(f"{c.service}:{c.operation}" for c in self.calls())
        return dict(sorted(counter.items()))


class AwsEmulator:
    """moto server plus fault proxy; ``endpoint_url`` is the proxy's address."""

    def __init__(self, port: int | None = None):
        self.moto = MotoServer(port=port)
        self.proxy: FaultProxy | None = None

    def start(self) -> "AwsEmulator":
        self.moto.start()
        self.proxy = FaultProxy(self.moto.url).start()
        return self

    @property
    def endpoint_url(self) -> str:
        return self.proxy.url

    def env(self, region: str = "us-east-1") -> dict:
        env = dict(TEST_CREDENTIALS)
        env["AWS_DEFAULT_REGION"] = env["AWS_REGION"] = region
        return env

    def client(self, service: str, region: str = "us-east-1", direct: bool = False):
        import boto3  # pylint: disable=import-outside-toplevel

        return boto3.client(
            service,
            region_name=region,
            endpoint_url=self.moto.url if direct else self.endpoint_url,
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def reset(self) -> None:
        self.moto.reset()
        self.proxy.reset()

    def stop(self) -> None:
        if self.proxy:
            self.proxy.stop()
        self.moto.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="proxy port (default: a free one)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every API call")
    parser.add_argument("--lifecycle-time-scale", type=float, default=1.0,
                        help="multiply lifecycle hook timeouts (tests and demos only)")
    parser.add_argument("--state-file", help="write {endpoint_url, moto_url, pid} here as JSON")
    args = parser.parse_args(argv)
    emulator = AwsEmulator()
    emulator.moto.start()
    emulator.proxy = FaultProxy(emulator.moto.url, port=args.port).start()
    emulator.proxy.set_latency(args.latency_ms)
    emulator.proxy.lifecycle.time_scale = args.lifecycle_time_scale
    info = {"endpoint_url": emulator.endpoint_url, "moto_url": emulator.moto.url, "pid": os.getpid()}
    if args.state_file:
        with open(args.state_file, "w", encoding="utf-8") as handle:
            json.dump(info, handle)
    print(json.dumps(info), flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
