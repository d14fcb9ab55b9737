# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Create one run of test hosts (tearing down is ``lab.hosts.teardown``).

A run is: one "switch" network namespace per test network (a bridge, plus the
gateway address on private networks), one network namespace per host joined to
its networks by veth pairs, one veth from the root namespace into the public
switch (carrying the public gateway address), an overlay of the cached image per
host booted with ``systemd-nspawn -b``, and one services process (apt proxy and
relays; see ``lab.hosts.services``), plus the AWS endpoint when asked for.

Everything is recorded in the run's state file *before* it is created, and
:func:`teardown` removes exactly what the state file names, so a failure at any
step, a killed job, or a crashed machine leaves nothing that the next create
cannot clean.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import yaml

from lab.hosts import image as imagemod
from lab.hosts import paths
from lab.hosts import state as runstate
from lab.hosts import topology as topo
from lab.hosts.aptproxy import AptProxy
from lab.hosts.teardown import (  # noqa: F401 (LaunchError, sh: part of this module's interface)
    LaunchError, _log, _root_namespace_networks, _write, cgroup_bases, cleanup_stale_locked, list_runs,
    runs_lock, sh, teardown,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT_TIMEOUT = float(os.environ.get("FK_TESTHOSTS_BOOT_TIMEOUT", "120"))


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


# inotify instances one booted test host holds (measured: systemd 3, dbus-daemon 1, systemd-logind 1; the
# image masks the two ask-password .path units, 2 more each). Every host's root is the machine's root, so
# all hosts share root's fs.inotify.max_user_instances (128 by default): a host that finds none left fails
# its boot with "Result: resources" (20 hosts and a bastion did, at 7 each).
INOTIFY_PER_HOST = 5


def inotify_in_use(proc: str = "/proc") -> int:
    """inotify instances held by root's processes (the machine's and every running test host's)."""
    used = 0
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            if os.stat(os.path.join(proc, pid)).st_uid != 0:
                continue
            fds = os.path.join(proc, pid, "fd")
            used += sum(1 for fd in os.listdir(fds) if os.readlink(os.path.join(fds, fd)) == "anon_inode:inotify")
        except OSError:  # the process ended while being read
            continue
    return used


def check_inotify_room(hosts: int, used: int | None = None, limit: int | None = None) -> None:
    """Refuse, before anything is made, a run whose hosts could not all get the inotify instances they boot with."""
    if limit is None:
        with open("/proc/sys/fs/inotify/max_user_instances", encoding="ascii") as handle:
            limit = int(handle.read())
    used = inotify_in_use() if used is None else used
    needed = hosts * INOTIFY_PER_HOST
    if used + needed > limit:
        fit = max(0, (limit - used) // INOTIFY_PER_HOST)
        raise LaunchError(
            f"{hosts} test hosts need about {needed} inotify instances and {used} of root's "
            f"fs.inotify.max_user_instances={limit} are in use: {fit} more host(s) fit. Boot fewer hosts at once, "
            f"or raise the limit on a machine you may change (sysctl fs.inotify.max_user_instances=512)")


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
    process = _spawn(run, [sys.executable, os.path.join(REPO_ROOT, "lab", "awsemu.py"),
                           "--state-file", run.path("aws.json")], "aws.log")
    run.state["aws"]["process"] = runstate.process_identity(process.pid)
    run.save()
    info = _wait_for_file(run.path("aws.json"), process, 60, "the AWS endpoint (lab/awsemu.py)")
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
    process = _spawn(run, [sys.executable, "-m", "lab.hosts.services", run.dir], "services.log")
    run.state["daemon"] = runstate.process_identity(process.pid)
    run.save()
    return _wait_for_file(run.path("services.ready"), process, 30, "the services process (apt proxy, relays)",
                          failed=run.path("services.failed"))


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
    header = "# Written by lab/hosts (docs/testhosts.md); removed by destroy.\n"
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
    check_inotify_room(len(platforms))
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
                "(FK_TESTHOSTS_KEEP_FAILED=1): `python -m lab.hosts cleanup` removes it")
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
