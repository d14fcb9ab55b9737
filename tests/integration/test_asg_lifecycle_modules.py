# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""fleetkeeper.aws.asg_lifecycle_hook and asg_lifecycle_action against moto + the lifecycle emulation."""

from __future__ import annotations

import pytest

from lab import fleet as fleet_support
from lab.ansiblerun import run_module
from lab.lifecycle import LAUNCHING


@pytest.fixture
def groups(aws):
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    fleet = fleet_support.create_network(ec2, "us-east-1")
    fleet_support.create_group(ec2, autoscaling, fleet, "web", 1, tags={"fleetkeeper:fleet": "web"})
    fleet_support.create_group(ec2, autoscaling, fleet, "worker", 1, tags={"fleetkeeper:fleet": "worker"})
    fleet_support.create_group(ec2, autoscaling, fleet, "other", 1)
    return autoscaling


def hook_args(aws, **extra):
    return dict({"endpoint_url": aws.endpoint_url, "tag_filters": {"fleetkeeper:fleet": "*"},
                 "heartbeat_timeout": 300}, **extra)


def hooks(autoscaling, group):
    return autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group)["LifecycleHooks"]


@pytest.mark.compat
def test_hook_by_tags_check_diff_idempotent_and_removal_of_target(aws, groups):
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName="fk-lifecycle")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    target = {"notification_target_arn": arn, "role_arn": "arn:aws:iam::123456789012:role/notify"}
    check = run_module("fleetkeeper.aws.asg_lifecycle_hook", hook_args(aws, **target), check=True, diff=True)
    assert check.changed and not check.failed
    assert [g["status"] for g in check["groups"]] == ["created", "created"]
    assert check["diff"]["after"]["web"]["DefaultResult"] == "ABANDON"
    assert hooks(groups, "web") == []
    real = run_module("fleetkeeper.aws.asg_lifecycle_hook", hook_args(aws, **target))
    assert real.changed and real["failed_groups"] == []
    [hook] = hooks(groups, "web")
    assert (hook["LifecycleTransition"], hook["HeartbeatTimeout"], hook["DefaultResult"]) == (LAUNCHING, 300, "ABANDON")
    assert hook["NotificationTargetARN"] == arn
    assert hooks(groups, "other") == []
    again = run_module("fleetkeeper.aws.asg_lifecycle_hook", hook_args(aws, **target))
    assert not again.changed and {g["status"] for g in again["groups"]} == {"unchanged"}
    dropped = run_module("fleetkeeper.aws.asg_lifecycle_hook", hook_args(aws), diff=True)
    assert dropped.changed
    assert dropped["groups"][0]["changes"] == ["NotificationTargetARN", "RoleARN"]
    assert "NotificationTargetARN" not in hooks(groups, "web")[0]
    gone = run_module("fleetkeeper.aws.asg_lifecycle_hook", {"endpoint_url": aws.endpoint_url, "names": ["web"],
                                                             "state": "absent"})
    assert gone.changed and hooks(groups, "web") == []


@pytest.mark.compat
@pytest.mark.parametrize("args, message", [
    ({"heartbeat_timeout": 10}, "between 30 and 7200"),
    ({"notification_target_arn": "arn:aws:sqs:us-east-1:123456789012:q.fifo", "role_arn": "arn:aws:iam::1:role/r"},
     "FIFO"),
    ({"notification_target_arn": "arn:aws:sqs:us-east-1:123456789012:q"}, "role_arn is required"),
    ({"names": ["nosuch"], "tag_filters": None}, "not found"),
])
def test_hook_bad_input_fails_clearly(aws, groups, args, message):
    result = run_module("fleetkeeper.aws.asg_lifecycle_hook", hook_args(aws, **args))
    assert result.failed and message in result["msg"]
    assert hooks(groups, "web") == []


def scale_out(aws, autoscaling, count):
    run_module("fleetkeeper.aws.asg_lifecycle_hook", hook_args(aws, names=["web"], tag_filters=None))
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1 + count)
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"][0]
    return sorted(i["InstanceId"] for i in group["Instances"] if i["LifecycleState"] == "Pending:Wait")


