# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small caching HTTP proxy for Debian's archive (apt-cacher-ng in miniature).

Test hosts and debootstrap send plain-HTTP proxy requests
(``GET http://deb.debian.org/debian/...``). Files that never change under their
URL (packages in ``pool/``, indexes fetched ``by-hash/``) are cached forever;
``InRelease``/``Release`` and other index files are cached and revalidated after
``index_ttl`` seconds (and served stale if the archive cannot be reached). Only
the hosts in ``allowed_hosts`` are proxied; CONNECT is refused, so a test host
cannot use the proxy to reach anything else.

The cache lives under ``<cache>/apt/<host>/<path>``; files are written to a
temporary name and renamed, so several proxies (concurrent runs) can share it.
Every response carries ``X-Cache: HIT|MISS|REVALIDATED|STALE`` and is logged.
"""

from __future__ import annotations

import argparse
import email.utils
import http.client
import json
import os
import posixpath
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_ALLOWED_HOSTS = ("deb.debian.org", "security.debian.org")
IMMUTABLE_MARKERS = ("/pool/", "/by-hash/")
CHUNK = 256 * 1024


def is_immutable(path: str) -> bool:
    """True for archive files whose content never changes under the same URL."""
    return any(marker in path for marker in IMMUTABLE_MARKERS) or path.endswith((".deb", ".udeb", ".dsc"))


def cache_path(root: str, host: str, path: str) -> str | None:
    """Where ``http://host/path`` is cached, or None if the path is unsafe."""
    raw = urllib.parse.unquote(path.split("?", 1)[0])
    clean = posixpath.normpath("/" + raw)
    if raw.endswith("/") or clean == "/" or "\x00" in clean or not host or "/" in host or host.startswith("."):
        return None
    if any(part in ("..", ".") or part.startswith(".fk-") for part in clean.split("/")):
        return None
    return os.path.join(root, host.lower(), clean.lstrip("/"))


class CacheStats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict = {}

    def add(self, outcome: str) -> None:
        with self.lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1


class AptProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fleetkeeper-aptproxy/1"

    # set on the server: cache_root, allowed_hosts, index_ttl, stats, access_log
    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def _log(self, outcome: str, url: str, size: int) -> None:
        self.server.stats.add(outcome)
        log = self.server.access_log
        if log:
            line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {outcome} {size} {url}\n"
            with self.server.log_lock, open(log, "a", encoding="utf-8") as handle:
                handle.write(line)

    def _error(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_CONNECT(self):  # noqa: N802
        self.close_connection = True
        self._error(403, "CONNECT is not allowed: this proxy serves Debian's archive over plain HTTP only")

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_GET(self):  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        if url.scheme != "http" or not url.hostname:
            self._error(400, f"expected an absolute http:// URL, got {self.path!r}")
            return
        host = url.hostname.lower()
        if host not in self.server.allowed_hosts or (url.port not in (None, 80)):
            self._error(403, f"{host} is not an allowed upstream ({', '.join(self.server.allowed_hosts)})")
            return
        path = url.path or "/"
        target = cache_path(self.server.cache_root, host, path)
        if target is None:
            self.close_connection = True
            self._fetch_passthrough(host, path + (f"?{url.query}" if url.query else ""))
            return
        if os.path.isfile(target):
            age = time.time() - os.path.getmtime(target)
            if is_immutable(path) or age < self.server.index_ttl:
                self._serve_file(target, "HIT", self.path)
                return
            self._fetch(host, path, target, revalidate=True)
            return
        self._fetch(host, path, target, revalidate=False)

    # --- upstream -------------------------------------------------------------------
    def _upstream(self, host: str) -> http.client.HTTPConnection:
        address, port = self.server.upstreams.get(host, (host, 80))
        return http.client.HTTPConnection(address, port, timeout=self.server.upstream_timeout)

    def _fetch_passthrough(self, host: str, path: str) -> None:
        try:
            conn = self._upstream(host)
            conn.request("GET", path, headers={"User-Agent": self.headers.get("User-Agent", "apt")})
            response = conn.getresponse()
            body = response.read()
            conn.close()
        except OSError as exc:
            self._error(502, f"upstream {host} failed: {exc}")
            return
        self.send_response(response.status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Cache", "PASS")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log("PASS", self.path, len(body))

    def _fetch(self, host: str, path: str, target: str, revalidate: bool) -> None:
        headers = {"User-Agent": self.headers.get("User-Agent", "fleetkeeper-aptproxy")}
        meta = _read_meta(target) if revalidate else {}
        if revalidate and meta.get("last_modified"):
            headers["If-Modified-Since"] = meta["last_modified"]
        try:
            conn = self._upstream(host)
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
        except OSError as exc:
            if revalidate:
                self._serve_file(target, "STALE", self.path)
            else:
                self._error(502, f"upstream {host} failed: {exc}")
            return
        try:
            if revalidate and response.status == 304:
                response.read()
                os.utime(target)
                self._serve_file(target, "REVALIDATED", self.path)
                return
            if response.status != 200:
                body = response.read()
                if revalidate and response.status >= 500:
                    self._serve_file(target, "STALE", self.path)
                    return
                self.send_response(response.status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", response.getheader("Content-Type", "text/plain"))
                self.send_header("X-Cache", "MISS")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self._log(f"MISS-{response.status}", self.path, len(body))
                return
            self._stream_and_store(response, target, "REFRESHED" if revalidate else "MISS")
        finally:
            conn.close()

    def _stream_and_store(self, response, target: str, outcome: str) -> None:
        length = response.getheader("Content-Length")
        last_modified = response.getheader("Last-Modified")
        content_type = response.getheader("Content-Type", "application/octet-stream")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".fk-", dir=os.path.dirname(target))
        received = 0
        client_ok = True

        def send_headers():
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if length is not None:
                self.send_header("Content-Length", length)
            else:
                self.close_connection = True
            if last_modified:
                self.send_header("Last-Modified", last_modified)
            self.send_header("X-Cache", outcome)
            self.end_headers()

        # The answer completes only once the file is in the cache (HEAD: headers
        # after the download; GET: the last chunk held back), so a client that
        # asks again right after its answer always hits.
        try:
            with os.fdopen(fd, "wb") as out:
                if self.command != "HEAD":
                    send_headers()
                pending = b""
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    client_ok = self._send_chunk(pending, client_ok)
                    pending = chunk
            if length is not None and received != int(length):
                raise OSError(f"upstream sent {received} of {length} bytes")
            _write_meta(target, {"last_modified": last_modified, "content_type": content_type})
            os.replace(temp, target)
            temp = None
            self._log(outcome, self.path, received)
            if self.command == "HEAD":
                send_headers()
            self._send_chunk(pending, client_ok)
        except OSError:
            self.close_connection = True
            self._log("ERROR", self.path, received)
        finally:
            if temp and os.path.exists(temp):
                os.unlink(temp)

    def _send_chunk(self, chunk: bytes, client_ok: bool) -> bool:
        if not chunk or not client_ok or self.command == "HEAD":
            return client_ok
        try:
            self.wfile.write(chunk)
            return True
        except OSError:
            return False  # keep filling the cache for the next client

    def _serve_file(self, target: str, outcome: str, url: str) -> None:
        meta = _read_meta(target)
        try:
            handle = open(target, "rb")  # pylint: disable=consider-using-with
        except OSError:
            self._error(500, "cache read failed")
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", meta.get("content_type") or "application/octet-stream")
            self.send_header("Content-Length", str(size))
            last_modified = meta.get("last_modified") or email.utils.formatdate(os.path.getmtime(target), usegmt=True)
            self.send_header("Last-Modified", last_modified)
            self.send_header("X-Cache", outcome)
            self._log(outcome, url, size)
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(handle, self.wfile, CHUNK)


def _meta_path(target: str) -> str:
    return os.path.join(os.path.dirname(target), ".fk-meta", os.path.basename(target) + ".json")


def _read_meta(target: str) -> dict:
    try:
        with open(_meta_path(target), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _write_meta(target: str, meta: dict) -> None:
    path = _meta_path(target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".fk-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    os.replace(temp, path)


class AptProxy:
    """The proxy as a thread in the calling process."""

    def __init__(self, cache_root: str, host: str = "127.0.0.1", port: int = 0,
                 allowed_hosts=DEFAULT_ALLOWED_HOSTS, index_ttl: float = 3600.0,
                 access_log: str | None = None, upstream_timeout: float = 60.0, upstreams=None):
        self.server = ThreadingHTTPServer((host, port), AptProxyHandler)
        self.server.daemon_threads = True
        self.server.cache_root = cache_root
        self.server.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self.server.index_ttl = index_ttl
        self.server.access_log = access_log
        self.server.log_lock = threading.Lock()
        self.server.stats = CacheStats()
        self.server.upstream_timeout = upstream_timeout
        # host -> (address, port) to connect to instead of host:80 (tests use a local archive)
        self.server.upstreams = dict(upstreams or {})
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="aptproxy", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.port}"

    @property
    def stats(self) -> dict:
        return dict(self.server.stats.counts)

    def start(self) -> "AptProxy":
        os.makedirs(self.server.cache_root, exist_ok=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    from lab.hosts import paths  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(description="Caching HTTP proxy for Debian's archive")
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3142)
    parser.add_argument("--cache", default=paths.apt_cache_dir())
    parser.add_argument("--index-ttl", type=float, default=3600.0)
    args = parser.parse_args(argv)
    proxy = AptProxy(args.cache, args.listen, args.port, index_ttl=args.index_ttl).start()
    print(f"serving {proxy.url}, cache {args.cache}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(120)
    sys.exit(main())
