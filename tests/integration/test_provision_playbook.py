# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""fleetkeeper.aws.provision on test hosts standing for instances an ASG holds in Pending:Wait.

An ASG in moto (behind the lifecycle emulation) scales out with a launch hook, so
three instances wait in Pending:Wait. Three private test hosts (reached through a
bastion) stand for them in the inventory: one converges (the real dns_cache
role and a marker), one fails, one converges for longer than the hook's
heartbeat timeout. The playbook must CONTINUE the first and the slow one (kept
alive by heartbeats), ABANDON the broken one, and a second run must complete
nothing twice. Needs root and systemd-nspawn (docs/testhosts.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest
import yaml

from lab.hosts import launcher
from lab.hosts import teardown
from lab.hosts import state as runstate
from lab import fleet as fleet_support
from lab.ansiblerun import BIN_DIR, ansible_env
from lab.awsemu import free_port
from lab.lifecycle import LAUNCHING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"),
                       reason="needs root, systemd-nspawn and debootstrap"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OWNER = {**(runstate.process_identity(os.getpid()) or {}), "command": "test"}
PLATFORMS = [
    {"name": "bastion", "networks": [{"name": "public", "address": "10.213.0.10"},
                                     {"name": "private", "address": "10.0.61.10"}]},
    {"name": "good", "proxy_jump": "bastion", "networks": [{"name": "private", "address": "10.0.61.21"}]},
    {"name": "broken", "proxy_jump": "bastion", "networks": [{"name": "private", "address": "10.0.61.22"}]},
    {"name": "slow", "proxy_jump": "bastion", "networks": [{"name": "private", "address": "10.0.61.23"}]},
]
ROLES = [
    {"name": "fleetkeeper.aws.dns_cache", "groups": ["as_good"]},
    {"name": "lc_mark", "groups": ["as_good", "as_slow"]},
    {"name": "lc_fail", "groups": ["as_broken"]},
    {"name": "lc_slow", "groups": ["as_slow"]},
]


@pytest.fixture(scope="module")
def testhosts(tmp_path_factory):
    ephemeral = tmp_path_factory.mktemp("provision")
    (ephemeral / "inventory").mkdir()
    variables = launcher.create(PLATFORMS, str(ephemeral), None, "pytest-provision", owner=OWNER)
    try:
        inventory = yaml.safe_load((ephemeral / "inventory" / "testhosts_inventory.yml").read_text())
        yield ephemeral, variables, inventory["all"]["hosts"]
    finally:
        teardown.destroy(str(ephemeral))


def pending_inventory(path, hosts, variables, instances):
    """The three test hosts as the fleet inventory would show the pending instances."""
    group = {}
    for name, instance_id in instances.items():
        host = dict(hosts[name])
        host.update({"instance_id": instance_id, "asg_name": "web", "region": "us-east-1",
                     "lifecycle_state": "Pending:Wait", "lifecycle_hook_name": "fleetkeeper-provision",
                     "dns_cache_upstreams": [{"address": variables["testhosts_hosts"][name]["resolver"]}]})
        group[name] = host
    document = {"all": {"children": {"lifecycle_pending_wait": {"hosts": group},
                                     **{f"as_{name}": {"hosts": {name: None}} for name in instances}}}}
    path.write_text(yaml.safe_dump(document))
    return str(path)


def provision_command(inventory, endpoint_url, extra=None, args=(), marker=None):
    """The ansible-playbook command line and environment (``FK_TEST_RUN=marker`` lets heartbeat jobs be found)."""
    extra_vars = {"provision_aws_endpoint_url": endpoint_url, "provision_heartbeat_interval": 5,
                  "provision_heartbeat_lifetime": 600, "provision_roles": ROLES, **(extra or {})}
    env = ansible_env({"ANSIBLE_ROLES_PATH": os.path.join(HERE, "files", "provision_roles"),
                       "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default", "ANSIBLE_FORKS": "10",
                       "ANSIBLE_PIPELINING": "True", "FK_TEST_RUN": marker or ""})
    command = [os.path.join(BIN_DIR, "ansible-playbook"), "-i", inventory, "fleetkeeper.aws.provision",
               "-e", json.dumps(extra_vars), *args]
    return command, env


def run_provision(inventory, endpoint_url, extra=None, args=()):
    command, env = provision_command(inventory, endpoint_url, extra, args)
    return subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=1500)


