# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Lifecycle hooks and actions: decisions on plain dictionaries, API calls through botocore's Stubber."""

from __future__ import annotations

import pytest

from ansible_collections.fleetkeeper.aws.plugins.module_utils import lifecycle as lc
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle_gateway import LifecycleGateway
from tests.unit.fakes_aws import stubbed_client


@pytest.fixture
def stubbed():
    with stubbed_client("autoscaling") as pair:
        yield pair


def runner(client, **kwargs):
    """An ActionRunner whose calls go through the gateway over ``client``."""
    return lc.ActionRunner(LifecycleGateway(client), **kwargs)


def hook(**extra):
    return dict(lc.desired_hook("web", "fk", 300, "ABANDON"), GlobalTimeout=30000, **extra)


def test_hook_changes_notice_fields_that_must_go():
    desired = lc.desired_hook("web", "fk", 300, "ABANDON")
    assert lc.hook_changes(hook(), desired) == []
    assert lc.hook_changes(hook(NotificationMetadata="x"), desired) == ["NotificationMetadata"]
    assert lc.hook_changes(None, desired) == ["DefaultResult", "HeartbeatTimeout", "LifecycleTransition"]
    assert lc.hook_changes(hook(), lc.desired_hook("web", "fk", 600, "CONTINUE")) == ["DefaultResult", "HeartbeatTimeout"]


