# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Create and destroy one run of test hosts.

A run is: one "switch" network namespace per test network (a bridge, plus the
gateway address on private networks), one network namespace per host joined to
its networks by veth pairs, one veth from the root namespace into the public
switch (carrying the public gateway address), an overlay of the cached image per
host booted with ``systemd-nspawn -b``, and one services process (apt proxy and
relays; see ``tests.hosts.services``), plus the AWS endpoint when asked for.

Everything is recorded in the run's state file *before* it is created, and
:func:`teardown` removes exactly what the state file names, so a failure at any
step, a killed job, or a crashed machine leaves nothing that the next create
cannot clean.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

import yaml

from tests.hosts import image as imagemod
from tests.hosts import paths
from tests.hosts import state as runstate
from tests.hosts import topology as topo
from tests.hosts.aptproxy import AptProxy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT_TIMEOUT = float(os.environ.get("FK_TESTHOSTS_BOOT_TIMEOUT", "120"))
OUTPUT_FILES = ("testhosts.yml", "inventory/testhosts_inventory.yml", "testhosts_run")


class LaunchError(RuntimeError):
    """Creating test hosts failed; everything created so far has been removed."""


def _log(message: str) -> None:
    print(f"[testhosts {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sh(*argv, check: bool = True, capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), text=True, capture_output=capture, check=False, **kwargs)
    if check and result.returncode != 0:
        raise LaunchError(f"`{' '.join(argv)}` failed ({result.returncode}): {(result.stderr or '').strip()}")
    return result


@contextlib.contextmanager
def runs_lock(cache: str | None = None):
    """Serialises allocation and clean-up between concurrent harness processes."""
    directory = paths.runs_dir(cache)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --- listing runs -------------------------------------------------------------------

def list_runs(cache: str | None = None) -> list:
    """(run id, state or None) for every run directory."""
    directory = paths.runs_dir(cache)
    result = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.startswith("."):
            continue
        try:
            topo.validate_run_id(name)
        except topo.TopologyError:
            continue
        try:
            result.append((name, runstate.load(os.path.join(directory, name, "state.json"))))
        except (OSError, ValueError):
            result.append((name, None))
    return result


def images_in_use(cache: str | None = None) -> set:
    used = set()
    for _run, st in list_runs(cache):
        if st:
            used |= {st["image"]} if st.get("image") else set()
            used |= set((st.get("images") or {}).values())
    return used


def _root_namespace_networks() -> list:
    """IPv4 networks the root namespace already routes or holds (never reuse those)."""
    found = []
    for argv in (["ip", "-j", "-4", "route", "show", "table", "all"], ["ip", "-j", "-4", "addr", "show"]):
        result = sh(*argv, check=False)
        try:
            data = json.loads(result.stdout or "[]")
        except ValueError:
            continue
        for item in data:
            if "dst" in item and item["dst"] not in ("default",):
                with contextlib.suppress(ValueError):
                    found.append(ipaddress.ip_network(item["dst"], strict=False))
            for info in item.get("addr_info", []):
                with contextlib.suppress(ValueError, KeyError):
                    found.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    return found


# --- teardown -------------------------------------------------------------------------

def _netns_inode(name: str):
    try:
        st = os.stat(f"/run/netns/{name}")
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st.st_ino else None


def _pids_in_netns(inodes: set) -> list:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            pids.append(int(entry))
    return pids


def _kill_referencing(text: str) -> None:
    """SIGTERM every process (but this one and its ancestors) whose command line contains ``text``."""
    spared = set()
    pid = os.getpid()
    while pid > 1:
        spared.add(pid)
        identity = _parent(pid)
        if identity is None:
            break
        pid = identity
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if needle not in handle.read():
                    continue
            os.kill(int(entry), signal.SIGTERM)
        except (OSError, ProcessLookupError):
            continue


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _stop_identity(identity, grace: float) -> None:
    """SIGTERM the process an identity names, SIGKILL it after ``grace`` seconds."""
    if not runstate.alive(identity):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(identity["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and runstate.alive(identity):
        time.sleep(0.1)
    if runstate.alive(identity):
        with contextlib.suppress(ProcessLookupError):
            os.kill(identity["pid"], signal.SIGKILL)


def _is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return any(line.split()[4] == real for line in handle)


def cgroup_bases() -> list:
    """The directories of this process's cgroups in the hierarchies systemd tracks
    processes with: the unified one (cgroup2 at /sys/fs/cgroup or, hybrid,
    /sys/fs/cgroup/unified) and the legacy ``name=systemd`` one, where mounted.

    systemd-nspawn --keep-unit runs a container in its caller's cgroup and moves
    the container into ``payload`` and itself into ``supervisor`` below it. Two
    containers started from the same cgroup would share those, and their
    systemds would remove each other's unit cgroups (units then fail with
    219/CGROUP). So each container is started from a cgroup of its own."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            lines = [line.rstrip("\n").split(":", 2) for line in handle if line.count(":") >= 2]
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return []
    found = []
    for controllers, fstype in (("", "cgroup2"), ("name=systemd", "cgroup")):
        path = next((p for _hid, c, p in lines if c == controllers), None)
        if path is None:
            continue
        for fields in mounts:
            sep = fields.index("-")
            if fields[sep + 1] != fstype:
                continue
            if fstype == "cgroup" and "name=systemd" not in fields[sep + 3].split(","):
                continue
            root, point = fields[3], fields[4]
            if not path.startswith(root):
                continue
            found.append(os.path.normpath(os.path.join(point, os.path.relpath(path, root))))
            break
    return found


def _remove_cgroup(path: str, timeout: float = 15.0) -> bool:
    """rmdir a cgroup and everything a container's systemd made below it (bottom-up).

    The cgroup is the run's own (named after the run id), so whatever is still in
    it belongs to the run: a process that left the network namespace, or one that
    was exiting while the first rmdir ran (EBUSY). Kill those and retry until the
    deadline instead of giving up after one pass."""
    deadline = time.monotonic() + timeout
    while os.path.isdir(path):
        for root, _dirs, _files in os.walk(path, topdown=False):
            with contextlib.suppress(OSError):
                with open(os.path.join(root, "cgroup.procs"), encoding="utf-8") as handle:
                    for pid in handle.read().split():
                        with contextlib.suppress(ProcessLookupError, ValueError):
                            os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.rmdir(root)
        if not os.path.isdir(path) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return not os.path.isdir(path)


def teardown(run_dir: str, st: dict, log=_log) -> list:
    """Remove everything ``st`` names. Best effort per item; returns the problems left."""
    problems = []
    st["phase"] = "destroying"
    st["destroyer"] = runstate.process_identity(os.getpid())
    state_path = os.path.join(run_dir, "state.json")
    if os.path.isdir(run_dir):
        runstate.save(state_path, st)

    # 1. The AWS endpoint and its moto child.
    aws = st.get("aws") or {}
    _stop_identity(aws.get("process"), 5)
    for child in aws.get("children", []):
        _stop_identity(child, 2)

    # 2. Containers: every process inside our namespaces, then the nspawn processes.
    inodes = {i for i in (_netns_inode(n) for n in st.get("namespaces", [])) if i}
    deadline = time.monotonic() + 20
    while inodes:
        pids = _pids_in_netns(inodes)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            problems.append(f"processes {pids} in the run's namespaces would not die")
            break
        time.sleep(0.2)
    # Anything else started for the run names its directory on its command line:
    # ssh ControlMaster and ProxyCommand processes, a half-started nspawn.
    for spelling in sorted({os.path.abspath(run_dir), os.path.realpath(run_dir)}):
        _kill_referencing(spelling + "/")
    for host in st.get("hosts", {}).values():
        _stop_identity(host.get("nspawn"), 10)
        if runstate.alive(host.get("nspawn")):
            problems.append(f"systemd-nspawn {host['nspawn']['pid']} still running")

    # 3. The services process (apt proxy, relays).
    _stop_identity(st.get("daemon"), 5)

    # 4. Overlay mounts.
    for mount in reversed(st.get("mounts", [])):
        if os.path.exists(mount) and _is_mounted(mount):
            if sh("umount", mount, check=False).returncode != 0:
                time.sleep(1)
                if sh("umount", mount, check=False).returncode != 0:
                    sh("umount", "-l", mount, check=False)
            if _is_mounted(mount):
                problems.append(f"{mount} is still mounted")

    # 5. Namespaces (their veths go with them) and the root-namespace veths, by name.
    for name in st.get("namespaces", []):
        if os.path.exists(f"/run/netns/{name}"):
            result = sh("ip", "netns", "delete", name, check=False)
            if result.returncode != 0:
                problems.append(f"ip netns delete {name}: {result.stderr.strip()}")
    for link in st.get("root_links", []):
        if os.path.exists(f"/sys/class/net/{link}"):
            result = sh("ip", "link", "delete", link, check=False)
            # Deleting the switch namespace removes the peer, and with it this end, asynchronously.
            if result.returncode != 0 and os.path.exists(f"/sys/class/net/{link}"):
                problems.append(f"ip link delete {link}: {result.stderr.strip()}")
    for cgroup in st.get("cgroups", []):
        if not _remove_cgroup(cgroup):
            problems.append(f"cgroup {cgroup} could not be removed")
    for machine in st.get("machines", []):
        propagate = f"/run/systemd/nspawn/propagate/{machine}"
        if os.path.isdir(propagate):
            shutil.rmtree(propagate, ignore_errors=True)

    # 6. The run directory, unless something is still mounted below it.
    if problems:
        st["problems"] = problems
        if os.path.isdir(run_dir):
            runstate.save(state_path, st)
        return problems
    real = os.path.realpath(run_dir)
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        below = [line.split()[4] for line in handle if line.split()[4].startswith(real + "/")]
    if below:
        problems.append(f"mounts left below {run_dir}: {below}")
        return problems
    shutil.rmtree(run_dir, ignore_errors=True)
    return problems


def destroy_run(run_id: str, cache: str | None = None, reason: str = "destroy", log=_log) -> list:
    run_dir = paths.run_dir(topo.validate_run_id(run_id), cache)
    with runs_lock(cache):
        try:
            st = runstate.load(os.path.join(run_dir, "state.json"))
        except (OSError, ValueError):
            if os.path.isdir(run_dir):
                log(f"run {run_id}: no readable state file; nothing to remove but its directory")
                _remove_dir_without_mounts(run_dir)
            return []
        started = time.monotonic()
        problems = teardown(run_dir, st, log)
    log(f"run {run_id} destroyed ({reason}) in {time.monotonic() - started:.1f}s"
        + (f"; problems: {problems}" if problems else ""))
    return problems


def _remove_dir_without_mounts(run_dir: str) -> None:
    real = os.path.realpath(run_dir)
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        if any(line.split()[4].startswith(real + "/") for line in handle):
            return
    shutil.rmtree(run_dir, ignore_errors=True)


def cleanup_stale_locked(cache: str | None = None, log=_log, everything: bool = False) -> list:
    """Destroy every run whose owner is gone (or every run with ``everything``).
    The caller holds :func:`runs_lock`."""
    cleaned = []
    for run_id, st in list_runs(cache):
        run_dir = paths.run_dir(run_id, cache)
        if st is None:
            # A directory without a state file: a create that died in its first
            # instant, before it made anything. Old enough -> remove.
            with contextlib.suppress(OSError):
                if everything or time.time() - os.path.getmtime(run_dir) > 600:
                    _remove_dir_without_mounts(run_dir)
            continue
        reason = "cleanup --all" if everything else runstate.staleness(st)
        if reason is None:
            continue
        log(f"cleaning stale run {run_id} (scenario {st.get('scenario')}): {reason}")
        problems = teardown(run_dir, st, log)
        cleaned.append((run_id, reason, problems))
    return cleaned


def cleanup_stale(cache: str | None = None, log=_log, everything: bool = False) -> list:
    with runs_lock(cache):
        return cleanup_stale_locked(cache, log, everything)


# --- create ---------------------------------------------------------------------------

class Run:
    def __init__(self, run_id: str, cache: str | None):
        self.run_id = run_id
        self.cache = cache
        self.dir = paths.run_dir(run_id, cache)
        self.state_path = os.path.join(self.dir, "state.json")
        self.state: dict = {}
        self.popen: list = []

    def save(self) -> None:
        runstate.save(self.state_path, self.state)

    def record(self, key: str, value) -> None:
        """Append ``value`` to the list ``key`` and save, before the thing is made."""
        self.state.setdefault(key, []).append(value)
        self.save()

    def path(self, *parts) -> str:
        return os.path.join(self.dir, *parts)


def _new_run_id(cache: str | None) -> str:
    while True:
        run_id = secrets.token_hex(3)
        if os.path.exists(paths.run_dir(run_id, cache)):
            continue
        if any(n.startswith(f"fk-{run_id}-") for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])):
            continue
        return run_id


def _allocate(platforms, scenario: str, ephemeral_dir: str, cache: str | None, log, owner=None) -> tuple:
    topo.build_topology(platforms, "000000", "10.213.0.0/%d" % topo.platforms_public_prefix(platforms))
    with runs_lock(cache):
        cleanup_stale_locked(cache, log)
        run_id = _new_run_id(cache)
        used = _root_namespace_networks()
        for _run, st in list_runs(cache):
            if st and st.get("public_subnet"):
                used.append(ipaddress.ip_network(st["public_subnet"]))
        prefix = topo.platforms_public_prefix(platforms)
        subnet = topo.choose_public_subnet(run_id, used, prefixlen=prefix)
        topology = topo.build_topology(platforms, run_id, subnet)
        run = Run(run_id, cache)
        os.makedirs(run.dir, mode=0o700)
        run.state = {
            "run_id": run_id, "phase": "creating", "scenario": scenario, "ephemeral_dir": ephemeral_dir,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "creator": runstate.process_identity(os.getpid()), "owner": owner or runstate.find_molecule_owner(),
            "public_subnet": str(subnet) if topo.PUBLIC in topology.networks else None,
            "namespaces": [], "root_links": [], "mounts": [], "machines": [], "cgroups": [], "hosts": {},
            "timings": {},
        }
        run.save()
    return run, topology


def _build_networks(run: Run, topology: topo.Topology) -> None:
    for name, net in topology.networks.items():
        ns = topology.switch_ns(name)
        run.record("namespaces", ns)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        # The gateway lives on the bridge, in a namespace that forwards nothing;
        # a host's default route therefore never leads anywhere.
        sh("ip", "-n", ns, "addr", "add", f"{net.gateway}/{net.prefixlen}", "dev", "br0")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        if net.public:
            link = topology.root_link(name)
            run.record("root_links", link)
            sh("ip", "link", "add", link, "type", "veth", "peer", "name", "up0", "netns", ns)
            sh("ip", "-n", ns, "link", "set", "up0", "master", "br0", "up")
            sh("ip", "addr", "add", f"{net.controller_address}/{net.prefixlen}", "dev", link)
            sh("ip", "link", "set", link, "up")
    for name, host in topology.hosts.items():
        ns = topology.host_ns(name)
        run.record("namespaces", ns)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        for index, attachment in enumerate(host.attachments):
            switch = topology.switch_ns(attachment.network)
            port = topology.switch_port(host, index)
            net = topology.networks[attachment.network]
            sh("ip", "-n", ns, "link", "add", attachment.ifname, "type", "veth", "peer", "name", port,
               "netns", switch)
            sh("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{attachment.address}/{net.prefixlen}", "dev", attachment.ifname)
            sh("ip", "-n", ns, "link", "set", attachment.ifname, "up")
        first = topology.networks[host.first_network]
        sh("ip", "-n", ns, "route", "add", "default", "via", str(first.gateway))


def _wait_for_file(path: str, process: subprocess.Popen, timeout: float, what: str, failed: str | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        if failed and os.path.exists(failed):
            with open(failed, encoding="utf-8") as handle:
                raise LaunchError(f"{what} failed: {handle.read().strip()}")
        if process.poll() is not None:
            raise LaunchError(f"{what} exited with {process.returncode} before it was ready")
        time.sleep(0.1)
    raise LaunchError(f"{what} not ready within {timeout:.0f}s")


def _spawn(run: Run, argv, log_name: str, env=None) -> subprocess.Popen:
    with open(run.path(log_name), "ab") as log:
        process = subprocess.Popen(  # pylint: disable=consider-using-with
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            start_new_session=True, env=env)
    run.popen.append(process)
    return process


def _start_aws(run: Run) -> str:
    run.state["aws"] = {"process": None, "children": []}
    process = _spawn(run, [sys.executable, os.path.join(REPO_ROOT, "tests", "support", "awsemu.py"),
                           "--state-file", run.path("aws.json")], "aws.log")
    run.state["aws"]["process"] = runstate.process_identity(process.pid)
    run.save()
    info = _wait_for_file(run.path("aws.json"), process, 60, "the AWS endpoint (tests/support/awsemu.py)")
    children = []
    with contextlib.suppress(OSError):
        with open(f"/proc/{process.pid}/task/{process.pid}/children", encoding="utf-8") as handle:
            children = [runstate.process_identity(int(p)) for p in handle.read().split()]
    run.state["aws"]["children"] = [c for c in children if c]
    run.state["aws"]["endpoint_url"] = info["endpoint_url"]
    run.save()
    return info["endpoint_url"]


def _start_services(run: Run, topology: topo.Topology, aws_url: str | None) -> dict:
    listeners = []
    targets = {}
    if aws_url:
        targets["aws"] = int(aws_url.rsplit(":", 1)[1].split("/")[0])
    for name, net in topology.networks.items():
        netns = topology.switch_ns(name)
        listeners.append({"netns": netns, "address": str(net.gateway), "port": topo.APT_PROXY_PORT, "target": "apt"})
        if aws_url:
            listeners.append({"netns": netns, "address": str(net.gateway), "port": topo.AWS_ENDPOINT_PORT,
                              "target": "aws"})
    spec = {"run_id": run.run_id, "apt_cache": paths.apt_cache_dir(run.cache), "listeners": listeners,
            "targets": targets, "owner": run.state.get("owner"), "repo_root": REPO_ROOT,
            "index_ttl": float(os.environ.get("FK_APT_INDEX_TTL", "3600"))}
    with open(run.path("services.json"), "w", encoding="utf-8") as handle:
        json.dump(spec, handle, indent=2)
    process = _spawn(run, [sys.executable, "-m", "tests.hosts.services", run.dir], "services.log")
    run.state["daemon"] = runstate.process_identity(process.pid)
    run.save()
    return _wait_for_file(run.path("services.ready"), process, 30, "the services process (apt proxy, relays)",
                          failed=run.path("services.failed"))


def _write(path: str, text: str, mode: int = 0o644) -> None:
    if os.path.islink(path):
        os.unlink(path)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)


def _prepare_host(run: Run, topology: topo.Topology, name: str, image: str, public_key: str) -> list:
    """Overlay the image and write what the host needs before it boots; returns its host keys."""
    host_dir = run.path("hosts", name)
    upper, work, root = (os.path.join(host_dir, d) for d in ("upper", "work", "root"))
    for directory in (upper, work, root):
        os.makedirs(directory)
    run.record("mounts", root)
    sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={image},upperdir={upper},workdir={work}", root)
    service = topology.service_address(name)
    _write(os.path.join(root, "etc/hostname"), f"{name}\n")
    _write(os.path.join(root, "etc/hosts"), topology.etc_hosts(name))
    _write(os.path.join(root, "etc/resolv.conf"),
           f"# written by the fleetkeeper test-host harness (docs/testhosts.md)\nnameserver {service}\n"
           "options timeout:1 attempts:1\n")
    _write(os.path.join(root, "etc/apt/apt.conf.d/01fleetkeeper-proxy"),
           f'Acquire::http::Proxy "http://{service}:{topo.APT_PROXY_PORT}";\nAcquire::https::Proxy "DIRECT";\n')
    ssh_dir = os.path.join(root, "root/.ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    _write(os.path.join(ssh_dir, "authorized_keys"), public_key, 0o600)
    sh("ssh-keygen", "-A", "-f", root)
    keys = []
    for key_type in ("ed25519", "ecdsa", "rsa"):
        with open(os.path.join(root, f"etc/ssh/ssh_host_{key_type}_key.pub"), encoding="utf-8") as handle:
            keys.append(" ".join(handle.read().split()[:2]))
    return keys


def _boot_host(run: Run, topology: topo.Topology, name: str) -> None:
    machine = f"fk-{run.run_id}-{name}"[:64]
    run.record("machines", machine)
    root = run.path("hosts", name, "root")
    argv = ["systemd-nspawn", "--boot", f"--directory={root}", f"--machine={machine}", f"--hostname={name}",
            "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{topology.host_ns(name)}",
            "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--settings=no", "--console=read-only"]
    env = None
    if topology.hosts[name].net_admin:
        # The host configures its own interfaces (NetworkManager, dhclient): only
        # inside its own network namespace, which holds nothing but its veths.
        argv.insert(-1, "--capability=CAP_NET_ADMIN")
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
    cgroups = [os.path.join(base, f"fleetkeeper-{run.run_id}-{name}") for base in cgroup_bases()]
    for cgroup in cgroups:
        run.record("cgroups", cgroup)
        os.mkdir(cgroup)
    if cgroups:
        # Enter the cgroups, then become systemd-nspawn (same PID, same start time).
        script = " && ".join(f'echo $$ > "${i + 1}/cgroup.procs"' for i in range(len(cgroups)))
        argv = ["sh", "-c", f'{script} && shift {len(cgroups)} && exec "$@"', "sh", *cgroups, *argv]
    process = _spawn(run, argv, f"hosts/{name}/console.log", env=env)
    run.state["hosts"][name]["nspawn"] = runstate.process_identity(process.pid)
    run.save()


def _wait_for_host(run: Run, topology: topo.Topology, name: str, key: str, known_hosts: str) -> None:
    """sshd answers with the expected host key and systemd reports the system up."""
    ns = topology.host_ns(name)
    address = str(topology.hosts[name].attachments[0].address)
    argv = ["ip", "netns", "exec", ns, "ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR", f"root@{address}",
            "systemctl is-system-running --wait; echo; systemctl --failed --no-legend --plain"]
    deadline = time.monotonic() + BOOT_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        nspawn = run.state["hosts"][name].get("nspawn")
        if not runstate.alive(nspawn):
            raise LaunchError(f"host {name}: systemd-nspawn exited; see {run.path('hosts', name, 'console.log')}")
        result = sh(*argv, check=False, timeout=BOOT_TIMEOUT)
        status = (result.stdout or "").strip().splitlines()
        if result.returncode != 255 and status:
            if status[0] == "running":
                return
            units = [line.split()[0] for line in status[1:] if line.strip()]
            detail = sh(*argv[:-1], "systemctl status --no-pager -l -n 20 " + " ".join(units), check=False,
                        timeout=30).stdout
            raise LaunchError(f"host {name}: systemd is {status[0]!r}; failed units: {' '.join(units) or 'none'}\n"
                              f"{detail}")
        last = (result.stderr or "").strip()
        time.sleep(0.3)
    raise LaunchError(f"host {name}: no ssh login within {BOOT_TIMEOUT:.0f}s ({last})")


def _parallel(function, items) -> None:
    errors = []

    def call(item):
        try:
            function(item)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _write_outputs(run: Run, topology: topo.Topology, ephemeral_dir: str, instance_config_path: str | None,
                   aws_url: str | None) -> dict:
    key, known_hosts, ssh_config = run.path("id_ed25519"), run.path("known_hosts"), run.path("ssh_config")
    _write(ssh_config, topo.ssh_config(topology, key, known_hosts))
    variables = topo.testhosts_vars(topology, key, known_hosts, ssh_config, aws_url)
    variables["testhosts_timings"] = run.state["timings"]
    os.makedirs(os.path.join(ephemeral_dir, "inventory"), exist_ok=True)
    header = "# Written by tests/hosts (docs/testhosts.md); removed by destroy.\n"
    _write(os.path.join(ephemeral_dir, "testhosts.yml"),
           header + yaml.safe_dump(variables, default_flow_style=False, sort_keys=True))
    _write(os.path.join(ephemeral_dir, "inventory", "testhosts_inventory.yml"),
           header + yaml.safe_dump(topo.inventory(topology, key, known_hosts, run.path("cp")),
                                   default_flow_style=False))
    _write(os.path.join(ephemeral_dir, "testhosts_run"), run.run_id + "\n")
    if instance_config_path:
        _write(instance_config_path, yaml.safe_dump(topo.instance_config(topology, key), default_flow_style=False))
    return variables


def create(platforms, ephemeral_dir: str, instance_config_path: str | None = None, scenario: str = "",
           aws_endpoint: bool = False, cache: str | None = None, log=_log, owner=None) -> dict:
    """Create a run for ``platforms``; returns the variables written to testhosts.yml.

    ``aws_endpoint`` is True to start the AWS endpoint for this run, or the URL of
    one already running on the controller (the demo's) to relay to the hosts.
    ``owner`` (``{pid, start, command}``) is the process whose end makes the run
    stale when its command is ``test``; by default the ``molecule`` process this
    runs under, if any."""
    started = time.monotonic()
    ephemeral_dir = os.path.abspath(ephemeral_dir)
    run, topology = _allocate(platforms, scenario, ephemeral_dir, cache, log, owner)
    log(f"run {run.run_id}: {len(topology.hosts)} hosts on {', '.join(topology.networks)} "
        f"(public {run.state['public_subnet']})")

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    timings = run.state["timings"]
    try:
        mark = time.monotonic()
        images = {}  # one image per Debian release the platforms name
        for release in sorted({h.release for h in topology.hosts.values()}):
            images[release] = imagemod.image_dir(cache, release)
            if not imagemod.is_complete(images[release]):
                with AptProxy(paths.apt_cache_dir(cache)) as proxy:
                    images[release] = imagemod.ensure_image(cache, proxy_url=proxy.url, log=log, release=release)
        run.state["images"] = images
        timings["image"] = round(time.monotonic() - mark, 1)

        mark = time.monotonic()
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fleetkeeper-testhosts-{run.run_id}",
           "-f", run.path("id_ed25519"))
        with open(run.path("id_ed25519.pub"), encoding="utf-8") as handle:
            public_key = handle.read()
        _build_networks(run, topology)
        if isinstance(aws_endpoint, str):
            aws_url = aws_endpoint
        else:
            aws_url = _start_aws(run) if aws_endpoint else None
        _start_services(run, topology, aws_url)
        timings["network_and_services"] = round(time.monotonic() - mark, 1)

        mark = time.monotonic()
        host_keys = {}
        for name in topology.hosts:
            run.state["hosts"][name] = {"namespace": topology.host_ns(name)}
            host_keys[name] = _prepare_host(run, topology, name, images[topology.hosts[name].release], public_key)
        run.save()
        _write(run.path("known_hosts"), topo.known_hosts_lines(topology, host_keys))
        for name in topology.hosts:
            _boot_host(run, topology, name)
        _parallel(lambda n: _wait_for_host(run, topology, n, run.path("id_ed25519"), run.path("known_hosts")),
                  list(topology.hosts))
        timings["boot"] = round(time.monotonic() - mark, 1)
        timings["total"] = round(time.monotonic() - started, 1)
        run.state["phase"] = "ready"
        run.save()
        variables = _write_outputs(run, topology, ephemeral_dir, instance_config_path, aws_url)
    except BaseException as exc:
        if os.environ.get("FK_TESTHOSTS_KEEP_FAILED") == "1":
            # Left for inspection; stale as soon as this process exits.
            run.state["phase"] = "creating"
            run.save()
            log(f"run {run.run_id}: create failed ({type(exc).__name__}: {exc}); kept in {run.dir} "
                "(FK_TESTHOSTS_KEEP_FAILED=1): `python -m tests.hosts cleanup` removes it")
            raise
        log(f"run {run.run_id}: create failed ({type(exc).__name__}: {exc}); removing what was made")
        with runs_lock(cache):
            problems = teardown(run.dir, run.state, log)
        for process in run.popen:
            with contextlib.suppress(Exception):
                process.wait(timeout=5)
        if problems:
            log(f"run {run.run_id}: clean-up left problems: {problems}")
        if isinstance(exc, (topo.TopologyError, LaunchError)):
            raise LaunchError(str(exc)) from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log(f"run {run.run_id} ready in {timings['total']}s ({timings})")
    return variables


def runs_for_ephemeral(ephemeral_dir: str, cache: str | None = None) -> list:
    ephemeral_dir = os.path.abspath(ephemeral_dir)
    ids = set()
    with contextlib.suppress(OSError):
        with open(os.path.join(ephemeral_dir, "testhosts_run"), encoding="utf-8") as handle:
            ids.add(handle.read().strip())
    for run_id, st in list_runs(cache):
        if st and st.get("ephemeral_dir") == ephemeral_dir:
            ids.add(run_id)
    return sorted(i for i in ids if i)


def destroy(ephemeral_dir: str, instance_config_path: str | None = None, cache: str | None = None,
            log=_log) -> list:
    """Destroy the run(s) created for a Molecule ephemeral directory, then any stale runs."""
    problems = []
    for run_id in runs_for_ephemeral(ephemeral_dir, cache):
        if os.path.isdir(paths.run_dir(run_id, cache)):
            problems += destroy_run(run_id, cache, "molecule destroy", log)
    for name in OUTPUT_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(ephemeral_dir, name))
    if instance_config_path and os.path.exists(instance_config_path):
        _write(instance_config_path, "[]\n")
    cleanup_stale(cache, log)
    return problems