def heartbeat_jobs(marker, watchdogs=False):
    """Job ids of the asg_lifecycle_action async jobs (heartbeats) of the run with ``marker``, found as ps finds
    them: /proc/PID/cmdline and the marker in /proc/PID/environ. A job is its module process (the one sending
    heartbeats, a child of ``async_wrapper.py JID ...``); with ``watchdogs``, ansible-core's async_wrapper
    processes count too (they notice the module's end at their next 5-second check)."""
    wrappers, modules = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            if not any("AnsiballZ_asg_lifecycle_action" in a for a in argv):
                continue
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if f"FK_TEST_RUN={marker}".encode() not in handle.read().split(b"\0"):
                    continue
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        wrapper = [i for i, a in enumerate(argv) if a.endswith("async_wrapper.py")]
        if wrapper:
            wrappers[int(pid)] = argv[wrapper[0] + 1]
        else:
            modules[int(pid)] = ppid
    jobs = {wrappers[ppid] for ppid in modules.values() if ppid in wrappers}
    return jobs | set(wrappers.values()) if watchdogs else jobs


def pending_ghost(aws, tmp_path, default_result):
    """One instance of ASG web held in Pending:Wait by a launch hook, and an inventory whose only pending host stands
    for it at a closed loopback port (bound and released: nothing listens there). (autoscaling, id, inventory)"""
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    fleet_support.create_group(ec2, autoscaling, fleet_support.create_network(ec2, "us-east-1"), "web", 0)
    autoscaling.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                                   LifecycleTransition=LAUNCHING, HeartbeatTimeout=300, DefaultResult=default_result)
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    [instance_id] = lifecycle_states(autoscaling)
    inventory = tmp_path / "ghost.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"lifecycle_pending_wait": {"hosts": {
        "ghost": ghost_host(instance_id, free_port())}}}}}))
    return autoscaling, instance_id, str(inventory)


def ghost_host(instance_id, port):
    """A pending instance whose SSH never answers (a closed loopback port)."""
    return {"ansible_host": "127.0.0.1", "ansible_port": port, "instance_id": instance_id, "asg_name": "web",
            "region": "us-east-1", "lifecycle_state": "Pending:Wait"}


def lifecycle_states(autoscaling):
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in group["Instances"]}


def test_provision_continues_converged_abandons_failed_and_never_completes_twice(aws, testhosts, tmp_path):
    ephemeral, variables, hosts = testhosts
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    fleet = fleet_support.create_network(ec2, "us-east-1")
    fleet_support.create_group(ec2, autoscaling, fleet, "web", 0)
    autoscaling.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                                   LifecycleTransition=LAUNCHING, HeartbeatTimeout=30, DefaultResult="ABANDON")
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=3)
    states = lifecycle_states(autoscaling)
    assert sorted(states.values()) == ["Pending:Wait"] * 3, "scale-out holds new instances in Pending:Wait"
    good, broken, slow = sorted(states)
    instances = {"good": good, "broken": broken, "slow": slow}
    inventory = pending_inventory(tmp_path / "pending.yml", hosts, variables, instances)

    proc = run_provision(inventory, aws.endpoint_url)
    # The broken host was abandoned: the run says so and exits non-zero, for cron, AWX and EDA to see.
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"1 instance(s) abandoned or not completed: {broken}" in proc.stdout
    for instance_id, line in ((good, "CONTINUE completed"), (slow, "CONTINUE completed"), (broken, "ABANDON completed")):
        assert f'"{instance_id} {line}"' in proc.stdout, "the summary names every instance"
    assert "[WARNING]" not in proc.stdout + proc.stderr
    results = {h["EC2InstanceId"]: (h["Result"], h["How"]) for h in aws.proxy.lifecycle.history}
    assert results[good] == ("CONTINUE", "CompleteLifecycleAction")
    assert results[slow] == ("CONTINUE", "CompleteLifecycleAction"), "heartbeats kept the slow converge alive"
    assert results[broken] == ("ABANDON", "CompleteLifecycleAction")
    assert aws.proxy.count("autoscaling", "RecordLifecycleActionHeartbeat") >= 3
    after = lifecycle_states(autoscaling)
    assert after[good] == after[slow] == "InService"
    assert broken not in after  # terminated, and its replacement is held
    assert list(after.values()).count("Pending:Wait") == 1
    completes = aws.proxy.count("autoscaling", "CompleteLifecycleAction")
    assert completes == 3

    again = run_provision(inventory, aws.endpoint_url)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert aws.proxy.count("autoscaling", "CompleteLifecycleAction") == completes, "nothing is completed twice"
    # (The broken host's replacements, which no run targets, time out under the 30 s hook meanwhile.)
    assert len([h for h in aws.proxy.lifecycle.history if h["How"] == "CompleteLifecycleAction"]) == 3
    assert f'"{good} - not_pending"' in again.stdout and f'"{broken} - already_completed"' in again.stdout
    assert "changed=0" in again.stdout.split("PLAY RECAP")[1], "reading states changes nothing"


