# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The test-host harness for real: boot hosts, log in through the bastion, and
prove that destroy, a failed create and stale-run clean-up leave nothing behind.

Needs root, systemd-nspawn and the image (built on first use, about 3 minutes
on a fresh machine). See docs/testhosts.md.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from lab.hosts import launcher, paths, teardown
from lab.hosts import state as runstate
from lab.hosts.__main__ import probe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"),
                       reason="needs root, systemd-nspawn and debootstrap"),
]

PLATFORMS = [
    {"name": "bastion", "networks": [{"name": "public", "address": "10.213.0.10"},
                                     {"name": "private", "address": "10.0.7.10"}]},
    {"name": "private", "proxy_jump": "bastion", "networks": [{"name": "private", "address": "10.0.7.20"}]},
]


def traces(run_id: str) -> dict:
    """Everything on the machine that carries the run id."""
    netns = [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else []) if run_id in n]
    links = [n for n in os.listdir("/sys/class/net") if run_id in n]
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        mounts = [line.split()[4] for line in handle if run_id in line.split()[4]]
    cgroups = glob.glob(f"/sys/fs/cgroup/*/fleetkeeper-{run_id}-*")
    processes = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if run_id.encode() in handle.read():
                    processes.append(int(pid))
        except OSError:
            pass
    return {"netns": netns, "links": links, "mounts": mounts, "cgroups": cgroups, "processes": processes,
            "run_dir": os.path.exists(paths.run_dir(run_id))}


NOTHING = {"netns": [], "links": [], "mounts": [], "cgroups": [], "processes": [], "run_dir": False}


def wait_for_nothing(run_id: str, timeout: float = 10.0) -> dict:
    # Exited nspawn processes may linger as zombies for a moment (their parent is PID 1).
    deadline = time.monotonic() + timeout
    found = traces(run_id)
    while found != NOTHING and time.monotonic() < deadline:
        time.sleep(0.2)
        found = traces(run_id)
        found["processes"] = [p for p in found["processes"] if runstate.alive(runstate.process_identity(p))]
    return found


def ssh(inventory: dict, host: str, command: str) -> subprocess.CompletedProcess:
    hostvars = inventory["all"]["hosts"][host]
    words = shlex.split(hostvars["ansible_ssh_common_args"])
    options = []
    for flag, value in zip(words[::2], words[1::2]):
        assert flag == "-o"
        if not value.startswith("Control"):  # no ControlMaster sockets left behind by a test
            options += [flag, value]
    argv = ["ssh", "-F", "/dev/null", "-i", hostvars["ansible_private_key_file"], "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10", *options, f"root@{hostvars['ansible_host']}", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


# The test process owns its runs like `molecule test` would: if it is killed,
# the runs' watchdog destroys them.
OWNER = {**(runstate.process_identity(os.getpid()) or {}), "command": "test"}


@pytest.fixture
def ephemeral(tmp_path):
    (tmp_path / "inventory").mkdir()
    return tmp_path


def test_create_gives_working_hosts_and_destroy_leaves_nothing(ephemeral):
    variables = launcher.create(PLATFORMS, str(ephemeral), str(ephemeral / "instance_config.yml"), "pytest",
                                owner=OWNER)
    run_id = variables["testhosts_run_id"]
    try:
        assert traces(run_id)["netns"], "the run made its namespaces"
        inventory = yaml.safe_load((ephemeral / "inventory" / "testhosts_inventory.yml").read_text())
        result = ssh(inventory, "private", "hostname; systemctl is-system-running; cat /etc/resolv.conf")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[:2] == ["private", "running"]
        assert "nameserver 10.0.7.1" in lines
        # The private host is reachable through the bastion only.
        private = variables["testhosts_addresses"]["private"]["private"]
        link = f"fk{run_id}n0"  # the only link from the controller into any test network
        assert probe(private, 22, device=link, timeout=2) != "open"
        assert probe(variables["testhosts_addresses"]["bastion"]["public"], 22) == "open"
        instances = yaml.safe_load((ephemeral / "instance_config.yml").read_text())
        assert [i["instance"] for i in instances] == ["bastion", "private"]
    finally:
        problems = teardown.destroy(str(ephemeral), str(ephemeral / "instance_config.yml"))
    assert problems == []
    assert wait_for_nothing(run_id) == NOTHING
    assert not (ephemeral / "testhosts.yml").exists()
    assert not (ephemeral / "inventory" / "testhosts_inventory.yml").exists()


def test_a_create_that_fails_half_way_removes_what_it_made(ephemeral, monkeypatch):
    made = []
    real_boot = launcher._boot_host  # pylint: disable=protected-access

    def boot_then_fail(run, topology, name):
        made.append(run.run_id)
        real_boot(run, topology, name)
        if name == "private":
            raise launcher.LaunchError("injected failure after booting both hosts")

    monkeypatch.setattr(launcher, "_boot_host", boot_then_fail)
    with pytest.raises(launcher.LaunchError, match="injected failure"):
        launcher.create(PLATFORMS, str(ephemeral), None, "pytest", owner=OWNER)
    assert made
    assert wait_for_nothing(made[0]) == NOTHING


def test_a_run_whose_services_died_is_stale_and_cleaned_by_the_next_cleanup(ephemeral):
    variables = launcher.create(PLATFORMS[:1], str(ephemeral), None, "pytest", owner=OWNER)
    run_id = variables["testhosts_run_id"]
    st = runstate.load(os.path.join(paths.run_dir(run_id), "state.json"))
    try:
        assert runstate.staleness(st) is None
        os.kill(st["daemon"]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while runstate.alive(st["daemon"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "service process" in runstate.staleness(st)
        cleaned = teardown.cleanup_stale()
        assert run_id in [c[0] for c in cleaned]
        assert wait_for_nothing(run_id) == NOTHING
    finally:
        teardown.destroy(str(ephemeral))


def test_the_watchdog_destroys_a_run_whose_molecule_test_died(ephemeral):
    # A stand-in for `molecule test`, killed like a CI job that timed out.
    stand_in = subprocess.Popen(["sleep", "600"])  # pylint: disable=consider-using-with
    owner = {**runstate.process_identity(stand_in.pid), "command": "test"}
    variables = launcher.create(PLATFORMS[:1], str(ephemeral), None, "pytest", owner=owner)
    run_id = variables["testhosts_run_id"]
    try:
        assert traces(run_id)["netns"]
        st = runstate.load(os.path.join(paths.run_dir(run_id), "state.json"))
        assert runstate.staleness(st) is None
        stand_in.kill()
        stand_in.wait()
        assert "molecule test" in runstate.staleness(st)
        assert wait_for_nothing(run_id, timeout=60) == NOTHING
    finally:
        stand_in.kill()
        teardown.destroy(str(ephemeral))
