# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The test endpoint's launch lifecycle emulation, against the real moto server through the proxy."""

from __future__ import annotations

import json
import time

import botocore.exceptions
import pytest

from lab import fleet as fleet_support
from lab.lifecycle import LAUNCH_MESSAGE_KEYS, LAUNCHING, TEST_MESSAGE_KEYS


@pytest.fixture
def hooked(aws):
    """ASG 'web' with one instance launched before the hook, a queue and the hook 'fk' targeting it."""
    ec2, autoscaling, sqs = aws.client("ec2"), aws.client("autoscaling"), aws.client("sqs")
    fleet = fleet_support.create_network(ec2, "us-east-1")
    [old] = fleet_support.create_group(ec2, autoscaling, fleet, "web", 1)
    url = sqs.create_queue(QueueName="fk-hooks")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    autoscaling.put_lifecycle_hook(
        AutoScalingGroupName="web", LifecycleHookName="fk", LifecycleTransition=LAUNCHING, HeartbeatTimeout=30,
        DefaultResult="ABANDON", NotificationTargetARN=arn, RoleARN="arn:aws:iam::123456789012:role/hooks",
        NotificationMetadata='{"role": "web"}')
    return {"autoscaling": autoscaling, "sqs": sqs, "url": url, "arn": arn, "old": old}


def states(autoscaling):
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in group["Instances"]}


def messages(sqs, url):
    found = []
    while True:
        batch = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not batch:
            return found
        for message in batch:
            found.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def test_scale_out_holds_new_instances_and_notifies(hooked):
    autoscaling, sqs = hooked["autoscaling"], hooked["sqs"]
    [test] = messages(sqs, hooked["url"])
    assert test["Event"] == "autoscaling:TEST_NOTIFICATION" and set(test) == set(TEST_MESSAGE_KEYS)
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=3)
    now = states(autoscaling)
    assert now[hooked["old"]] == "InService"
    pending = sorted(i for i, s in now.items() if s == "Pending:Wait")
    assert len(pending) == 2
    details = autoscaling.describe_auto_scaling_instances(InstanceIds=pending)["AutoScalingInstances"]
    assert {d["LifecycleState"] for d in details} == {"Pending:Wait"}
    sent = messages(sqs, hooked["url"])
    assert sorted(m["EC2InstanceId"] for m in sent) == pending
    for message in sent:
        assert set(message) == set(LAUNCH_MESSAGE_KEYS) | {"NotificationMetadata"}
        assert message["NotificationMetadata"] == '{"role": "web"}'
        assert (message["Origin"], message["Destination"]) == ("EC2", "AutoScalingGroup")
    [hook] = autoscaling.describe_lifecycle_hooks(AutoScalingGroupName="web")["LifecycleHooks"]
    assert hook["NotificationTargetARN"] == hooked["arn"] and hook["RoleARN"].endswith(":role/hooks")


def test_continue_abandon_and_no_active_action(hooked, aws):
    autoscaling = hooked["autoscaling"]
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=3)
    first, second = sorted(i for i, s in states(autoscaling).items() if s == "Pending:Wait")
    common = {"AutoScalingGroupName": "web", "LifecycleHookName": "fk"}
    autoscaling.record_lifecycle_action_heartbeat(InstanceId=first, **common)
    autoscaling.complete_lifecycle_action(InstanceId=first, LifecycleActionResult="CONTINUE", **common)
    autoscaling.complete_lifecycle_action(InstanceId=second, LifecycleActionResult="ABANDON", **common)
    now = states(autoscaling)
    assert now[first] == "InService"
    assert second not in now  # terminated ...
    assert list(now.values()).count("Pending:Wait") == 1  # ... and replaced, held again
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        autoscaling.complete_lifecycle_action(InstanceId=first, LifecycleActionResult="CONTINUE", **common)
    assert caught.value.response["Error"]["Code"] == "ValidationError"
    assert caught.value.response["Error"]["Message"] == f"No active Lifecycle Action found with instance ID {first}"
    assert [h["Result"] for h in aws.proxy.lifecycle.history] == ["CONTINUE", "ABANDON"]


def test_heartbeat_timeout_applies_default_result(hooked, aws):
    aws.proxy.lifecycle.time_scale = 0.02  # 30 s -> 0.6 s
    autoscaling = hooked["autoscaling"]
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=2)
    [held] = [i for i, s in states(autoscaling).items() if s == "Pending:Wait"]
    time.sleep(0.8)
    assert held not in states(autoscaling)
    assert aws.proxy.lifecycle.history[0]["How"] == "timeout"


def test_fifo_queue_is_refused_as_target(aws):
    ec2, autoscaling, sqs = aws.client("ec2"), aws.client("autoscaling"), aws.client("sqs")
    fleet_support.create_group(ec2, autoscaling, fleet_support.create_network(ec2, "us-east-1"), "web", 0)
    url = sqs.create_queue(QueueName="hooks.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    with pytest.raises(botocore.exceptions.ClientError, match="Unable to publish test message"):
        autoscaling.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="fk",
                                       LifecycleTransition=LAUNCHING, NotificationTargetARN=arn,
                                       RoleARN="arn:aws:iam::123456789012:role/hooks")
    assert autoscaling.describe_lifecycle_hooks(AutoScalingGroupName="web")["LifecycleHooks"] == []