def test_each_host_completes_as_soon_as_it_is_done_and_its_heartbeat_ends_with_it(aws, testhosts, tmp_path):
    """A host with nothing to do goes InService while a slow host still converges and a host that never answers
    SSH still waits for its timeout; each heartbeat job ends within seconds of its host's completion (ps), and
    none outlives the run, which exits non-zero because the silent host was abandoned."""
    _ephemeral, variables, hosts = testhosts
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    fleet_support.create_group(ec2, autoscaling, fleet_support.create_network(ec2, "us-east-1"), "web", 0)
    autoscaling.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                                   LifecycleTransition=LAUNCHING, HeartbeatTimeout=300, DefaultResult="ABANDON")
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=3)
    fast, slow, ghost = sorted(lifecycle_states(autoscaling))
    inventory = tmp_path / "pending.yml"
    pending_inventory(inventory, hosts, variables, {"good": fast, "slow": slow})
    document = yaml.safe_load(inventory.read_text())
    document["all"]["children"]["lifecycle_pending_wait"]["hosts"]["ghost"] = ghost_host(ghost, free_port())
    inventory.write_text(yaml.safe_dump(document))
    roles = [{"name": "lc_mark", "groups": ["as_good", "as_slow"]}, {"name": "lc_slow", "groups": ["as_slow"]}]
    marker = uuid.uuid4().hex
    command, env = provision_command(str(inventory), aws.endpoint_url, {
        "provision_roles": roles, "lc_slow_seconds": 40, "provision_ssh_timeout": 90,
        "provision_heartbeat_interval": 300}, marker=marker)
    timeline = []  # (seconds, states, heartbeat jobs)
    started = time.monotonic()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        while proc.poll() is None:
            timeline.append((time.monotonic() - started, lifecycle_states(autoscaling), heartbeat_jobs(marker)))
            time.sleep(0.5)
        output = proc.stdout.read()
        left = heartbeat_jobs(marker)
    assert proc.returncode == 2, output[-6000:]
    assert not left, "no heartbeat job outlives the run"
    time.sleep(6)
    assert not heartbeat_jobs(marker, watchdogs=True), "nor does ansible-core's async_wrapper watchdog"

    fast_done = next(t for t, states, _jobs in timeline if states.get(fast) == "InService")
    at_fast = next(states for t, states, _jobs in timeline if t == fast_done)
    assert at_fast[slow] == "Pending:Wait" and at_fast[ghost] == "Pending:Wait", \
        "the fast host went InService while the slow one converged and the silent one was waited for"
    assert max(len(jobs) for _t, _states, jobs in timeline) == 3, "one heartbeat job per host"
    # Within seconds of the fast host's completion its heartbeat job is gone; the other two still beat.
    settled = [jobs for t, states, jobs in timeline if fast_done <= t <= fast_done + 6
               and states.get(slow) == states.get(ghost) == "Pending:Wait"]
    assert settled and len(settled[-1]) == 2, timeline
    slow_done = next(t for t, states, _jobs in timeline if states.get(slow) == "InService")
    assert slow_done > fast_done
    results = {h["EC2InstanceId"]: (h["Result"], h["How"]) for h in aws.proxy.lifecycle.history}
    assert results == {fast: ("CONTINUE", "CompleteLifecycleAction"), slow: ("CONTINUE", "CompleteLifecycleAction"),
                       ghost: ("ABANDON", "CompleteLifecycleAction")}
    assert f'"{ghost} ABANDON completed"' in output and f"abandoned or not completed: {ghost}" in output


