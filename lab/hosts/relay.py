# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""TCP relays from test networks to services on the controller's loopback.

A listening socket keeps the network namespace it was created in. So the relay
enters a switch namespace (``setns(2)``, this thread only), opens a socket on
the network's gateway address there, and comes back; connections accepted on it
are then forwarded by connecting out from the root namespace to
``127.0.0.1:<target>``. Hosts on a private network thus reach exactly the
relayed ports (apt proxy, AWS endpoint), like a VPC endpoint, while nothing in
the root namespace routes to them and no forwarding or NAT is switched on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading

BUFFER = 64 * 1024
CLONE_NEWNET = 0x40000000


def setns_net(fd: int) -> None:
    """Move this thread into the network namespace ``fd`` refers to (os.setns before Python 3.12)."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def in_netns(name: str | None):
    """Run the body with this thread in network namespace ``name`` (``/run/netns/NAME``)."""
    if not name:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        setns_net(target)
        try:
            yield
        finally:
            setns_net(own)
    finally:
        os.close(target)
        os.close(own)


def listen(address: str, port: int, netns: str | None = None) -> socket.socket:
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            sock.close()
            raise
        sock.listen(64)
    return sock


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(BUFFER)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class Relay:
    """Accept on ``sock`` and forward every connection to ``target_host:target_port``."""

    def __init__(self, sock: socket.socket, target_port: int, target_host: str = "127.0.0.1", name: str = "relay"):
        self.sock = sock
        self.target = (target_host, target_port)
        self.name = name
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)

    def start(self) -> "Relay":
        self.thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _address = self.sock.accept()
            except OSError:
                if self.stopped.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(client,), name=f"{self.name}-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        client.settimeout(None)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
