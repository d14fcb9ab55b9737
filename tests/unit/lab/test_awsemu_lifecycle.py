# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The test endpoint's lifecycle emulation speaks Auto Scaling as botocore's service model defines it."""

from __future__ import annotations

import urllib.parse

import botocore.session
import pytest
from botocore import parsers, serialize

from lab import lifecycle

MODEL = botocore.session.get_session().get_service_model("autoscaling")


def parse(operation, status, body):
    shape = MODEL.operation_model(operation).output_shape
    return parsers.QueryParser().parse({"body": body, "headers": {}, "status_code": status}, shape)


def request(operation, params):
    """The body botocore sends for ``operation``, as the proxy receives it."""
    serialised = serialize.QuerySerializer().serialize_to_request(params, MODEL.operation_model(operation))
    return lifecycle.query_params("/", urllib.parse.urlencode(serialised["body"]).encode())


class FakeAutoScaling:
    """Just enough of a moto client for the emulation: groups and terminations."""

    def __init__(self, groups):
        self.groups = groups
        self.terminated = []

    def get_paginator(self, name):
        assert name == "describe_auto_scaling_groups"
        groups = self.groups

        class Pager:  # pylint: disable=too-few-public-methods
            def paginate(self):
                return [{"AutoScalingGroups": groups}]
        return Pager()

    def terminate_instance_in_auto_scaling_group(self, InstanceId, ShouldDecrementDesiredCapacity):  # noqa: N803
        assert ShouldDecrementDesiredCapacity is False
        self.terminated.append(InstanceId)
        for group in self.groups:
            group["Instances"] = [i for i in group["Instances"] if i["InstanceId"] != InstanceId]


def emulation(instances):
    client = FakeAutoScaling([{"AutoScalingGroupName": "web", "Instances": [{"InstanceId": i} for i in instances]}])
    emu = lifecycle.LifecycleEmulation(lambda service, region: client)
    return emu, client


@pytest.mark.parametrize("operation", sorted(lifecycle.READS))
def test_every_request_member_read_is_in_the_model(operation):
    members = MODEL.operation_model(operation).input_shape.members
    assert set(lifecycle.READS[operation]) <= set(members)


@pytest.mark.parametrize("operation", ["CompleteLifecycleAction", "RecordLifecycleActionHeartbeat"])
def test_made_up_success_responses_parse_with_botocore(operation):
    status, body = lifecycle.empty_response(operation)
    parsed = parse(operation, status, body)
    assert status == 200
    assert set(parsed) == {"ResponseMetadata"}
    assert parsed["ResponseMetadata"]["RequestId"]


def test_no_active_action_is_a_validation_error_botocore_understands():
    emu = emulation(["i-1"])[0]
    params = request("CompleteLifecycleAction", {"AutoScalingGroupName": "web", "LifecycleHookName": "fk",
                                                 "InstanceId": "i-1", "LifecycleActionResult": "CONTINUE"})
    status, body = emu.before("us-east-1", "CompleteLifecycleAction", params)
    parsed = parse("CompleteLifecycleAction", status, body)
    assert status == 400
    assert parsed["Error"]["Code"] == "ValidationError"
    assert parsed["Error"]["Message"] == "No active Lifecycle Action found with instance ID i-1"


def test_resource_contention_code_is_the_models():
    shape = MODEL.shape_for("ResourceContentionFault")
    assert shape.metadata["error"]["code"] == "ResourceContention"


def hold(emu, *instance_ids, put=None):
    params = request("PutLifecycleHook", dict({"AutoScalingGroupName": "web", "LifecycleHookName": "fk",
                                               "LifecycleTransition": lifecycle.LAUNCHING,
                                               "HeartbeatTimeout": 30, "DefaultResult": "ABANDON"}, **(put or {})))
    assert emu.before("us-east-1", "PutLifecycleHook", params) is None
    emu.after("us-east-1", "PutLifecycleHook", params, 200, b"")
    return params


MOTO_GROUPS = """<DescribeAutoScalingGroupsResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">
<DescribeAutoScalingGroupsResult><AutoScalingGroups><member>
<AutoScalingGroupName>web</AutoScalingGroupName>
<AutoScalingGroupARN>arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:x:autoScalingGroupName/web</AutoScalingGroupARN>
<MinSize>0</MinSize><MaxSize>5</MaxSize><DesiredCapacity>2</DesiredCapacity><DefaultCooldown>300</DefaultCooldown>
<AvailabilityZones><member>us-east-1a</member></AvailabilityZones><HealthCheckType>EC2</HealthCheckType>
<CreatedTime>2026-01-01T00:00:00Z</CreatedTime>
<Instances>
<member><InstanceId>i-old</InstanceId><AvailabilityZone>us-east-1a</AvailabilityZone>
<LifecycleState>InService</LifecycleState><HealthStatus>Healthy</HealthStatus><ProtectedFromScaleIn>false</ProtectedFromScaleIn></member>
<member><InstanceId>i-new</InstanceId><AvailabilityZone>us-east-1a</AvailabilityZone>
<LifecycleState>InService</LifecycleState><HealthStatus>Healthy</HealthStatus><ProtectedFromScaleIn>false</ProtectedFromScaleIn></member>
</Instances></member></AutoScalingGroups></DescribeAutoScalingGroupsResult>
<ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></DescribeAutoScalingGroupsResponse>"""


