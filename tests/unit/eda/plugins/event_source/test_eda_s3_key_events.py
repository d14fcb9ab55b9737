# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The s3_key_events event source: S3 notification formats, coalescing, redelivery, filters.

The plugin is loaded from its file, as ansible-rulebook loads it (runpy). SQS is botocore's
Stubber on a real client; the clock is a settable number, so windows close when the test says.
"""

from __future__ import annotations

import asyncio
import json
import os
import runpy

import boto3
import pytest
from botocore.stub import ANY, Stubber

from lab.ansiblerun import REPO_ROOT

# The EDA source: the compat stage runs it on the oldest supported pair as well.
pytestmark = pytest.mark.compat

ROOT = REPO_ROOT  # the EDA sources are loaded by path, as ansible-rulebook does
PLUGIN = runpy.run_path(os.path.join(ROOT, "extensions", "eda", "plugins", "event_source", "s3_key_events.py"))
LIFECYCLE = runpy.run_path(os.path.join(ROOT, "extensions", "eda", "plugins", "event_source", "asg_lifecycle.py"))
parse_message = PLUGIN["parse_message"]
NotS3Notification = PLUGIN["NotS3Notification"]
QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/fleetkeeper-keys"


def record(key, event="ObjectRemoved:Delete", bucket="fleet-keys", time="2026-12-02T04:39:08.511Z", seq="0A1"):
    # As S3 sends it (the user guide's "Event message structure"); the key is URL-encoded.
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": time,
            "eventName": event, "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "203.0.113.7"},
            "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "fleetkeeper-keys",
                   "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                              "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": key, "size": 81, "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                              "sequencer": seq}}}


def notification(*records):
    return {"Records": list(records)}


TEST_EVENT = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-12-02T04:39:08.450Z",
              "Bucket": "fleet-keys", "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3e"}


def sns(document):
    return {"Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:fleetkeeper-keys", "Subject": "Amazon S3 Notification",
            "Message": json.dumps(document), "Timestamp": "2026-12-02T04:39:09.000Z"}


def test_the_sources_share_one_sqs_poller():
    assert issubclass(PLUGIN["Poller"], LIFECYCLE["_SQS"].SqsPoller)
    assert PLUGIN["_SQS"] is LIFECYCLE["_SQS"]


def test_direct_notification_with_an_url_encoded_key():
    [found] = parse_message(json.dumps(notification(record("keys/j%C3%B6rg+smith.pub"))))
    assert (found["bucket"], found["key"], found["kind"], found["format"]) == (
        "fleet-keys", "keys/jörg smith.pub", "removed", "s3")


def test_notification_through_sns_is_decoded_twice():
    [found] = parse_message(json.dumps(sns(notification(record("keys/alice.pub", "ObjectCreated:Put")))))
    assert (found["kind"], found["format"]) == ("created", "sns")


@pytest.mark.parametrize("body", [TEST_EVENT, sns(TEST_EVENT)])
def test_test_event_gives_nothing(body):
    assert parse_message(json.dumps(body)) is None


def test_other_event_kinds_are_dropped():
    assert parse_message(json.dumps(notification(record("keys/a.pub", "ObjectRestore:Completed")))) == []


@pytest.mark.parametrize("body, reason", [
    ("<html>", "not JSON"),
    ("[1]", "not an object"),
    (json.dumps({"Records": []}), "neither"),
    (json.dumps({"Records": [{"eventSource": "aws:sqs"}]}), "not from aws:s3"),
    (json.dumps(notification(record("keys/a.pub", bucket="a/b"))), "bucket name"),
    (json.dumps(notification(record("keys/a%0A.pub"))), "control characters"),
    (json.dumps({"Type": "Notification", "TopicArn": "t", "Message": "nope"}), "SNS Message is not JSON"),
])
def test_garbage_is_refused_with_a_reason(body, reason):
    with pytest.raises(NotS3Notification, match=reason):
        parse_message(body)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_poller(args=None):
    calls = []
    queue = asyncio.Queue()
    settings = PLUGIN["Settings"]({"queue_url": QUEUE_URL, "region": "us-east-1", "coalesce_seconds": 3,
                                   **(args or {})})
    clock = Clock()
    poller = PLUGIN["Poller"](settings, queue, clock=clock)
    poller.client = boto3.client("sqs", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    poller.client.meta.events.register_first("before-parameter-build.sqs", lambda model, **_: calls.append(model.name))
    return poller, queue, calls, clock


def message(n, body, count=1):
    return {"MessageId": f"m{n}", "ReceiptHandle": f"rh{n}-{count}", "Body": json.dumps(body),
            "Attributes": {"ApproximateReceiveCount": str(count)}}


def receive_params(wait):
    return {"QueueUrl": QUEUE_URL, "WaitTimeSeconds": wait, "MaxNumberOfMessages": 10,
            "MessageSystemAttributeNames": ["ApproximateReceiveCount"]}


def deletes(*handles):
    return ({"Successful": [{"Id": str(n)} for n in range(len(handles))], "Failed": []},
            {"QueueUrl": QUEUE_URL, "Entries": [{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(handles)]})


def events_in(queue):
    return [queue.get_nowait() for _n in range(queue.qsize())]


def test_a_burst_within_the_window_is_one_event_per_bucket_and_prefix():
    poller, queue, calls, clock = make_poller({"prefixes": ["keys/", "keys/admins/"]})
    burst = [message(0, notification(record("keys/alice.pub", seq="01"))),
             message(1, TEST_EVENT),
             message(2, notification(record("keys/bob.pub", "ObjectCreated:Put", seq="02")))]
    later = [message(3, notification(record("keys/alice.pub", "ObjectCreated:Put", time="2026-12-02T04:39:09.900Z",
                                            seq="03"))),
             message(4, notification(record("keys/admins/root2.pub", seq="04"))),
             message(5, notification(record("other/x.pub", seq="05"))),
             message(6, notification(record("keys/carol.pub", bucket="other-keys", seq="06")))]
    with Stubber(poller.client) as stub:
        stub.add_response("receive_message", {"Messages": burst}, receive_params(20))
        stub.add_response("delete_message_batch", *deletes("rh1-1"))  # the test event, at once
        stub.add_response("receive_message", {"Messages": later}, receive_params(1))  # 0.8 s left, rounded up
        stub.add_response("delete_message_batch", *deletes("rh5-1"))  # under no prefix
        stub.add_response("receive_message", {}, receive_params(0))
        stub.add_response("delete_message_batch", *deletes("rh0-1", "rh2-1", "rh3-1", "rh4-1", "rh6-1"))

        async def steps():
            await poller.step()
            assert queue.qsize() == 0
            clock.now += 2.2
            await poller.step()
            assert queue.qsize() == 0, "the window is still open"
            clock.now += 3.1  # every window closed (the later ones opened at 1002.2)
            await poller.step()

        asyncio.run(steps())
        stub.assert_no_pending_responses()
    events = {(e["s3_key_events"]["bucket"], e["s3_key_events"]["prefix"]): e for e in events_in(queue)}
    assert sorted(events) == [("fleet-keys", "keys/"), ("fleet-keys", "keys/admins/"), ("other-keys", "keys/")]
    keys = events[("fleet-keys", "keys/")]["s3_key_events"]
    assert keys["keys"] == ["keys/alice.pub", "keys/bob.pub"] and keys["records"] == 3
    # alice's last record in the window is her new key, so she counts as created
    assert keys["created"] == ["keys/alice.pub", "keys/bob.pub"] and keys["removed"] == []
    assert events[("fleet-keys", "keys/admins/")]["s3_key_events"]["removed"] == ["keys/admins/root2.pub"]
    assert events[("fleet-keys", "keys/")]["sqs"]["message_ids"] == ["m0", "m2", "m3"]
    assert calls.count("DeleteMessageBatch") == 3


def test_messages_are_deleted_only_after_their_event_was_put():
    poller, queue, calls, clock = make_poller({"coalesce_seconds": 0})
    order = []
    original_put = queue.put

    async def put(item):
        order.append(("put", list(calls)))
        await original_put(item)

    queue.put = put
    with Stubber(poller.client) as stub:
        stub.add_response("receive_message", {"Messages": [message(0, notification(record("keys/a.pub")))]},
                          receive_params(20))
        stub.add_response("delete_message_batch", *deletes("rh0-1"))
        asyncio.run(poller.step())
        stub.assert_no_pending_responses()
    assert order == [("put", ["ReceiveMessage"])]
    assert calls == ["ReceiveMessage", "DeleteMessageBatch"]
    assert clock.now == 1000.0


def test_a_redelivered_message_makes_no_second_event():
    poller, queue, _calls, clock = make_poller({"coalesce_seconds": 0})
    body = notification(record("keys/alice.pub"))
    with Stubber(poller.client) as stub:
        stub.add_response("receive_message", {"Messages": [message(0, body)]}, receive_params(20))
        stub.add_response("delete_message_batch", *deletes("rh0-1"))
        # The deletion was lost: SQS delivers the same message again, with a new receipt handle.
        stub.add_response("receive_message", {"Messages": [message(0, body, count=2)]}, receive_params(20))
        stub.add_response("delete_message_batch", *deletes("rh0-2"))

        async def steps():
            await poller.step()
            clock.now += 60
            await poller.step()

        asyncio.run(steps())
        stub.assert_no_pending_responses()
    assert len(events_in(queue)) == 1


def test_a_redelivery_after_the_dedupe_horizon_is_one_more_event():
    poller, queue, _calls, clock = make_poller({"coalesce_seconds": 0, "dedupe_seconds": 30})
    body = notification(record("keys/alice.pub"))
    with Stubber(poller.client) as stub:
        for count in (1, 2):
            stub.add_response("receive_message", {"Messages": [message(0, body, count)]}, receive_params(20))
            stub.add_response("delete_message_batch", *deletes(f"rh0-{count}"))

        async def steps():
            await poller.step()
            clock.now += 31
            await poller.step()

        asyncio.run(steps())
    events = events_in(queue)
    assert len(events) == 2 and events[1]["sqs"]["max_receive_count"] == 2


def test_a_redelivery_inside_the_window_is_deleted_with_its_newest_receipt_handle():
    poller, queue, _calls, clock = make_poller()
    body = notification(record("keys/alice.pub"))
    with Stubber(poller.client) as stub:
        stub.add_response("receive_message", {"Messages": [message(0, body)]}, receive_params(20))
        stub.add_response("receive_message", {"Messages": [message(0, body, count=2)]}, receive_params(3))
        stub.add_response("receive_message", {}, receive_params(0))
        stub.add_response("delete_message_batch", *deletes("rh0-2"))

        async def steps():
            await poller.step()
            clock.now += 0.5
            await poller.step()
            clock.now += 3
            await poller.step()

        asyncio.run(steps())
        stub.assert_no_pending_responses()
    [event] = events_in(queue)
    assert event["s3_key_events"]["records"] == 1


def test_bucket_filter_and_malformed_messages_kept_for_the_dead_letter_queue():
    poller, queue, calls, _clock = make_poller({"buckets": ["fleet-keys"], "delete_malformed": False,
                                                "coalesce_seconds": 0})
    with Stubber(poller.client) as stub:
        stub.add_response("receive_message", {"Messages": [
            message(0, notification(record("keys/a.pub", bucket="not-ours"))),
            {"MessageId": "m1", "ReceiptHandle": "rh1", "Body": "garbage"}]}, receive_params(20))
        stub.add_response("delete_message_batch", *deletes("rh0-1"))
        asyncio.run(poller.step())
        stub.assert_no_pending_responses()
    assert queue.qsize() == 0 and calls == ["ReceiveMessage", "DeleteMessageBatch"]


def test_aws_errors_back_off_and_polling_goes_on(monkeypatch):
    slept = []

    async def no_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(PLUGIN["asyncio"], "sleep", no_sleep)
    poller, queue, _calls, _clock = make_poller({"coalesce_seconds": 0, "max_backoff": 10})
    with Stubber(poller.client) as stub:
        for _n in range(5):
            stub.add_client_error("receive_message", "AccessDenied", "denied", 403)
        stub.add_response("receive_message", {"Messages": [message(0, notification(record("keys/a.pub")))]})
        stub.add_client_error("delete_message_batch", "ThrottlingException", "slow down", 400)

        async def poll():
            for _n in range(6):
                await poller.step()

        asyncio.run(poll())
    assert len(slept) == 5 and max(slept) <= 10
    assert queue.qsize() == 1 and poller.failures == 0


@pytest.mark.parametrize("args, error", [
    ({}, "exactly one of queue_url and name"),
    ({"queue_url": QUEUE_URL, "prefixes": "keys/"}, "prefixes"),
    ({"queue_url": QUEUE_URL, "prefixes": []}, "prefixes"),
    ({"queue_url": QUEUE_URL, "buckets": ["a/b"]}, "buckets"),
    ({"queue_url": QUEUE_URL, "coalesce_seconds": 61}, "between 0 and 60"),
    ({"queue_url": QUEUE_URL, "coalesce_seconds": "soon"}, "a number"),
    ({"queue_url": QUEUE_URL, "dedupe_seconds": -1}, "between 0 and 86400"),
    ({"queue_url": QUEUE_URL, "wait_time_seconds": 0}, "between 1 and 20"),
])
def test_invalid_arguments_stop_the_source_with_a_message(args, error):
    with pytest.raises(ValueError, match=error):
        PLUGIN["Settings"](args)


def test_any_receive_params_are_valid_for_sqs():
    # next_wait() never asks SQS for more than 20 s or less than 0 s
    poller, _queue, _calls, clock = make_poller({"coalesce_seconds": 60})
    assert poller.next_wait() is None
    poller.accept(message(0, notification(record("keys/a.pub"))))
    assert poller.next_wait() == 60
    with Stubber(poller.client) as stub:
        stub.add_response("receive_message", {}, {**receive_params(20), "WaitTimeSeconds": ANY})
        clock.now += 59.5
        asyncio.run(poller.step())
        stub.assert_no_pending_responses()
