# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The asg_lifecycle event source: parsing of every message format, and receive / hand on / delete order.

The plugin is loaded from its file, as ansible-rulebook loads it (runpy). SQS is
botocore's Stubber on a real client: requests are checked against the service
model, errors are real ClientErrors.
"""

from __future__ import annotations

import asyncio
import json
import os
import runpy

import boto3
import pytest
from botocore.stub import Stubber

from lab.ansiblerun import REPO_ROOT

# The EDA source: the compat stage runs it on the oldest supported pair as well.
pytestmark = pytest.mark.compat

ROOT = REPO_ROOT  # the EDA sources are loaded by path, as ansible-rulebook does
PLUGIN = runpy.run_path(os.path.join(ROOT, "extensions", "eda", "plugins", "event_source", "asg_lifecycle.py"))
parse_message = PLUGIN["parse_message"]
NotLifecycleMessage = PLUGIN["NotLifecycleMessage"]

INSTANCE = "i-0598c7d356eba48d7"
TOKEN = "c613620e-07e2-4ed2-a9e2-ef8258911ade"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/fleet-lifecycle"

# The hook's own notification, as the Auto Scaling user guide shows it.
HOOK = {
    "Origin": "EC2",
    "LifecycleHookName": "fleetkeeper-launch",
    "Destination": "AutoScalingGroup",
    "AccountId": "123456789012",
    "RequestId": "4542bc4f-1a5d-4b2a-9c4e-79a0b4b0e4f0",
    "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
    "AutoScalingGroupName": "web-asg",
    "Service": "AWS Auto Scaling",
    "Time": "2026-12-01T04:10:26.533Z",
    "EC2InstanceId": INSTANCE,
    "LifecycleActionToken": TOKEN,
    "NotificationMetadata": '{"role": "web"}',
}
TEST_NOTIFICATION = {
    "AccountId": "123456789012",
    "RequestId": "d4d5f1c6-0c07-4b0e-8a4b-1c2f0a9b7d11",
    "AutoScalingGroupARN": "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:0e4f:autoScalingGroupName/web-asg",
    "AutoScalingGroupName": "web-asg",
    "Service": "AWS Auto Scaling",
    "Event": "autoscaling:TEST_NOTIFICATION",
    "Time": "2026-12-01T04:09:00.000Z",
}
EVENTBRIDGE = {
    "version": "0",
    "id": "468fe059-f4b7-445f-bb22-2a1d6e4b5c1a",
    "detail-type": "EC2 Instance-launch Lifecycle Action",
    "source": "aws.autoscaling",
    "account": "123456789012",
    "time": "2026-12-01T04:10:27Z",
    "region": "eu-west-1",
    "resources": ["arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:0e4f:autoScalingGroupName/web-asg"],
    "detail": {
        "LifecycleActionToken": TOKEN,
        "AutoScalingGroupName": "web-asg",
        "LifecycleHookName": "fleetkeeper-launch",
        "EC2InstanceId": INSTANCE,
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
        "Origin": "WarmPool",
        "Destination": "AutoScalingGroup",
    },
}


def sns(message: dict) -> dict:
    return {
        "Type": "Notification",
        "MessageId": "95df01b4-ee98-5cb9-9903-4c221d41eb5e",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:fleet-lifecycle",
        "Subject": f"Auto Scaling: Lifecycle action 'LAUNCHING' for instance {INSTANCE} in progress.",
        "Message": json.dumps(message),
        "Timestamp": "2026-12-01T04:10:26.600Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/cert.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }


def test_hook_notification_in_the_body():
    assert parse_message(json.dumps(HOOK)) == {
        "instance_id": INSTANCE, "asg_name": "web-asg", "hook_name": "fleetkeeper-launch", "token": TOKEN,
        "transition": "autoscaling:EC2_INSTANCE_LAUNCHING", "origin": "EC2", "destination": "AutoScalingGroup",
        "metadata": '{"role": "web"}', "account_id": "123456789012", "region": None,
        "time": "2026-12-01T04:10:26.533Z", "request_id": "4542bc4f-1a5d-4b2a-9c4e-79a0b4b0e4f0", "format": "hook",
    }


def test_hook_notification_through_sns_is_decoded_twice():
    event = parse_message(json.dumps(sns(HOOK)))
    assert event["format"] == "sns"
    assert {k: v for k, v in event.items() if k != "format"} == {
        k: v for k, v in parse_message(json.dumps(HOOK)).items() if k != "format"}


def test_eventbridge_event():
    event = parse_message(json.dumps(EVENTBRIDGE))
    assert event["format"] == "eventbridge"
    assert (event["instance_id"], event["token"], event["asg_name"], event["hook_name"]) == (
        INSTANCE, TOKEN, "web-asg", "fleetkeeper-launch")
    assert (event["origin"], event["destination"], event["region"], event["account_id"]) == (
        "WarmPool", "AutoScalingGroup", "eu-west-1", "123456789012")
    assert event["metadata"] is None and event["time"] == "2026-12-01T04:10:27Z"


def test_a_notification_without_origin_and_destination_is_ec2_to_the_group():
    event = parse_message(broken(Origin=None, Destination=None))
    assert (event["origin"], event["destination"]) == ("EC2", "AutoScalingGroup")


def test_eventbridge_terminate_event():
    document = dict(EVENTBRIDGE, **{"detail-type": "EC2 Instance-terminate Lifecycle Action"})
    document["detail"] = dict(EVENTBRIDGE["detail"], LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                              Origin="AutoScalingGroup", Destination="EC2")
    assert parse_message(json.dumps(document))["transition"] == "autoscaling:EC2_INSTANCE_TERMINATING"


@pytest.mark.parametrize("body", [json.dumps(TEST_NOTIFICATION), json.dumps(sns(TEST_NOTIFICATION))])
def test_test_notification_gives_no_event(body):
    assert parse_message(body) is None


def broken(**changes):
    document = dict(HOOK)
    for key, value in changes.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return json.dumps(document)


@pytest.mark.parametrize("body, reason", [
    ("not json at all", "not JSON"),
    ("", "not JSON"),
    ("[1, 2]", "not an object"),
    (None, "not text"),
    ("x" * 300000, "larger"),
    (json.dumps({"hello": "world"}), "neither"),
    (json.dumps(dict(sns(HOOK), Message="{broken")), "SNS Message is not JSON"),
    (broken(EC2InstanceId=None), "EC2InstanceId"),
    (broken(EC2InstanceId="all"), "not an EC2 instance id"),
    (broken(EC2InstanceId="i-0598c7d356eba48d7,localhost"), "not an EC2 instance id"),
    (broken(EC2InstanceId="i-0598c7d356eba48d7\n"), "not an EC2 instance id"),
    (broken(EC2InstanceId=12345), "not an EC2 instance id"),
    (broken(LifecycleActionToken=None), "LifecycleActionToken"),
    (broken(LifecycleActionToken="{{ lookup('pipe', 'id') }}"), "LifecycleActionToken"),
    (broken(LifecycleHookName="a b"), "LifecycleHookName"),
    (broken(LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCH_ERROR"), "LifecycleTransition"),
    (broken(AutoScalingGroupName=None), "AutoScalingGroupName"),
    (broken(AutoScalingGroupName="web\x1b[31m"), "control characters"),
    (broken(AutoScalingGroupName="a" * 256), "AutoScalingGroupName"),
    (broken(Origin="Moon"), "Origin"),
    (broken(NotificationMetadata=["list"]), "NotificationMetadata"),
    (json.dumps(dict(EVENTBRIDGE, source="my.app")), "EventBridge event from"),
    (json.dumps(dict(EVENTBRIDGE, **{"detail-type": "EC2 Instance Launch Successful"})), "detail-type"),
    (json.dumps(dict(EVENTBRIDGE, detail="text")), "detail object"),
    (json.dumps(dict(EVENTBRIDGE, detail=dict(EVENTBRIDGE["detail"], LifecycleTransition=TERMINATING))),
     "disagree"),
])
def test_garbage_is_refused_with_a_reason(body, reason):
    with pytest.raises(NotLifecycleMessage, match=reason):
        parse_message(body)


# --- receive, hand on, delete ---------------------------------------------------------------

class RecordingQueue(asyncio.Queue):
    """Remembers, for each event put, how many SQS calls had been made by then."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.put_after = []

    async def put(self, item):
        self.put_after.append(list(self.calls))
        await super().put(item)