def test_new_instance_is_pending_wait_in_a_response_botocore_parses():
    emu, client = emulation(["i-old"])
    hold(emu)
    client.groups[0]["Instances"].append({"InstanceId": "i-new"})
    body = emu.after("us-east-1", "DescribeAutoScalingGroups", {}, 200, MOTO_GROUPS.encode())
    parsed = parse("DescribeAutoScalingGroups", 200, body)
    states = {i["InstanceId"]: i["LifecycleState"] for i in parsed["AutoScalingGroups"][0]["Instances"]}
    assert states == {"i-old": "InService", "i-new": "Pending:Wait"}
    enum = MODEL.shape_for("LifecycleState").enum
    required = MODEL.shape_for("Instance").required_members
    for instance in parsed["AutoScalingGroups"][0]["Instances"]:
        assert instance["LifecycleState"] in enum
        assert set(required) <= set(instance)
    [action] = emu.actions()
    assert action["EC2InstanceId"] == "i-new"


MOTO_HOOKS = """<DescribeLifecycleHooksResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">
<DescribeLifecycleHooksResult><LifecycleHooks><member>
<LifecycleHookName>fk</LifecycleHookName><AutoScalingGroupName>web</AutoScalingGroupName>
<LifecycleTransition>autoscaling:EC2_INSTANCE_LAUNCHING</LifecycleTransition>
<RoleARN>arn:aws:iam::1234567890:role/my-auto-scaling-role</RoleARN>
<NotificationTargetARN>arn:aws:sqs:us-east-1:123456789012:my-queue</NotificationTargetARN>
<HeartbeatTimeout>30</HeartbeatTimeout><GlobalTimeout>172800</GlobalTimeout><DefaultResult>ABANDON</DefaultResult>
</member></LifecycleHooks></DescribeLifecycleHooksResult>
<ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></DescribeLifecycleHooksResponse>"""


def test_hooks_answer_with_what_was_put_not_moto_placeholders():
    emu = emulation([])[0]
    hold(emu, put={"NotificationMetadata": "role=web"})
    body = emu.after("us-east-1", "DescribeLifecycleHooks", {}, 200, MOTO_HOOKS.encode())
    [hook] = parse("DescribeLifecycleHooks", 200, body)["LifecycleHooks"]
    assert set(hook) <= set(MODEL.shape_for("LifecycleHook").members)
    assert "NotificationTargetARN" not in hook and "RoleARN" not in hook
    assert hook["NotificationMetadata"] == "role=web"
    assert hook["GlobalTimeout"] == 3000  # min(48 h, 100 x heartbeat)


class FakeClock:
    """Stands for the ``time`` module in lab/lifecycle.py: the test moves the clock, nothing sleeps."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def time(self):
        return 1_700_000_000.0 + self.now


def test_heartbeat_restarts_the_timer_and_timeout_applies_the_default_result(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(lifecycle, "time", clock)
    emu, client = emulation(["i-old"])
    hold(emu)
    client.groups[0]["Instances"].append({"InstanceId": "i-new"})
    emu.after("us-east-1", "DescribeAutoScalingGroups", {}, 200, MOTO_GROUPS.encode())

    beat = request("RecordLifecycleActionHeartbeat", {"AutoScalingGroupName": "web", "LifecycleHookName": "fk",
                                                      "InstanceId": "i-new"})
    for _beat in range(3):  # a heartbeat every 20 s keeps the 30 s heartbeat timeout from ever running out
        clock.now += 20
        status, _body = emu.before("us-east-1", "RecordLifecycleActionHeartbeat", beat)
        assert status == 200
    assert emu.actions()
    clock.now += 31
    status, _body = emu.before("us-east-1", "RecordLifecycleActionHeartbeat", beat)
    assert status == 400
    assert emu.history[-1]["Result"] == "ABANDON" and emu.history[-1]["How"] == "timeout"
    assert client.terminated == ["i-new"]


def test_complete_by_token_continue_and_then_not_found():
    emu, client = emulation([])
    hold(emu)
    client.groups[0]["Instances"].append({"InstanceId": "i-new"})
    emu.after("us-east-1", "DescribeAutoScalingGroups", {}, 200, MOTO_GROUPS.encode())
    token = emu.actions()[0]["LifecycleActionToken"]
    params = request("CompleteLifecycleAction", {"AutoScalingGroupName": "web", "LifecycleHookName": "fk",
                                                 "LifecycleActionToken": token, "LifecycleActionResult": "CONTINUE"})
    assert emu.before("us-east-1", "CompleteLifecycleAction", params)[0] == 200
    status, body = emu.before("us-east-1", "CompleteLifecycleAction", params)
    assert status == 400
    assert parse("CompleteLifecycleAction", status, body)["Error"]["Message"] == (
        f"No active Lifecycle Action found with token {token}")
    assert not client.terminated
