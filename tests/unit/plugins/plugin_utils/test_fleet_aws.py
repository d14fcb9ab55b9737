# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet inventory's gateway to AWS (plugin_utils/fleet_aws.py): paging, retries of forgotten ids, error mapping (stub clients)."""

from __future__ import annotations

import botocore.exceptions
import pytest

from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet as logic
from ansible_collections.fleetkeeper.aws.plugins.plugin_utils.fleet_aws import FleetGateway
from tests.unit.fakes_aws import client_error, endpoint_unreachable

REGION = "eu-west-1"


class StubEC2:
    """DescribeInstances over ``known`` instance ids, ``page`` instances per page; ``error`` raised instead when set."""

    def __init__(self, known=(), page=2, error=None):
        self.known, self.page, self.error, self.calls = list(known), page, error, []

    def describe_instances(self, InstanceIds=None, Filters=None, MaxResults=None, NextToken=None):  # noqa: N803 (boto3's names)
        self.calls.append({"InstanceIds": InstanceIds, "Filters": Filters, "MaxResults": MaxResults, "NextToken": NextToken})
        if self.error is not None:
            raise self.error
        if InstanceIds is not None:
            gone = [i for i in InstanceIds if i not in self.known]
            if gone:
                raise client_error("InvalidInstanceID.NotFound", 400, "DescribeInstances",
                                   f"The instance IDs '{', '.join(gone)}' do not exist")
            return {"Reservations": [{"Instances": [{"InstanceId": i} for i in InstanceIds]}]}
        start = int(NextToken or 0)
        answer = {"Reservations": [{"Instances": [{"InstanceId": i}]} for i in self.known[start:start + self.page]]}
        if start + self.page < len(self.known):
            answer["NextToken"] = str(start + self.page)
        return answer


class StubAutoScaling:
    """DescribeAutoScalingGroups in pages of one group; DescribeLifecycleHooks denied for the groups in ``denied``."""

    def __init__(self, groups=(), denied=(), error=None):
        self.groups, self.denied, self.error, self.calls = list(groups), set(denied), error, []

    def describe_auto_scaling_groups(self, NextToken=None, **request):  # noqa: N803 (boto3's names)
        self.calls.append(("groups", NextToken))
        if self.error is not None:
            raise self.error
        start = int(NextToken or 0)
        answer = {"AutoScalingGroups": self.groups[start:start + 1]}
        if start + 1 < len(self.groups):
            answer["NextToken"] = str(start + 1)
        return answer

    def describe_lifecycle_hooks(self, AutoScalingGroupName):  # noqa: N803 (boto3's names)
        self.calls.append(("hooks", AutoScalingGroupName))
        if AutoScalingGroupName in self.denied:
            raise client_error("AccessDenied", 403, "DescribeLifecycleHooks")
        return {"LifecycleHooks": [
            {"LifecycleHookName": "b-launch", "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING"},
            {"LifecycleHookName": "a-launch", "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING"},
            {"LifecycleHookName": "drain", "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"},
        ]}


def gateway(ec2=None, autoscaling=None):
    return FleetGateway({("ec2", REGION): ec2 or StubEC2(), ("autoscaling", REGION): autoscaling or StubAutoScaling()})


def test_instances_by_filters_reads_every_page():
    ec2 = StubEC2(known=["i-1", "i-2", "i-3"])
    found = gateway(ec2).instances_by_filters(REGION, [{"Name": "tag:role", "Values": ["web"]}])
    assert [i["InstanceId"] for i in found] == ["i-1", "i-2", "i-3"]
    assert [c["NextToken"] for c in ec2.calls] == [None, "2"]
    assert ec2.calls[0]["MaxResults"] == logic.INSTANCE_PAGE_SIZE


def test_ids_ec2_has_forgotten_are_dropped_and_the_batch_asked_again():
    ids = ["i-0000000000000000a", "i-0000000000000000b", "i-0000000000000000c"]
    ec2 = StubEC2(known=ids[:2])
    found = gateway(ec2).instances_by_ids(REGION, ids)
    assert [i["InstanceId"] for i in found] == ids[:2]
    assert [c["InstanceIds"] for c in ec2.calls] == [ids, ids[:2]]
    assert list(FleetGateway.instance_id_batches([f"i-{n:05d}" for n in range(2500, 0, -1)]))[2][0] == "i-02001"


def test_auto_scaling_groups_page_and_a_denial_names_the_call_and_the_code():
    autoscaling = StubAutoScaling(groups=[{"AutoScalingGroupName": "a"}, {"AutoScalingGroupName": "b"}])
    assert [g["AutoScalingGroupName"] for g in gateway(autoscaling=autoscaling).auto_scaling_groups(REGION, {})] == ["a", "b"]
    denied = StubAutoScaling(error=client_error("AccessDenied", 403, "DescribeAutoScalingGroups"))
    with pytest.raises(logic.FleetRegionError, match="may not call autoscaling:DescribeAutoScalingGroups") as caught:
        list(gateway(autoscaling=denied).auto_scaling_groups(REGION, {}))
    assert (caught.value.region, caught.value.kind, caught.value.code) == (REGION, "denied", "AccessDenied")


def test_launch_hooks_are_sorted_and_a_denial_keeps_those_read_so_far():
    autoscaling = StubAutoScaling(denied={"c"})
    assert gateway(autoscaling=autoscaling).launch_hooks(REGION, ["a", "c", "d"]) == ({"a": ["a-launch", "b-launch"]}, "AccessDenied")
    assert autoscaling.calls == [("hooks", "a"), ("hooks", "c")]
    assert gateway().launch_hooks(REGION, ["a"]) == ({"a": ["a-launch", "b-launch"]}, None)


@pytest.mark.parametrize("error, kind, text", [
    (client_error("OptInRequired", 401, "DescribeInstances"), "credentials", r"AWS refused the credentials for ec2:DescribeInstances \(bastion\)"),
    (endpoint_unreachable("https://ec2.eu-west-1.amazonaws.com/"), "unreachable", "cannot reach the endpoint"),
    (botocore.exceptions.NoCredentialsError(), "credentials", "no AWS credentials found"),
    (client_error("InternalError", 500, "DescribeInstances"), "error", r"ec2:DescribeInstances \(bastion\) failed \(InternalError"),
])
def test_botocore_errors_become_region_errors(error, kind, text):
    bastion = logic.parse_bastion({"tag": "role=bastion"})
    with pytest.raises(logic.FleetRegionError, match=text) as caught:
        gateway(StubEC2(error=error)).bastion_instances(REGION, bastion)
    assert (caught.value.region, caught.value.kind) == (REGION, kind)
