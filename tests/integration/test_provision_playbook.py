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
import subprocess

import pytest
import yaml

from tests.hosts import launcher
from tests.hosts import teardown
from tests.hosts import state as runstate
from tests.support import fleet as fleet_support
from tests.support.ansiblerun import BIN_DIR, ansible_env
from tests.support.awsemu import free_port
from tests.support.lifecycle import LAUNCHING

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
    {"name": "fleetkeeper.aws.dns_cache", "groups": ["good"]},
    {"name": "lc_mark", "groups": ["good", "slow"]},
    {"name": "lc_fail", "groups": ["broken"]},
    {"name": "lc_slow", "groups": ["slow"]},
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
                                     **{name: {"hosts": {name: None}} for name in instances}}}}
    path.write_text(yaml.safe_dump(document))
    return str(path)


def run_provision(inventory, endpoint_url, extra=None, args=()):
    extra_vars = {"provision_aws_endpoint_url": endpoint_url, "provision_heartbeat_interval": 5,
                  "provision_heartbeat_lifetime": 600, "provision_roles": ROLES, **(extra or {})}
    env = ansible_env({"ANSIBLE_ROLES_PATH": os.path.join(HERE, "files", "provision_roles"),
                       "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default", "ANSIBLE_FORKS": "10",
                       "ANSIBLE_PIPELINING": "True"})
    proc = subprocess.run([os.path.join(BIN_DIR, "ansible-playbook"), "-i", inventory, "fleetkeeper.aws.provision",
                           "-e", json.dumps(extra_vars), *args], env=env, capture_output=True, text=True, check=False,
                          timeout=1500)
    return proc


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
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
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
    assert len(aws.proxy.lifecycle.history) == 3


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
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    fleet_support.create_group(ec2, autoscaling, fleet_support.create_network(ec2, "us-east-1"), "web", 0)
    autoscaling.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                                   LifecycleTransition=LAUNCHING, HeartbeatTimeout=300, DefaultResult="CONTINUE")
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    [ghost_id] = lifecycle_states(autoscaling)
    closed_port = free_port()  # bound and released: nothing listens there
    inventory = tmp_path / "ghost.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"lifecycle_pending_wait": {"hosts": {"ghost": {
        "ansible_host": "127.0.0.1", "ansible_port": closed_port, "instance_id": ghost_id, "asg_name": "web",
        "region": "us-east-1"}}}}}}))
    proc = run_provision(str(inventory), aws.endpoint_url, {"provision_ssh_timeout": 5})
    # The default result is CONTINUE: only the playbook's ABANDON keeps the unconfigured host out of service.
    assert [(h["EC2InstanceId"], h["Result"], h["How"]) for h in aws.proxy.lifecycle.history] == [
        (ghost_id, "ABANDON", "CompleteLifecycleAction")], proc.stdout[-4000:]
    assert ghost_id not in lifecycle_states(autoscaling)
