# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet inventory selects instances held in Pending:Wait and names their launch hook."""

from __future__ import annotations

import pytest

from tests.integration.test_inventory_fleet import hostvars, hosts_of, listed, write_config
from lab import fleet as fl
from lab.lifecycle import LAUNCHING


@pytest.mark.compat
def test_pending_wait_hosts_carry_their_launch_hook(aws, tmp_path):
    fl.demo_fleet(aws, groups={"web": 1})
    autoscaling = aws.client("autoscaling")
    autoscaling.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                                   LifecycleTransition=LAUNCHING, HeartbeatTimeout=300)
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=3)
    [pending_id] = [a["EC2InstanceId"] for a in aws.proxy.lifecycle.actions()][:1] or [None]
    assert pending_id

    default = listed(write_config(tmp_path, aws), aws)[0]
    assert pending_id not in {v["instance_id"] for v in hostvars(default).values()}, "Pending:Wait is left out by default"
    assert aws.proxy.count("autoscaling", "DescribeLifecycleHooks") == 0

    data = listed(write_config(tmp_path, aws, name="pending.fleet.yml", lifecycle_states=["Pending:Wait"]), aws)[0]
    pending = hosts_of(data, "lifecycle_pending_wait")
    assert len(pending) == 2
    for name in pending:
        variables = hostvars(data)[name]
        assert variables["lifecycle_state"] == "Pending:Wait"
        assert variables["lifecycle_hook_name"] == "fleetkeeper-provision"
        assert variables["lifecycle_hook_names"] == ["fleetkeeper-provision"]
    assert aws.proxy.count("autoscaling", "DescribeLifecycleHooks") == 1