def test_a_limit_to_one_host_completes_that_host_alone(aws, testhosts, tmp_path):
    """``--limit HOST`` without localhost (as AWX's provisioning callback runs it) still completes HOST."""
    _ephemeral, variables, hosts = testhosts
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    fleet_support.create_group(ec2, autoscaling, fleet_support.create_network(ec2, "us-east-1"), "web", 0)
    autoscaling.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                                   LifecycleTransition=LAUNCHING, HeartbeatTimeout=300, DefaultResult="ABANDON")
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=2)
    mine, other = sorted(lifecycle_states(autoscaling))
    inventory = pending_inventory(tmp_path / "pending.yml", hosts, variables, {"good": mine, "broken": other})
    proc = run_provision(inventory, aws.endpoint_url, args=("--limit", "good"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [(h["EC2InstanceId"], h["Result"]) for h in aws.proxy.lifecycle.history] == [(mine, "CONTINUE")]
    states = lifecycle_states(autoscaling)
    assert states[mine] == "InService" and states[other] == "Pending:Wait", "the host outside the limit is left alone"


def test_a_host_that_never_answers_ssh_is_abandoned_even_when_it_is_the_only_one(aws, tmp_path):
    """No test host: the pending instance's host points at a closed loopback port, so its converge fails."""
    autoscaling, ghost_id, inventory = pending_ghost(aws, tmp_path, "CONTINUE")
    proc = run_provision(inventory, aws.endpoint_url, {"provision_ssh_timeout": 5})
    # The default result is CONTINUE: only the playbook's ABANDON keeps the unconfigured host out of service.
    assert [(h["EC2InstanceId"], h["Result"], h["How"]) for h in aws.proxy.lifecycle.history] == [
        (ghost_id, "ABANDON", "CompleteLifecycleAction")], proc.stdout[-4000:]
    assert ghost_id not in lifecycle_states(autoscaling)


@pytest.mark.parametrize("settings,message", [
    ({"provision_heartbeat_interval": "often"}, "argument 'provision_heartbeat_interval' is of type str"),
    ({"provision_roles": [{"nme": "fleetkeeper.aws.dns_cache"}]}, "missing required arguments: name found in provision_roles"),
    ({"provision_vars": ["provision_ssh_timeout=5"]}, "argument 'provision_vars' is of type list"),
    ({"provision_vars": {"provision_ssh_timeout": "soon"}}, "argument 'provision_ssh_timeout' is of type str"),
])
def test_wrong_settings_fail_before_anything_is_read_or_completed(aws, tmp_path, settings, message):
    """provision_* variables are checked like a role's: the run fails naming the variable, makes no AWS call and
    leaves the instance in Pending:Wait for a corrected run."""
    autoscaling, waiting_id, inventory = pending_ghost(aws, tmp_path, "ABANDON")
    before = aws.proxy.summary()
    proc = run_provision(inventory, aws.endpoint_url, settings)
    assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-4000:]
    assert aws.proxy.summary() == before, "the run made AWS calls"
    assert lifecycle_states(autoscaling) == {waiting_id: "Pending:Wait"}


def test_a_killed_run_leaves_no_heartbeat_job_behind(aws, tmp_path):
    """The heartbeat job watches the ansible-playbook process: SIGKILL the run while a host waits for SSH, and
    the job ends within seconds (ps), long before its lifetime."""
    _autoscaling, ghost_id, inventory = pending_ghost(aws, tmp_path, "ABANDON")
    marker = uuid.uuid4().hex
    command, env = provision_command(inventory, aws.endpoint_url, {"provision_ssh_timeout": 300}, marker=marker)
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True) as proc:
        try:
            deadline = time.monotonic() + 120
            while not heartbeat_jobs(marker) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert heartbeat_jobs(marker), "the heartbeat job started"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = time.monotonic()
            while heartbeat_jobs(marker) and time.monotonic() < killed + 30:
                time.sleep(0.25)
            assert not heartbeat_jobs(marker), "the heartbeat job ended with the run"
            # It checks every second; it was gone in under 3 s at load 2 to 8, and at load 31 on the
            # 2 cores it took 4.3 s (the woken process waits for a core, then exits).
            assert time.monotonic() - killed < 10
            time.sleep(6)
            assert not heartbeat_jobs(marker, watchdogs=True), "and its async_wrapper watchdog after it"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker still waiting for SSH
            except ProcessLookupError:
                pass
