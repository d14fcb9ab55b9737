# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The apt caching proxy and the TCP relay, against a fake archive on loopback."""

from __future__ import annotations

import email.utils
import http.client
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lab.hosts.aptproxy import AptProxy
from lab.hosts.relay import Relay, listen

ARCHIVE = "deb.debian.org"


class FakeArchive:
    """A tiny deb.debian.org: fixed files, counted requests, switchable availability."""

    def __init__(self):
        self.files = {
            "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb": os.urandom(300_000),
            "/debian/dists/bookworm/InRelease": b"Origin: Debian\n",
        }
        self.last_modified = email.utils.formatdate(time.time() - 3600, usegmt=True)
        self.requests = []
        self.down = False
        archive = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                archive.requests.append((self.path, self.headers.get("If-Modified-Since")))
                if archive.down:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = archive.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("If-Modified-Since") == archive.last_modified:
                    self.send_response(304)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", archive.last_modified)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self):
        return self.server.server_address

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def archive():
    fake = FakeArchive()
    yield fake
    fake.close()


@pytest.fixture
def proxy(tmp_path, archive):
    with AptProxy(str(tmp_path / "cache"), upstreams={ARCHIVE: archive.address}, index_ttl=3600,
                  access_log=str(tmp_path / "access.log")) as running:
        yield running


def get(proxy, url, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request(method, url)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, response.getheader("X-Cache"), body


DEB = f"http://{ARCHIVE}/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
INRELEASE = f"http://{ARCHIVE}/debian/dists/bookworm/InRelease"


def test_packages_are_fetched_once_then_served_from_the_cache(proxy, archive):
    first = get(proxy, DEB)
    second = get(proxy, DEB)
    assert first[:2] == (200, "MISS") and second[:2] == (200, "HIT")
    assert first[2] == second[2] == archive.files["/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"]
    assert len(archive.requests) == 1
    assert proxy.stats == {"MISS": 1, "HIT": 1}


def test_a_second_proxy_on_the_same_cache_hits(tmp_path, proxy, archive):
    get(proxy, DEB)
    with AptProxy(str(tmp_path / "cache"), upstreams={ARCHIVE: archive.address}) as other:
        assert get(other, DEB)[1] == "HIT"
    assert len(archive.requests) == 1


def test_index_files_are_revalidated_after_their_ttl_and_served_stale_when_the_archive_fails(proxy, archive):
    assert get(proxy, INRELEASE)[1] == "MISS"
    assert get(proxy, INRELEASE)[1] == "HIT"  # within the TTL
    proxy.server.index_ttl = 0
    status, outcome, body = get(proxy, INRELEASE)
    assert (status, outcome, body) == (200, "REVALIDATED", b"Origin: Debian\n")
    assert archive.requests[-1] == ("/debian/dists/bookworm/InRelease", archive.last_modified)
    archive.files["/debian/dists/bookworm/InRelease"] = b"Origin: Debian\nChanged: yes\n"
    archive.last_modified = email.utils.formatdate(time.time(), usegmt=True)
    assert get(proxy, INRELEASE)[1:] == ("REFRESHED", b"Origin: Debian\nChanged: yes\n")
    archive.down = True
    assert get(proxy, INRELEASE)[1:] == ("STALE", b"Origin: Debian\nChanged: yes\n")


def test_head_and_missing_files(proxy):
    assert get(proxy, DEB, "HEAD")[:2] == (200, "MISS")
    assert get(proxy, DEB, "HEAD")[:2] == (200, "HIT")
    assert get(proxy, f"http://{ARCHIVE}/debian/pool/nope.deb")[0] == 404


def test_only_the_archive_over_plain_http_is_proxied(proxy):
    assert get(proxy, "http://example.com/")[0] == 403
    assert get(proxy, f"http://{ARCHIVE}:8080/debian/x")[0] == 403
    assert get(proxy, "/relative")[0] == 400
    assert get(proxy, f"{ARCHIVE}:443", "CONNECT")[0] == 403


def test_the_access_log_records_each_answer(tmp_path, proxy):
    get(proxy, DEB)
    get(proxy, DEB)
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["MISS", "HIT"]


def test_relay_forwards_both_ways_and_closes_cleanly():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo():
        conn, _address = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    threading.Thread(target=echo, daemon=True).start()
    relay = Relay(listen("127.0.0.1", 0), server.getsockname()[1]).start()
    try:
        with socket.create_connection(relay.sock.getsockname(), timeout=10) as client:
            payload = b"x" * 200_000
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := client.recv(65536):
                received += chunk
        assert received == payload.upper()
    finally:
        relay.stop()
        server.close()


def test_relay_to_a_closed_port_closes_the_client():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    relay = Relay(listen("127.0.0.1", 0), port).start()
    try:
        with socket.create_connection(relay.sock.getsockname(), timeout=10) as client:
            assert client.recv(10) == b""
    finally:
        relay.stop()