def make_poller(args=None):
    calls = []
    queue = RecordingQueue(calls)
    settings = PLUGIN["Settings"]({"queue_url": QUEUE_URL, "region": "us-east-1", **(args or {})})
    poller = PLUGIN["Poller"](settings, queue)
    poller.client = boto3.client("sqs", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    poller.client.meta.events.register_first("before-parameter-build.sqs", lambda model, **_: calls.append(model.name))
    return poller, queue, calls


def message(n, body):
    return {"MessageId": f"m{n}", "ReceiptHandle": f"rh{n}", "Body": body,
            "Attributes": {"ApproximateReceiveCount": "1"}}


def test_events_are_put_before_their_messages_are_deleted_and_garbage_is_deleted():
    poller, queue, calls = make_poller()
    messages = [message(0, json.dumps(HOOK)), message(1, json.dumps(TEST_NOTIFICATION)), message(2, "garbage"),
                message(3, json.dumps(sns(HOOK))), message(4, json.dumps(EVENTBRIDGE))]
    with Stubber(poller.client) as stub:
        stub.add_response("receive_message", {"Messages": messages},
                          {"QueueUrl": QUEUE_URL, "WaitTimeSeconds": 20, "MaxNumberOfMessages": 10,
                           "MessageSystemAttributeNames": ["ApproximateReceiveCount"]})
        stub.add_response("delete_message_batch",
                          {"Successful": [{"Id": str(n)} for n in range(5)], "Failed": []},
                          {"QueueUrl": QUEUE_URL,
                           "Entries": [{"Id": str(n), "ReceiptHandle": f"rh{n}"} for n in range(5)]})

        async def once():
            await poller.handle(await poller.receive())

        asyncio.run(once())
        stub.assert_no_pending_responses()
    events = [queue.get_nowait() for _n in range(queue.qsize())]
    assert [(e["asg_lifecycle"]["format"], e["sqs"]["message_id"]) for e in events] == [
        ("hook", "m0"), ("sns", "m3"), ("eventbridge", "m4")]
    assert events[0]["sqs"]["receive_count"] == 1
    # Every event was handed on while its message was still in the queue.
    assert all("DeleteMessageBatch" not in before for before in queue.put_after)
    assert calls == ["ReceiveMessage", "DeleteMessageBatch"]


def test_malformed_messages_can_be_left_for_the_dead_letter_queue():
    poller, queue, _calls = make_poller({"delete_malformed": False})
    with Stubber(poller.client) as stub:
        stub.add_response("delete_message_batch", {"Successful": [{"Id": "0"}], "Failed": []},
                          {"QueueUrl": QUEUE_URL, "Entries": [{"Id": "0", "ReceiptHandle": "rh0"}]})
        asyncio.run(poller.handle([message(0, json.dumps(HOOK)), message(1, "garbage")]))
        stub.assert_no_pending_responses()
    assert queue.qsize() == 1


def test_unselected_transitions_are_deleted_without_an_event():
    poller, queue, _calls = make_poller({"transitions": ["autoscaling:EC2_INSTANCE_LAUNCHING"]})
    terminate = dict(HOOK, LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING")
    with Stubber(poller.client) as stub:
        stub.add_response("delete_message_batch", {"Successful": [{"Id": "0"}], "Failed": []},
                          {"QueueUrl": QUEUE_URL, "Entries": [{"Id": "0", "ReceiptHandle": "rh0"}]})
        asyncio.run(poller.handle([message(0, json.dumps(terminate))]))
    assert queue.qsize() == 0


def test_without_feedback_the_message_stays_in_the_queue():
    feedback = asyncio.Queue()
    poller, queue, calls = make_poller({"feedback": True, "eda_feedback_queue": feedback, "feedback_timeout": 1})
    with Stubber(poller.client):
        asyncio.run(poller.handle([message(0, json.dumps(HOOK))]))
    assert queue.qsize() == 1 and calls == []


def test_with_feedback_the_message_is_deleted_after_it():
    poller, queue, calls = make_poller({"feedback": True, "eda_feedback_queue": asyncio.Queue()})

    async def engine():
        event = await queue.get()
        assert calls == []
        await poller.settings.feedback_queue.put(event)

    async def both():
        await asyncio.gather(poller.handle([message(0, json.dumps(HOOK))]), engine())

    with Stubber(poller.client) as stub:
        stub.add_response("delete_message_batch", {"Successful": [{"Id": "0"}], "Failed": []},
                          {"QueueUrl": QUEUE_URL, "Entries": [{"Id": "0", "ReceiptHandle": "rh0"}]})
        asyncio.run(both())
        stub.assert_no_pending_responses()


def test_aws_errors_back_off_and_polling_goes_on(monkeypatch):
    slept = []

    async def no_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(PLUGIN["asyncio"], "sleep", no_sleep)
    poller, _queue, _calls = make_poller({"max_backoff": 30})
    with Stubber(poller.client) as stub:
        for _n in range(7):
            stub.add_client_error("receive_message", "AWS.SimpleQueueService.NonExistentQueue", "no queue", 400)
        stub.add_response("receive_message", {"Messages": [message(0, "x")]})
        stub.add_client_error("delete_message_batch", "ThrottlingException", "slow down", 400)

        async def poll():
            for _n in range(7):
                assert await poller.receive() == []
            assert len(await poller.receive()) == 1
            await poller.handle([message(0, "x")])  # a failed delete is logged, not raised

        asyncio.run(poll())
    assert len(slept) == 7 and slept[-1] <= 30 and slept[0] <= 2
    assert poller.failures == 0


@pytest.mark.parametrize("args, error", [
    ({}, "exactly one of queue_url and name"),
    ({"queue_url": QUEUE_URL, "name": "q"}, "exactly one"),
    ({"queue_url": QUEUE_URL, "wait_time_seconds": 21}, "between 1 and 20"),
    ({"queue_url": QUEUE_URL, "max_number_of_messages": "ten"}, "integer"),
    ({"queue_url": QUEUE_URL, "transitions": ["autoscaling:EC2_INSTANCE_LAUNCH"]}, "transitions"),
    ({"queue_url": QUEUE_URL, "feedback": True}, "persistence"),
])
def test_invalid_arguments_stop_the_source_with_a_message(args, error):
    with pytest.raises(ValueError, match=error):
        PLUGIN["Settings"](args)
