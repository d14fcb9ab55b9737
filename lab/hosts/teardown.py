# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tear down runs of test hosts, list them and clean stale ones.

:func:`teardown` removes exactly what a run's state file names (the launcher,
``lab.hosts.launcher``, records each thing there *before* it creates it), so a
failure at any step, a killed job, or a crashed machine leaves nothing that the
next create cannot clean. Also the helpers both halves share: :class:`LaunchError`,
:func:`sh`, :func:`runs_lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from lab.hosts import paths
from lab.hosts import state as runstate
from lab.hosts import topology as topo

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
        # SIGKILL is not instant: a process leaving a big namespace (nspawn tearing down its container) stays
        # alive for a moment. Wait for it before anyone checks, instead of reporting it as left behind.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and runstate.alive(identity):
            time.sleep(0.1)


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


def _write(path: str, text: str, mode: int = 0o644) -> None:
    if os.path.islink(path):
        os.unlink(path)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)


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