@pytest.mark.compat
def test_complete_many_with_a_result_each_and_never_twice(aws, groups):
    first, second, third = scale_out(aws, groups, 3)
    args = {"endpoint_url": aws.endpoint_url,
            "instances": [{"instance_id": first, "result": "CONTINUE"}, {"instance_id": second, "result": "ABANDON"},
                          third],
            "result": "CONTINUE"}
    check = run_module("fleetkeeper.aws.asg_lifecycle_action", args, check=True, diff=True)
    assert check.changed and check["summary"] == {"would_complete": 3}
    assert aws.proxy.count("autoscaling", "CompleteLifecycleAction") == 0
    done = run_module("fleetkeeper.aws.asg_lifecycle_action", args, diff=True)
    assert done.changed and done["summary"] == {"completed": 3}
    by_id = {i["instance_id"]: i for i in done["instances"]}
    assert by_id[first]["hook_name"] == "fleetkeeper-provision" and by_id[second]["result"] == "ABANDON"
    assert done["diff"]["after"][second] == "Terminating"
    assert [(h["EC2InstanceId"], h["Result"]) for h in sorted(aws.proxy.lifecycle.history, key=lambda h: h["EC2InstanceId"])] == sorted(
        [(first, "CONTINUE"), (second, "ABANDON"), (third, "CONTINUE")])
    calls = aws.proxy.count("autoscaling", "CompleteLifecycleAction")
    again = run_module("fleetkeeper.aws.asg_lifecycle_action", args)
    assert not again.changed and not again.failed
    assert {i["status"] for i in again["instances"]} == {"not_pending", "already_completed"}
    assert aws.proxy.count("autoscaling", "CompleteLifecycleAction") == calls


def test_no_active_action_is_final_and_contention_is_retried(aws, groups):
    [held] = scale_out(aws, groups, 1)
    token = aws.proxy.lifecycle.actions()[0]["LifecycleActionToken"]
    aws.proxy.inject("error", service="autoscaling", operation="CompleteLifecycleAction", times=2,
                     status=500, code="ResourceContention")
    done = run_module("fleetkeeper.aws.asg_lifecycle_action",
                      {"endpoint_url": aws.endpoint_url, "asg_name": "web", "hook_name": "fleetkeeper-provision",
                       "instances": [{"instance_id": held, "token": token, "result": "CONTINUE"}]})
    assert done["summary"] == {"completed": 1} and done["instances"][0]["token_used"]
    assert aws.proxy.count("autoscaling", "CompleteLifecycleAction") == 3
    # The same token again (a redelivered event): the action is completed, AWS's answer is final.
    again = run_module("fleetkeeper.aws.asg_lifecycle_action",
                       {"endpoint_url": aws.endpoint_url, "instances": [{"instance_id": held, "token": token}],
                        "result": "CONTINUE"})
    assert not again.failed and again["instances"][0]["status"] == "not_pending"
    # A token that is not the action's of an instance still waiting (stale, foreign): said plainly, not "done".
    [other] = scale_out(aws, groups, 2)[:1]
    stale = run_module("fleetkeeper.aws.asg_lifecycle_action",
                       {"endpoint_url": aws.endpoint_url, "asg_name": "web", "hook_name": "fleetkeeper-provision",
                        "instances": [{"instance_id": other, "token": token, "result": "CONTINUE"}]})
    assert stale.failed and stale["instances"][0]["status"] == "token_mismatch"
    assert f"the token {token} does not match the lifecycle action" in stale["msg"] and other in stale["msg"]
    assert aws.proxy.count("autoscaling", "CompleteLifecycleAction") == 4
    assert other in [a["EC2InstanceId"] for a in aws.proxy.lifecycle.actions()], "the open action is left open"


def test_heartbeat_loop_ends_when_the_action_is_completed(aws, groups):
    [held] = scale_out(aws, groups, 1)
    aws.proxy.lifecycle.time_scale = 0.01
    beat = run_module("fleetkeeper.aws.asg_lifecycle_action",
                      {"endpoint_url": aws.endpoint_url, "instances": [held], "action": "heartbeat"})
    assert beat.changed and beat["instances"][0]["status"] == "heartbeat"
    groups.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                                     InstanceId=held, LifecycleActionResult="CONTINUE")
    loop = run_module("fleetkeeper.aws.asg_lifecycle_action",
                      {"endpoint_url": aws.endpoint_url, "instances": [held], "action": "heartbeat",
                       "heartbeat_interval": 1, "heartbeat_lifetime": 60})
    assert not loop.failed and loop["instances"][0]["status"] == "not_pending"