def test_launch_hook_names_are_the_groups_launch_hooks_sorted(stubbed):
    client, stub = stubbed
    terminating = dict(hook(), LifecycleHookName="drain", LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING")
    stub.add_response("describe_lifecycle_hooks",
                      {"LifecycleHooks": [dict(hook(), LifecycleHookName="zz"), terminating, hook()]},
                      {"AutoScalingGroupName": "web"})
    stub.add_response("describe_lifecycle_hooks", {"LifecycleHooks": []}, {"AutoScalingGroupName": "db"})
    assert lc.launch_hook_names(client, "web", aws_retry=True) == ["fk", "zz"]
    assert lc.launch_hook_names(client.client, "db") == []  # a plain client: no aws_retry


def test_hook_manager_deletes_and_puts_to_clear_a_field_and_confines_errors_to_the_group(stubbed):
    client, stub = stubbed
    desired = lc.desired_hook("web", "fk", 300, "ABANDON")
    stub.add_response("describe_lifecycle_hooks", {"LifecycleHooks": [hook(NotificationMetadata="x")]},
                      {"AutoScalingGroupName": "web", "LifecycleHookNames": ["fk"]})
    stub.add_response("delete_lifecycle_hook", {}, {"AutoScalingGroupName": "web", "LifecycleHookName": "fk"})
    stub.add_response("put_lifecycle_hook", {}, desired)
    stub.add_client_error("describe_lifecycle_hooks", "AccessDenied", "not allowed", 403)
    manager = lc.HookManager(LifecycleGateway(client))
    result = manager.apply({"AutoScalingGroupName": "web", "Instances": []}, "fk", desired)
    assert (result["status"], result["changes"]) == ("updated", ["NotificationMetadata"])
    failed = manager.apply({"AutoScalingGroupName": "db"}, "fk", lc.desired_hook("db", "fk", 300, "ABANDON"))
    assert (failed["status"], failed["error"]) == ("failed", "db: AccessDenied: not allowed")


@pytest.mark.parametrize("args, message", [
    ((10, "ABANDON", None, None), "between 30 and 7200"),
    ((300, "ABANDON", "arn:aws:sqs:us-east-1:1:q.fifo", "arn:aws:iam::1:role/r"), "FIFO"),
    ((300, "ABANDON", "arn:aws:events:us-east-1:1:rule/x", "arn:aws:iam::1:role/r"), "EventBridge"),
    ((300, "ABANDON", "arn:aws:sqs:us-east-1:1:q", None), "role_arn is required"),
    ((300, "ABANDON", None, "arn:aws:iam::1:role/r"), "only used with"),
])
def test_hook_options_are_checked(args, message):
    with pytest.raises(lc.LifecycleError, match=message):
        lc.validate_hook_options(*args)


def test_normalise_actions_takes_ids_and_dicts_and_refuses_bad_input():
    requests = lc.normalise_actions(["i-1", {"instance_id": "i-2", "result": "ABANDON", "token": "t"}],
                                    asg_name="web", result="CONTINUE")
    expected = [("i-1", "CONTINUE", None), ("i-2", "ABANDON", "t")]
    assert [(r["instance_id"], r["result"], r["token"]) for r in requests] == expected
    with pytest.raises(lc.LifecycleError, match="needs a result"):
        lc.normalise_actions(["i-1"])
    with pytest.raises(lc.LifecycleError, match="listed twice"):
        lc.normalise_actions(["i-1", "i-1"], result="CONTINUE")
    with pytest.raises(lc.LifecycleError, match="no instance_id"):
        lc.normalise_actions([{"id": "i-1"}], result="CONTINUE")
    assert lc.normalise_actions(["i-1"], action="heartbeat")[0]["result"] is None


def instances_response(*pairs):
    return {"AutoScalingInstances": [
        {"InstanceId": i, "AutoScalingGroupName": "web", "AvailabilityZone": "us-east-1a", "LifecycleState": s,
         "HealthStatus": "Healthy", "ProtectedFromScaleIn": False} for i, s in pairs]}


def test_complete_settles_non_pending_without_a_call_and_treats_no_active_action_as_done(stubbed):
    client, stub = stubbed
    stub.add_response("describe_auto_scaling_instances",
                      instances_response(("i-1", "Pending:Wait"), ("i-2", "InService"), ("i-3", "Pending:Wait")),
                      {"InstanceIds": ["i-1", "i-2", "i-3", "i-4"], "MaxRecords": 50})
    stub.add_response("describe_lifecycle_hooks", {"LifecycleHooks": [hook()]}, {"AutoScalingGroupName": "web"})
    stub.add_response("complete_lifecycle_action", {}, {"AutoScalingGroupName": "web", "LifecycleHookName": "fk",
                                                        "InstanceId": "i-1", "LifecycleActionResult": "CONTINUE"})
    stub.add_client_error("complete_lifecycle_action", "ValidationError",
                          "No active Lifecycle Action found with instance ID i-3", 400)
    requests = lc.normalise_actions(["i-1", "i-2", "i-3", "i-4"], result="CONTINUE")
    results = runner(client, max_concurrency=1).run("complete", requests)
    assert [(r["instance_id"], r["status"]) for r in results] == [
        ("i-1", "completed"), ("i-2", "not_pending"), ("i-3", "already_completed"), ("i-4", "already_completed")]


def test_other_errors_fail_only_their_instance(stubbed):
    client, stub = stubbed
    stub.add_response("describe_auto_scaling_instances",
                      instances_response(("i-1", "Pending:Wait"), ("i-2", "Pending:Wait")))
    stub.add_client_error("complete_lifecycle_action", "AccessDenied", "not allowed", 403)
    stub.add_response("complete_lifecycle_action", {})
    results = runner(client, max_concurrency=1).run(
        "complete", lc.normalise_actions(["i-1", "i-2"], asg_name="web", hook_name="fk", result="ABANDON"))
    assert [(r["instance_id"], r["status"]) for r in results] == [("i-1", "failed"), ("i-2", "completed")]
    assert "i-1: AccessDenied: not allowed" == results[0]["error"]


def test_heartbeat_loop_stops_when_the_action_is_gone(stubbed):
    client, stub = stubbed
    stub.add_response("describe_auto_scaling_instances", instances_response(("i-1", "Pending:Wait")))
    stub.add_response("record_lifecycle_action_heartbeat", {})
    stub.add_response("describe_auto_scaling_instances", instances_response(("i-1", "Pending:Wait")))
    stub.add_client_error("record_lifecycle_action_heartbeat", "ValidationError",
                          "No active Lifecycle Action found with instance ID i-1", 400)
    sleeps = []
    results = runner(client).heartbeat_until_done(
        lc.normalise_actions(["i-1"], asg_name="web", hook_name="fk", action="heartbeat"), interval=5, lifetime=100,
        sleep=sleeps.append, clock=lambda: 0)
    assert sleeps == [5]
    assert results[0]["status"] == "already_completed" and results[0]["heartbeats"] == 2


def test_a_token_that_is_not_the_open_actions_is_reported_as_a_mismatch_not_as_done(stubbed):
    client, stub = stubbed
    token = "7d0e5bb2-0b1c-4c3e-9a43-2f8f4f6c1b1e"
    stub.add_response("describe_auto_scaling_instances",
                      instances_response(("i-1", "Pending:Wait"), ("i-2", "Pending:Wait")))
    stub.add_client_error("complete_lifecycle_action", "ValidationError",
                          f"No active Lifecycle Action found with token {token}", 400)
    stub.add_client_error("complete_lifecycle_action", "ValidationError",
                          f"No active Lifecycle Action found with token {token}", 400)
    # Read again: i-1 still waits (the token is not its action's), i-2 went InService meanwhile (completed).
    stub.add_response("describe_auto_scaling_instances",
                      instances_response(("i-1", "Pending:Wait"), ("i-2", "InService")),
                      {"InstanceIds": ["i-1", "i-2"], "MaxRecords": 50})
    requests = lc.normalise_actions([{"instance_id": "i-1", "token": token}, {"instance_id": "i-2", "token": token}],
                                    asg_name="web", hook_name="fk", result="CONTINUE")
    results = runner(client, max_concurrency=1).run("complete", requests)
    assert [(r["instance_id"], r["status"]) for r in results] == [
        ("i-1", "token_mismatch"), ("i-2", "already_completed")]
    assert f"the token {token} does not match the lifecycle action" in results[0]["error"]
    assert "nothing was completed" in results[0]["error"] and results[1]["error"] is None


def test_without_a_token_no_active_action_is_not_read_again(stubbed):
    client, stub = stubbed
    stub.add_response("describe_auto_scaling_instances", instances_response(("i-1", "Pending:Wait")))
    stub.add_client_error("complete_lifecycle_action", "ValidationError",
                          "No active Lifecycle Action found with instance ID i-1", 400)
    results = runner(client).run(
        "complete", lc.normalise_actions(["i-1"], asg_name="web", hook_name="fk", result="CONTINUE"))
    assert results[0]["status"] == "already_completed"


def test_heartbeat_loop_ends_within_a_second_of_stop():
    class Beating:  # pylint: disable=too-few-public-methods
        def describe_auto_scaling_instances(self, aws_retry=False, **kwargs):
            return instances_response(("i-1", "Pending:Wait"))

        def record_lifecycle_action_heartbeat(self, aws_retry=False, **kwargs):
            return {}

    now = [0.0]

    def sleep(seconds):
        assert seconds <= 1.0
        now[0] += seconds

    results = runner(Beating()).heartbeat_until_done(
        lc.normalise_actions(["i-1"], asg_name="web", hook_name="fk", action="heartbeat"), interval=300,
        lifetime=7200, sleep=sleep, clock=lambda: now[0], stop=lambda: now[0] >= 42.5)
    assert 42.5 <= now[0] <= 43.5, "the loop noticed stop() within a second, long before the next heartbeat"
    assert results[0]["status"] == "heartbeat" and results[0]["heartbeats"] == 1
