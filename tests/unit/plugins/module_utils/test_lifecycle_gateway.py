# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lifecycle gateway: the calls it makes (through botocore's Stubber), ``aws_retry`` and its one error mapping."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle_gateway import LifecycleGateway
from tests.unit.fakes_aws import stubbed_client


@pytest.fixture
def stubbed():
    with stubbed_client("autoscaling") as pair:
        yield pair


def record(instance_id, state="Pending:Wait"):
    return {"InstanceId": instance_id, "AutoScalingGroupName": "web", "AvailabilityZone": "us-east-1a",
            "LifecycleState": state, "HealthStatus": "Healthy", "ProtectedFromScaleIn": False}


def test_hooks_are_read_put_and_deleted_with_aws_retry(stubbed):
    client, stub = stubbed
    hook = {"AutoScalingGroupName": "web", "LifecycleHookName": "fk", "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "HeartbeatTimeout": 300, "DefaultResult": "ABANDON"}
    stub.add_response("describe_lifecycle_hooks", {"LifecycleHooks": [hook]},
                      {"AutoScalingGroupName": "web", "LifecycleHookNames": ["fk"]})
    stub.add_response("describe_lifecycle_hooks", {"LifecycleHooks": []},
                      {"AutoScalingGroupName": "db", "LifecycleHookNames": ["fk"]})
    stub.add_response("put_lifecycle_hook", {}, hook)
    stub.add_response("delete_lifecycle_hook", {}, {"AutoScalingGroupName": "web", "LifecycleHookName": "fk"})
    gateway = LifecycleGateway(client)
    assert gateway.hook("web", "fk") == hook
    assert gateway.hook("db", "fk") is None
    gateway.put_hook(hook)
    gateway.delete_hook("web", "fk")
    assert all(retry for name, retry in client.retries) and len(client.retries) == 4


def test_instance_states_are_read_in_batches_of_50_and_every_page(stubbed):
    client, stub = stubbed
    ids = [f"i-{n:03d}" for n in range(51)]
    stub.add_response("describe_auto_scaling_instances",
                      {"AutoScalingInstances": [record(ids[0])], "NextToken": "t"},
                      {"InstanceIds": ids[:50], "MaxRecords": 50})
    stub.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": [record(ids[1], "InService")]},
                      {"InstanceIds": ids[:50], "MaxRecords": 50, "NextToken": "t"})
    stub.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": []},
                      {"InstanceIds": ids[50:], "MaxRecords": 50})
    states = LifecycleGateway(client).instance_states(list(reversed(ids)) + ids[:3])
    assert {i: r["LifecycleState"] for i, r in states.items()} == {ids[0]: "Pending:Wait", ids[1]: "InService"}
    assert client.retries == [("describe_auto_scaling_instances", True)] * 3


def test_complete_and_heartbeat_name_the_action_by_token_else_instance_and_map_no_active_action(stubbed):
    client, stub = stubbed
    token = "7d0e5bb2-0b1c-4c3e-9a43-2f8f4f6c1b1e"
    stub.add_response("complete_lifecycle_action", {}, {"AutoScalingGroupName": "web", "LifecycleHookName": "fk",
                                                        "LifecycleActionToken": token, "LifecycleActionResult": "CONTINUE"})
    stub.add_client_error("record_lifecycle_action_heartbeat", "ValidationError",
                          "No active Lifecycle Action found with instance ID i-1", 400,
                          expected_params={"AutoScalingGroupName": "web", "LifecycleHookName": "fk", "InstanceId": "i-1"})
    stub.add_client_error("complete_lifecycle_action", "ValidationError", "something else", 400)
    gateway = LifecycleGateway(client)
    assert gateway.complete("web", "fk", "CONTINUE", instance_id="i-1", token=token) is True
    assert gateway.heartbeat("web", "fk", instance_id="i-1") is False
    with pytest.raises(ClientError, match="something else"):
        gateway.complete("web", "fk", "ABANDON", instance_id="i-1")
    assert all(retry for name, retry in client.retries) and len(client.retries) == 3


def test_launch_hook_names_on_a_plain_client_pass_no_aws_retry(stubbed):
    client, stub = stubbed
    launching = {"AutoScalingGroupName": "web", "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING"}
    stub.add_response("describe_lifecycle_hooks", {"LifecycleHooks": [
        dict(launching, LifecycleHookName="zz"), dict(launching, LifecycleHookName="fk"),
        dict(launching, LifecycleHookName="drain", LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING")]},
        {"AutoScalingGroupName": "web"})
    assert LifecycleGateway(client.client, call_kwargs={}).launch_hook_names("web") == ["fk", "zz"]
    assert not client.retries
