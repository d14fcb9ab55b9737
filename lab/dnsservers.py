# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Real DNS servers (BIND 9, unbound, dnsmasq) for tests and the dns_cache benchmark.

Nothing here installs a service on the controller. The servers' Debian packages
are fetched with ``apt-get download`` and unpacked with ``dpkg -x`` under
``$FK_CACHE/dns-servers`` (default /var/cache/fleetkeeper), so a fresh machine
does the same on first use. Servers run only inside network namespaces made
here (``ip netns add fk-dns-...``) and bound to loopback or to a veth pair
between two such namespaces; every namespace is deleted when its owner closes.

Needs root (network namespaces), ``ip`` and ``apt-get``.

BIND 9.20 (Debian's bookworm-backports build) is unpacked the same way into a
root of its own (``$FK_CACHE/dns-servers/bind-backports``): apt reads the
backports suite through a private sources list and package lists under
``$FK_CACHE/apt-backports``, so this machine's apt configuration and its
installed packages are never touched. The backports build links against
bookworm's libraries, so only ``liburcu8`` (not on the controller) is added
from bookworm itself.

    python -m lab.dnsservers fetch     # download and unpack the servers
    python -m lab.dnsservers fetch-backports   # BIND 9.20 from bookworm-backports
"""

from __future__ import annotations

import fcntl
import glob
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CACHE = os.environ.get("FK_CACHE", "/var/cache/fleetkeeper")
SERVER_ROOT = os.path.join(CACHE, "dns-servers", "root")
DEB_DIR = os.path.join(CACHE, "debs", "dns-servers")
# Server packages plus the libraries they need that the controller's own
# packages (bind9-utils pulls bind9-libs) do not bring.
PACKAGES = ("bind9", "unbound", "dnsmasq-base", "libnetfilter-conntrack3", "libnfnetlink0")
# BIND from bookworm-backports (9.20), beside the bookworm packages above.
BPO_ROOT = os.path.join(CACHE, "dns-servers", "bind-backports")
BPO_SUITE = "bookworm-backports"
BPO_PACKAGES = ("bind9", "bind9-libs", "bind9-utils")
# From bookworm itself: what the backports build needs that the controller lacks.
BPO_EXTRA_PACKAGES = ("liburcu8",)
BPO_APT_DIR = os.path.join(CACHE, "apt-backports")

_counter = itertools.count()


class DnsServerError(RuntimeError):
    pass


def _stamp() -> str:
    return " ".join(PACKAGES)


def fetch_servers(force: bool = False) -> str:
    """Download and unpack the server packages once; return the unpacked root.

    Serialised with a lock file, so parallel test workers never unpack over each other.
    """
    os.makedirs(os.path.dirname(SERVER_ROOT), exist_ok=True)
    with open(os.path.join(os.path.dirname(SERVER_ROOT), ".lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_servers(force)


def _fetch_servers(force: bool) -> str:
    stamp_path = os.path.join(SERVER_ROOT, ".fk-stamp")
    if not force and os.path.exists(stamp_path):
        with open(stamp_path, encoding="utf-8") as handle:
            if handle.read().strip() == _stamp():
                return SERVER_ROOT
    os.makedirs(DEB_DIR, exist_ok=True)
    os.chmod(DEB_DIR, 0o755)
    proc = subprocess.run(["apt-get", "download", *PACKAGES], cwd=DEB_DIR, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise DnsServerError("apt-get download %s failed (run apt-get update first?):\n%s"
                             % (" ".join(PACKAGES), proc.stderr))
    shutil.rmtree(SERVER_ROOT, ignore_errors=True)
    os.makedirs(SERVER_ROOT)
    for package in PACKAGES:
        debs = sorted(glob.glob(os.path.join(DEB_DIR, package + "_*.deb")), key=os.path.getmtime)
        if not debs:
            raise DnsServerError("no .deb for %s in %s" % (package, DEB_DIR))
        subprocess.run(["dpkg", "-x", debs[-1], SERVER_ROOT], check=True)
    for binary in ("named", "unbound", "dnsmasq"):
        ldd = subprocess.run(["ldd", binary_path(binary)], capture_output=True, text=True, check=False,
                             env=server_env())
        if "not found" in ldd.stdout:
            raise DnsServerError("%s misses libraries:\n%s" % (binary, ldd.stdout))
    with open(stamp_path, "w", encoding="utf-8") as handle:
        handle.write(_stamp() + "\n")
    return SERVER_ROOT


def _private_apt_options() -> list:
    """apt options that read only BPO_SUITE, with lists and caches under BPO_APT_DIR."""
    etc = os.path.join(BPO_APT_DIR, "etc")
    for sub in ("etc", "lists/partial", "cache/archives/partial"):
        os.makedirs(os.path.join(BPO_APT_DIR, sub), exist_ok=True)
    sources = os.path.join(etc, "sources.list")
    with open(sources, "w", encoding="utf-8") as handle:
        handle.write("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                     "http://deb.debian.org/debian %s main\n" % BPO_SUITE)
    return ["-o", "Dir::Etc::sourcelist=" + sources, "-o", "Dir::Etc::sourceparts=/dev/null",
            "-o", "Dir::State::lists=" + os.path.join(BPO_APT_DIR, "lists"),
            "-o", "Dir::Cache=" + os.path.join(BPO_APT_DIR, "cache")]


def fetch_bind_backports(force: bool = False) -> str:
    """Download and unpack BIND from bookworm-backports once; return its root (see the module docstring)."""
    os.makedirs(os.path.dirname(BPO_ROOT), exist_ok=True)
    with open(os.path.join(os.path.dirname(BPO_ROOT), ".lock-backports"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = " ".join(BPO_PACKAGES + BPO_EXTRA_PACKAGES) + " " + BPO_SUITE
        stamp_path = os.path.join(BPO_ROOT, ".fk-stamp")
        if not force and os.path.exists(stamp_path):
            with open(stamp_path, encoding="utf-8") as handle:
                if handle.read().strip() == stamp:
                    return BPO_ROOT
        debs = os.path.join(BPO_APT_DIR, "debs")
        shutil.rmtree(debs, ignore_errors=True)
        os.makedirs(debs)
        os.chmod(debs, 0o755)
        options = _private_apt_options()
        steps = ((["apt-get", *options, "update"], None),
                 (["apt-get", *options, "download", *("%s/%s" % (p, BPO_SUITE) for p in BPO_PACKAGES)], debs),
                 (["apt-get", "download", *BPO_EXTRA_PACKAGES], debs))
        for argv, cwd in steps:
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise DnsServerError("%s failed:\n%s" % (" ".join(argv), proc.stderr))
        shutil.rmtree(BPO_ROOT, ignore_errors=True)
        os.makedirs(BPO_ROOT)
        for deb in sorted(glob.glob(os.path.join(debs, "*.deb"))):
            subprocess.run(["dpkg", "-x", deb, BPO_ROOT], check=True)
        ldd = subprocess.run(["ldd", binary_path("named", BPO_ROOT)], capture_output=True, text=True, check=False,
                             env=server_env(BPO_ROOT))
        if "not found" in ldd.stdout:
            raise DnsServerError("named from %s misses libraries:\n%s" % (BPO_SUITE, ldd.stdout))
        with open(stamp_path, "w", encoding="utf-8") as handle:
            handle.write(stamp + "\n")
        return BPO_ROOT


def binary_path(name: str, root: str = SERVER_ROOT) -> str:
    """A server binary in an unpacked root (SERVER_ROOT: bookworm's packages; BPO_ROOT: BIND 9.20)."""
    for sub in ("usr/sbin", "usr/bin"):
        path = os.path.join(root, sub, name)
        if os.path.exists(path):
            return path
    return os.path.join(root, "usr", "sbin", name)


def server_env(root: str = SERVER_ROOT) -> dict:
    env = dict(os.environ)
    lib_dir = os.path.join(root, "usr", "lib", "x86_64-linux-gnu")
    env["LD_LIBRARY_PATH"] = lib_dir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def named_version(root: str = SERVER_ROOT) -> str:
    out = subprocess.run([binary_path("named", root), "-v"], capture_output=True, text=True, check=True,
                         env=server_env(root)).stdout
    return out.split()[1]


def have_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


class Netns:
    """A network namespace with loopback up; deleted (with its processes) by close()."""

    def __init__(self, tag: str = "t"):
        self.name = "fk-dns-%s-%d-%d" % (tag, os.getpid(), next(_counter))
        self.procs: list = []
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except Exception:
            self.close()
            raise

    def cmd(self, argv: list) -> list:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        proc = subprocess.run(self.cmd(argv), check=False, **kwargs)
        if check and proc.returncode != 0:
            raise DnsServerError("%s in %s failed (%s):\n%s%s"
                                 % (" ".join(argv), self.name, proc.returncode, proc.stdout or "", proc.stderr or ""))
        return proc

    def popen(self, argv: list, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", server_env())
        proc = subprocess.Popen(self.cmd(argv), **kwargs)  # pylint: disable=consider-using-with
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc)
        self.procs = []
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def veth_link(left: Netns, right: Netns, left_addr: str, right_addr: str, prefix: int = 30) -> None:
    """Connect two namespaces with a veth pair (addresses exist only inside them)."""
    base = "fkd%d%d" % (os.getpid() % 100000, next(_counter))
    a, b = base + "a", base + "b"
    subprocess.run(["ip", "link", "add", a, "netns", left.name, "type", "veth", "peer", "name", b,
                    "netns", right.name], check=True)
    left.run(["ip", "addr", "add", "%s/%d" % (left_addr, prefix), "dev", a])
    right.run(["ip", "addr", "add", "%s/%d" % (right_addr, prefix), "dev", b])
    left.run(["ip", "link", "set", a, "up"])
    right.run(["ip", "link", "set", b, "up"])


def limit_udp53(ns: Netns, pps: int, burst: int, table: str = "vpcdns") -> None:
    """An nftables rule in ``ns`` that drops UDP/53 packets above ``pps`` a second (burst ``burst``), as EC2's
    per-interface limit on the VPC resolver does, with a counter before it and one on what it drops."""
    ns.run(["nft", "add table inet %s; "
                   "add chain inet %s input { type filter hook input priority 0; policy accept; }; "
                   "add rule inet %s input udp dport 53 counter; "
                   "add rule inet %s input udp dport 53 limit rate over %d/second burst %d packets counter drop"
            % (table, table, table, table, pps, burst)])


def limit_counters(ns: Netns, table: str = "vpcdns") -> tuple:
    """(packets that reached the limit, packets it dropped) so far, from limit_udp53's counters."""
    out = json.loads(ns.run(["nft", "-j", "list", "table", "inet", table]).stdout)
    counters = [expr["counter"]["packets"] for item in out["nftables"] if "rule" in item
                for expr in item["rule"]["expr"] if "counter" in expr]
    return counters[0], counters[1]


def wait_udp_dns(ns: Netns, server: str, port: int, name: str = "localhost.", timeout: float = 20) -> None:
    """Wait until a DNS server answers anything (even REFUSED) on server:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = ns.run(["dig", "+tries=1", "+time=1", "-p", str(port), "@" + server, name], check=False)
        if "status:" in proc.stdout:
            return
        time.sleep(0.2)
    raise DnsServerError("no DNS server answered on %s port %s in %s" % (server, port, ns.name))


def dig(ns: Netns, server: str, port: int, name: str, rtype: str = "A", extra: tuple = ()) -> str:
    """The status and answer section of one query, from inside ns."""
    proc = ns.run(["dig", "+tries=1", "+time=2", "-p", str(port), "@" + server, name, rtype, *extra],
                  check=False)
    return proc.stdout


def dig_status(output: str) -> str:
    for line in output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return "TIMEOUT"


def zone_text(origin: str, records: dict, ttl: int = 300, serial: int = 1) -> str:
    """A zone file: records maps a relative name to (ttl, address)."""
    lines = [
        "$ORIGIN %s" % origin,
        "$TTL %d" % ttl,
        "@ IN SOA ns.%s hostmaster.%s %d 3600 600 86400 60" % (origin, origin, serial),
        "@ IN NS ns.%s" % origin,
        "ns IN A 127.0.0.1",
    ]
    for name, (rttl, address) in sorted(records.items()):
        lines.append("%s %d IN A %s" % (name, rttl, address))
    return "\n".join(lines) + "\n"


class AuthServer:
    """BIND 9 as an authoritative-only server for one zone (the tests' stand-in upstream)."""

    def __init__(self, ns: Netns, address: str, zone: str, records: dict, port: int = 53,
                 workdir: str | None = None, threads: int = 1, wrapper: tuple = ()):
        self.ns, self.address, self.port, self.zone = ns, address, port, zone.rstrip(".") + "."
        self.dir = workdir or tempfile.mkdtemp(prefix="fk-dns-auth-")
        os.makedirs(self.dir, exist_ok=True)
        if address.startswith("127.") and address != "127.0.0.1":
            # BIND listens on interface addresses only: give lo this one too.
            ns.run(["ip", "addr", "add", address + "/32", "dev", "lo"])
        with open(os.path.join(self.dir, "zone.db"), "w", encoding="utf-8") as handle:
            handle.write(zone_text(self.zone, records))
        conf = os.path.join(self.dir, "named.conf")
        with open(conf, "w", encoding="utf-8") as handle:
            handle.write(
                'options {\n  directory "%s";\n  pid-file none;\n  listen-on port %d { %s; };\n'
                '  listen-on-v6 { none; };\n  recursion no;\n  allow-query { any; };\n'
                '  minimal-responses yes;\n  notify no;\n  dnssec-validation no;\n};\n'
                'controls { };\n'
                'statistics-channels { inet 127.0.0.1 port 8053 allow { any; }; };\n'
                'zone "%s" { type primary; file "%s/zone.db"; };\n'
                % (self.dir, port, address, self.zone, self.dir))
        # wrapper: a command prefix such as ("taskset", "-c", "1") (benchmarks pin processes to cores).
        self.proc = ns.popen([*wrapper, binary_path("named"), "-g", "-n", str(threads), "-c", conf],
                             stdout=open(os.path.join(self.dir, "named.log"), "w", encoding="utf-8"),  # noqa: SIM115
                             stderr=subprocess.STDOUT)
        wait_udp_dns(ns, address, port, "ns." + self.zone)

    def query_count(self) -> int:
        """Queries this server received (nsstat Requestv4 + Requestv6), from its JSON statistics."""
        raw = fetch_in_ns(self.ns, "http://127.0.0.1:8053/json/v1/server")
        nsstats = json.loads(raw).get("nsstats", {})
        return int(nsstats.get("Requestv4", 0)) + int(nsstats.get("Requestv6", 0))

    def stop(self) -> None:
        self.ns.stop(self.proc)


def fetch_in_ns(ns: Netns, url: str) -> str:
    """GET a URL from inside a namespace (python in the namespace; no curl needed)."""
    code = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    return ns.run([sys.executable, "-c", code, url]).stdout


def main(argv: list) -> int:
    if argv[:1] == ["fetch"]:
        print(fetch_servers(force="--force" in argv))
        print(named_version())
        return 0
    if argv[:1] == ["fetch-backports"]:
        root = fetch_bind_backports(force="--force" in argv)
        print(root)
        print(named_version(root))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["AuthServer", "BPO_ROOT", "DnsServerError", "Netns", "SERVER_ROOT", "binary_path", "dig", "dig_status",
           "fetch_bind_backports", "fetch_servers", "fetch_in_ns",
           "have_netns", "named_version", "server_env", "veth_link", "wait_udp_dns", "zone_text"]
